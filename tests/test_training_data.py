"""Training data features (issue 17): captions, A1111 template files, tag rules, aspect-ratio buckets,
masks as loss weights, and --latent_sampling; for SD1, SDXL and a Chinese family."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import textinv
from conftest import same_vectors, train_config
from textinv.config import TrainingInterrupted, UserError
from textinv.data.buckets import bucket_sizes, nearest_bucket
from textinv.data.captions import Captioner, TagRules, build_captioner
from textinv.data.examples import Example, ExampleStream
from textinv.data.images import discover_images, load_sized_views, make_view, to_tensor
from textinv.data.latents import LazyLatentCache
from textinv.data.options import read_template_file
from textinv.data.templates import templates_for
from textinv.events import TrainObserver
from textinv.models.conditioning import add_placeholder
from textinv.models.loading import load_model_parts
from textinv.tiny import build_tiny_pipeline
from textinv.training import builders, loss, recipe
from textinv.training.loss import LossSettings, ObjectiveFor, denoising_loss, example_draws, loss_target

TOKEN = "<cat-toy>"
TEMPLATES = ("a photo of a {}", "a rendering of a {}")


# --- captions, without a model ---------------------------------------------------------------------


def test_a_caption_takes_the_placeholder_where_it_says_else_follows_a_template() -> None:
    captions = ["[name] on a table", "{} in the snow", f"a {TOKEN} toy", "red, shiny", None]
    captioner = Captioner(TEMPLATES, TOKEN, TOKEN, captions)
    fed = [captioner.caption(image, 1) for image in range(5)]
    assert fed == [
        f"{TOKEN} on a table",
        f"{TOKEN} in the snow",
        f"a {TOKEN} toy",
        f"a rendering of a {TOKEN}, red, shiny",
        f"a rendering of a {TOKEN}",  # no caption file: the template alone
    ]
    # Several vectors: the token the caption writes becomes all of them.
    several = Captioner(TEMPLATES, f"{TOKEN} {TOKEN}_1", TOKEN, [f"a {TOKEN} toy"])
    assert several.caption(0, 0) == f"a {TOKEN} {TOKEN}_1 toy"


def test_template_file_fills_name_and_filewords_from_caption_files_or_file_names(tmp_path: Path) -> None:
    for name in ("003-red car.png", "bike.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    (tmp_path / "bike.txt").write_text("blue bike", encoding="utf-8")
    templates = tmp_path / "style_filewords.txt"
    templates.write_text("a photo of [name], [filewords]\n\nart by [name]\n", encoding="utf-8")
    captioner = build_captioner(discover_images(tmp_path), TOKEN, TOKEN, None, str(templates), TagRules())
    assert captioner.templates == ("a photo of [name], [filewords]", "art by [name]")  # blank lines skipped
    assert [captioner.caption(image, 0) for image in range(2)] == [
        f"a photo of {TOKEN}, red car",  # the file name without its leading numbers (A1111)
        f"a photo of {TOKEN}, blue bike",  # bike.txt, read as A1111 reads IMAGE.txt
    ]
    assert captioner.caption(0, 1) == f"art by {TOKEN}"
    # The templates from the model do not replace a template file's.
    assert captioner.using_templates(TEMPLATES) is captioner
    templates.write_text("a photo of [name]\nno placeholder here\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2 .*no \[name\]"):
        read_template_file(str(templates))


def _stream(captioner: Captioner, seed: int, num_images: int = 1) -> ExampleStream:
    return ExampleStream(num_images, 100, captioner.templates, TOKEN, False, seed, captioner=captioner)


def _tags_after_template(caption: str) -> list[str]:
    return caption.split(f"{TOKEN}, ", 1)[1].split(", ") if f"{TOKEN}, " in caption else []


def test_shuffle_keeps_the_first_tags_in_place_and_is_reproducible_from_the_seed() -> None:
    written = "tag0, tag1, tag2, tag3, tag4, tag5"
    rules = TagRules(shuffle=True, keep_tokens=2)
    fed = [_stream(Captioner(TEMPLATES, TOKEN, TOKEN, [written], rules=rules), seed=3)[i].caption for i in range(60)]
    orders = [_tags_after_template(caption) for caption in fed]
    assert all(order[:2] == ["tag0", "tag1"] for order in orders)
    assert all(sorted(order) == sorted(written.split(", ")) for order in orders)
    assert len({tuple(order) for order in orders}) > 10  # 24 orders of the 4 free tags; 60 draws see most
    again = [_stream(Captioner(TEMPLATES, TOKEN, TOKEN, [written], rules=rules), seed=3)[i].caption for i in range(60)]
    other = [_stream(Captioner(TEMPLATES, TOKEN, TOKEN, [written], rules=rules), seed=4)[i].caption for i in range(60)]
    assert again == fed and other != fed


def test_tag_and_caption_dropout_never_drop_the_placeholder() -> None:
    written = f"red, {TOKEN} on a shelf, shiny, small"
    everything = TagRules(keep_tokens=1, tag_dropout_rate=1.0)
    fed = {_stream(Captioner(TEMPLATES, TOKEN, TOKEN, [written], rules=everything), 0)[i].caption for i in range(20)}
    assert fed == {f"red, {TOKEN} on a shelf"}  # the kept tag and the placeholder's tag stay
    half = TagRules(caption_dropout_rate=0.5)
    stream = _stream(Captioner(TEMPLATES, TOKEN, TOKEN, ["red, shiny"], rules=half), 0)
    captions = [stream[i].caption for i in range(400)]
    emptied = sum(caption in {t.format(TOKEN) for t in TEMPLATES} for caption in captions)
    assert abs(emptied - 200) < 4 * math.sqrt(400 * 0.25)  # a binomial share, 4 standard deviations
    assert all(TOKEN in caption for caption in captions)


def test_chinese_captions_keep_their_full_width_commas() -> None:
    rules = TagRules(shuffle=True)
    captioner = Captioner(("一张{}的照片",), TOKEN, TOKEN, ["红色，盒子，很大"], rules=rules)
    fed = _stream(captioner, 0)[0].caption
    head, tags = fed.split("，", 1)
    assert head == f"一张{TOKEN}的照片" and sorted(tags.split("，")) == sorted(["红色", "盒子", "很大"])


# --- buckets, without a model ----------------------------------------------------------------------


def test_buckets_follow_kohyas_rule() -> None:
    # By hand from kohya-ss sd-scripts' make_bucket_resolutions: 64x64 px in 16 px steps is 16 units of area;
    # width w units gets height 16 // w units, both ways round, plus the square; sides kept in [32, 128].
    expected = {(128, 32), (32, 128), (80, 48), (48, 80), (64, 64), (32, 96), (96, 32), (32, 112), (112, 32)}
    assert set(bucket_sizes(64 * 64, 32, 128, 16)) == expected
    # kohya's SD 1.x buckets at 512 px (defaults 256..1024, step 64), as (width, height): some known members.
    at_512 = {(w, h) for h, w in bucket_sizes(512 * 512, 256, 1024, 64)}
    assert {(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (1024, 256)} <= at_512
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in at_512)
    assert nearest_bucket(48, 96, bucket_sizes(64 * 64, 32, 128, 16)) == (48, 80)  # 2:1 -> 5:3, not 3:1
    assert bucket_sizes(512 * 512, 768, 1024, 64) == []


def test_every_batch_comes_from_one_bucket() -> None:
    bucket_of = [0, 0, 1, 2, 2]
    stream = ExampleStream(5, 3, TEMPLATES, TOKEN, True, 7, bucket_of=bucket_of, batch_size=4)
    # Per bucket, 6, 3 and 6 slots round up to whole batches of 4: 8 + 4 + 8.
    assert stream.epoch_length == 20
    for start in range(0, 3 * stream.epoch_length, 4):
        assert len({bucket_of[stream[i].image_index] for i in range(start, start + 4)}) == 1
    seen = [stream[i].image_index for i in range(stream.epoch_length)]
    assert all(seen.count(image) >= 3 for image in range(5))  # every image, every repeat


# --- training runs on the tiny pipelines ---------------------------------------------------------------


@dataclass
class Recorded:
    examples: list[Example]
    tokenized: dict[int, list[str]]  # per tokenizer: every caption it was given, in order
    latent_shapes: list[tuple[int, ...]]
    time_ids: list[torch.Tensor]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    """Records each training batch's examples, the captions each tokenizer was given, and the UNet's inputs."""
    seen = Recorded([], {}, [], [])
    real_loss, real_predict = recipe.denoising_loss, loss.predict
    import textinv.models.conditioning as conditioning

    real_tokenize = conditioning.tokenize

    def recording_loss(model: Any, parts: Any, tokenizer: Any, latents: Any, examples: Any, *rest: Any) -> Any:
        seen.examples.extend(examples)
        return real_loss(model, parts, tokenizer, latents, examples, *rest)

    from diffusers import UNet2DConditionModel

    real_unet_forward = UNet2DConditionModel.forward
    in_training_step = [False]

    def recording_unet(unet: Any, *args: Any, added_cond_kwargs: Any = None, **kwargs: Any) -> Any:
        # SDXL's time ids as the UNet receives them, in training steps only (not held-out evaluation's calls).
        if in_training_step[0] and added_cond_kwargs is not None:
            seen.time_ids.append(added_cond_kwargs["time_ids"])
        return real_unet_forward(unet, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    def recording_predict(model: Any, parts: Any, captions: Any, noisy: torch.Tensor, *rest: Any, **kw: Any) -> Any:
        seen.latent_shapes.append(tuple(noisy.shape))
        in_training_step[0] = True
        try:
            return real_predict(model, parts, captions, noisy, *rest, **kw)
        finally:
            in_training_step[0] = False

    def recording_tokenize(tokenizer: Any, captions: Any, *rest: Any) -> Any:
        seen.tokenized.setdefault(id(tokenizer), []).extend(captions)
        return real_tokenize(tokenizer, captions, *rest)

    monkeypatch.setattr(recipe, "denoising_loss", recording_loss)
    monkeypatch.setattr(loss, "predict", recording_predict)
    monkeypatch.setattr(conditioning, "tokenize", recording_tokenize)
    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_unet)
    yield seen


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data-families")
    return {family: build_tiny_pipeline(root / family, family) for family in ("sd1", "sd2-v", "sdxl", "zh-bert")}


def _image(path: Path, size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def _captioned_folder(root: Path, chinese: bool) -> Path:
    folder = root / "captioned"
    folder.mkdir()
    _image(folder / "a.png", (64, 64), (200, 30, 30))
    _image(folder / "b.png", (64, 64), (30, 200, 30))
    _image(folder / "c.png", (64, 64), (30, 30, 200))  # no caption file: the template alone
    tags = ("红色", "盒子", "很大", "闪亮") if chinese else ("red", "box", "large", "shiny")
    separator = "，" if chinese else ", "  # Chinese captions are written with full-width commas
    (folder / "a.txt").write_text(separator.join(["[name]", *tags]), encoding="utf-8")
    (folder / "b.txt").write_text(separator.join(tags), encoding="utf-8")
    return folder


def _data_run(model: Path, images: Path, out: Path, **options: Any) -> Any:
    settings = {"train_batch_size": 4, "max_train_steps": 3, "only_save_embeds": True, "eval_steps": 0, **options}
    config = train_config(model, images, out, **settings)
    return textinv.train(config, show_progress=False)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "zh-bert"])
def test_the_captions_fed_are_what_the_files_and_flags_say(
    family: str, family_models: dict[str, Path], recorder: Recorded, tmp_path: Path
) -> None:
    chinese = family == "zh-bert"
    images = _captioned_folder(tmp_path, chinese)
    separator = "，" if chinese else ", "
    tags = (images / "b.txt").read_text(encoding="utf-8").split(separator)
    rules = dict(
        caption_extension=".txt",
        shuffle_caption=True,
        keep_tokens=1,
        caption_tag_dropout_rate=0.3,
        caption_dropout_rate=0.25,
        repeats=20,
    )
    result = _data_run(family_models[family], images, tmp_path / "out", **rules)
    fed = [example.caption for example in recorder.examples]
    # Every tokenizer (SDXL has two) was given exactly these captions.
    assert all(captions == fed for captions in recorder.tokenized.values()) and len(recorder.tokenized) == (
        2 if family == "sdxl" else 1
    )
    record = json.loads((result.output_dir / "run.json").read_text())
    templates = {template.format(TOKEN) for template in templates_for("object", record["identity"]["language"])}
    for example in recorder.examples:
        caption, image = example.caption, example.image_index
        if image == 2 or caption in templates:  # c.png has no caption; a dropped caption leaves a template
            assert caption in templates
        elif image == 0:  # "[name], tags": the kept first tag is the placeholder, then some tags in any order
            head, *rest = caption.split(separator)
            assert head == TOKEN and len(set(rest)) == len(rest) and set(rest) <= set(tags)
        else:  # a template, then the first tag kept in place, then some of the others
            template, _, words = caption.partition(separator)
            assert template in templates
            assert words.split(separator)[0] == tags[0] and set(words.split(separator)) <= set(tags)
    assert len(set(fed)) > 4, fed  # shuffled and dropped, not one caption again and again
    assert record["identity"]["data"]["captions"]["source"] == ".txt caption files"
    assert record["identity"]["data"]["captions"]["images_with_caption"] == 2
    # The same seed feeds the same captions.
    recorder.examples.clear()
    _data_run(family_models[family], images, tmp_path / "again", **rules)
    assert [example.caption for example in recorder.examples] == fed


@pytest.mark.parametrize("family", ["sd1", "sdxl", "zh-bert"])
def test_a_template_file_feeds_its_templates(
    family: str, family_models: dict[str, Path], recorder: Recorded, tmp_path: Path
) -> None:
    images = tmp_path / "named"
    images.mkdir()
    _image(images / "01-red box.png", (64, 64), (200, 30, 30))
    _image(images / "2-blue ball.png", (64, 64), (30, 30, 200))
    templates = tmp_path / "subject_filewords.txt"
    templates.write_text("a photo of [name], [filewords]\n[filewords] by [name]\n", encoding="utf-8")
    result = _data_run(family_models[family], images, tmp_path / "out", template_file=str(templates))
    words = {0: "red box", 1: "blue ball"}
    for example in recorder.examples:
        assert example.caption in {
            f"a photo of {TOKEN}, {words[example.image_index]}",
            f"{words[example.image_index]} by {TOKEN}",
        }
    assert all(captions == [e.caption for e in recorder.examples] for captions in recorder.tokenized.values())
    record = json.loads((result.output_dir / "run.json").read_text())
    assert record["identity"]["data"]["captions"]["source"] == "template file subject_filewords.txt with file names"


def _three_aspect_ratios(folder: Path) -> Path:
    folder.mkdir()
    _image(folder / "square.png", (64, 64), (30, 30, 200))
    _image(folder / "tall.png", (48, 96), (30, 200, 30))
    _image(folder / "wide.png", (96, 48), (200, 30, 30))
    return folder


BUCKETS = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
# By hand, as in test_buckets_follow_kohyas_rule: square -> 64x64, tall 48x96 -> 48 wide x 80 high, wide -> 80x48.
BUCKET_OF = {"square.png": (64, 64), "tall.png": (80, 48), "wide.png": (48, 80)}  # (height, width)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_buckets_train_each_image_uncropped_at_its_bucket(
    family: str, family_models: dict[str, Path], recorder: Recorded, tmp_path: Path
) -> None:
    images = _three_aspect_ratios(tmp_path / "images")
    _data_run(family_models[family], images, tmp_path / "out", train_batch_size=2, max_train_steps=6, **BUCKETS)
    names = [path.name for path in discover_images(images)]
    expected = {(h // 8, w // 8) for h, w in BUCKET_OF.values()}
    assert {shape[-2:] for shape in recorder.latent_shapes} == expected  # every bucket trained
    for batch in range(0, len(recorder.examples), 2):  # a batch's examples are one bucket's
        pair = recorder.examples[batch : batch + 2]
        assert len({BUCKET_OF[names[example.image_index]] for example in pair}) == 1


def test_no_crop_with_buckets_the_edges_reach_the_latent(family_models: dict[str, Path], tmp_path: Path) -> None:
    plain, striped = tmp_path / "plain" / "wide.png", tmp_path / "striped" / "wide.png"
    for path in (plain, striped):
        path.parent.mkdir()
    picture = np.full((48, 96, 3), 128, dtype=np.uint8)
    Image.fromarray(picture).save(plain)
    picture[:, :6] = (255, 0, 0)  # a stripe at the left edge
    Image.fromarray(picture).save(striped)
    # Buckets: the view is the whole image, so the stripe is in the view's first columns.
    view = load_sized_views([striped], [BUCKET_OF["wide.png"]], False, "bilinear")[0]
    assert view.shape == (3, 48, 80) and view[0, :, 0].min() > 0.9 and view[1, :, 0].max() < -0.9
    # A center-cropped square view cuts the stripe away.
    with Image.open(striped) as opened:
        cropped = to_tensor(make_view(opened.convert("RGB"), 64, 64, True, "bilinear"))
    assert cropped[0, :, 0].max() < 0.1
    # Through the VAE: the stripe changes the bucketed latent's left edge; the cropped latent not at all.
    parts = load_model_parts(str(family_models["sd1"]))
    for crop, size, differs in ((False, BUCKET_OF["wide.png"], True), (True, (64, 64), False)):
        means = []
        for path in (plain, striped):
            views = load_sized_views([path], [size], crop, "bilinear")
            cache = LazyLatentCache(parts.vae, views, False, deterministic=True)
            means.append(cache.sample(0, False, torch.Generator().manual_seed(0)))
        assert bool((means[0][..., 0] - means[1][..., 0]).abs().max() > 1e-3) == differs


def test_sdxl_time_ids_carry_each_images_original_size(
    family_models: dict[str, Path], recorder: Recorded, tmp_path: Path
) -> None:
    images = _three_aspect_ratios(tmp_path / "images")
    _data_run(family_models["sdxl"], images, tmp_path / "out", train_batch_size=2, max_train_steps=6, **BUCKETS)
    originals = {"square.png": (64, 64), "tall.png": (96, 48), "wide.png": (48, 96)}  # (height, width)
    names = [path.name for path in discover_images(images)]
    assert len(recorder.time_ids) == 6
    for batch, time_ids in enumerate(recorder.time_ids):
        for example, row in zip(recorder.examples[2 * batch : 2 * batch + 2], time_ids):
            name = names[example.image_index]
            assert row.tolist() == [*originals[name], 0, 0, *BUCKET_OF[name]]


def test_without_the_data_options_the_run_is_as_before(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    """The data options at their defaults change nothing: same vectors, no data identity, the old order."""
    plain = textinv.train(train_config(tiny_model, train_images, tmp_path / "a", eval_steps=0), show_progress=False)
    explicit = train_config(
        tiny_model,
        train_images,
        tmp_path / "b",
        eval_steps=0,
        latent_sampling="random",
        caption_dropout_rate=0.0,
        keep_tokens=0,
        min_bucket_reso=256,
    )
    again = textinv.train(explicit, show_progress=False)
    assert same_vectors(again.embedding.vectors["text_encoder"], plain.embedding.vectors["text_encoder"])
    assert json.loads((tmp_path / "a" / "run.json").read_text())["identity"]["data"] is None


# --- masks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_setup(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("alpha")
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 255, (64, 64, 3))
    Image.fromarray(rgba).save(folder / "a-transparent.png")  # alpha 0 everywhere
    rgba[:, :32, 3] = 255  # left half visible
    Image.fromarray(rgba).save(folder / "b-left-half.png")
    Image.fromarray(rgba[..., :3]).save(folder / "c-opaque.png")
    config = train_config(tiny_model, folder, folder / "out", alpha_mask=True)
    config.validate()
    parts = load_model_parts(str(tiny_model))
    paths = discover_images(folder)
    data = builders.image_data(config, paths)
    latents = builders.load_latents(config, parts, paths, torch.device("cpu"), data)
    trainable = add_placeholder(parts, TOKEN, 1, "toy")
    return {"parts": parts, "latents": latents, "weights": data.weights, "trainable": trainable, "folder": folder}


def _gradient(setup: dict[str, Any], image_index: int, weights: Any) -> torch.Tensor:
    trainable = setup["trainable"]
    trainable.zero_grad(set_to_none=True)
    example = Example(0, image_index, False, f"a photo of {TOKEN}", noise_seed=123)
    parts = setup["parts"]
    denoising_loss(
        trainable, parts, None, setup["latents"], [example], torch.device("cpu"), LossSettings(), weights
    ).backward()
    return trainable.vectors.grad.clone()


def test_a_fully_transparent_image_gives_exactly_zero_gradient(masked_setup: dict[str, Any]) -> None:
    assert torch.count_nonzero(_gradient(masked_setup, 0, masked_setup["weights"])) == 0
    assert torch.count_nonzero(_gradient(masked_setup, 0, None)) > 0  # the same example, unmasked, does move


def test_a_half_masked_image_gives_the_gradient_of_its_visible_half(masked_setup: dict[str, Any]) -> None:
    weighted = _gradient(masked_setup, 1, masked_setup["weights"])
    # The same example's loss written out: the plain MSE over the left half of the latent (4 of its 8 columns).
    trainable, parts = masked_setup["trainable"], masked_setup["parts"]
    trainable.zero_grad(set_to_none=True)
    example = Example(0, 1, False, f"a photo of {TOKEN}", noise_seed=123)
    scheduler = parts.noise_scheduler
    latent, noise, timestep = example_draws(
        example, masked_setup["latents"], ObjectiveFor(parts, LossSettings()), LossSettings()
    )
    noisy = scheduler.add_noise(latent[None], noise[None], timestep)
    target = loss_target(scheduler, latent[None], noise[None], timestep)
    from textinv.models.conditioning import predict

    prediction = predict(trainable, parts, [example.caption], noisy, timestep, torch.device("cpu"))
    F.mse_loss(prediction[..., :4], target[..., :4]).backward()
    assert torch.allclose(weighted, trainable.vectors.grad, rtol=1e-4, atol=1e-9)
    # An opaque image weighs 1 everywhere: the plain loss.
    assert torch.equal(_gradient(masked_setup, 2, masked_setup["weights"]), _gradient(masked_setup, 2, None))


def test_a_mask_folder_gives_the_weights_the_alpha_channel_gives(
    masked_setup: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    with Image.open(masked_setup["folder"] / "b-left-half.png") as rgba:
        rgba.convert("RGB").save(images / "b-left-half.jpg")
        rgba.getchannel("A").save(masks / "b-left-half.png")  # same stem, another extension
    config = train_config(tiny_model, images, tmp_path / "out", mask_dir=str(masks))
    config.validate()
    data = builders.image_data(config, discover_images(images))
    builders.load_latents(config, masked_setup["parts"], discover_images(images), torch.device("cpu"), data)
    assert torch.equal(data.weights.weights[0], masked_setup["weights"].weights[1])
    assert data.weights.weights[0][..., :4].min() == 1 and data.weights.weights[0][..., 4:].max() == 0


def test_deterministic_latent_sampling_takes_the_mean_and_keeps_the_other_draws(masked_setup: dict[str, Any]) -> None:
    cache = masked_setup["latents"]
    drawn = [torch.Generator().manual_seed(5) for _ in range(2)]
    random = cache.sample(2, False, drawn[0])
    cache.deterministic = True
    try:
        mean = cache.sample(2, False, drawn[1])
    finally:
        cache.deterministic = False
    encoded_mean, _ = cache.encoded[2, 0]
    assert torch.equal(mean, (encoded_mean - cache.shift_factor) * cache.scaling_factor) and not torch.equal(
        mean, random
    )
    assert torch.equal(torch.randn(4, generator=drawn[0]), torch.randn(4, generator=drawn[1]))  # same draws after


# --- the root script and resume ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_the_root_script_trains_with_captions_buckets_and_masks(
    family: str, family_models: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    tiny_model = family_models[family]

    images = _three_aspect_ratios(tmp_path / "images")
    (images / "wide.txt").write_text("[name], red, wide", encoding="utf-8")
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in images.glob("*.png"):
        with Image.open(path) as image:
            Image.new("L", image.size, 255).save(masks / path.name)
    script = Path(__file__).resolve().parents[1] / "train_textual_inversion.py"
    out = tmp_path / "out"
    command = [
        sys.executable, str(script), f"--pretrained_model_name_or_path={tiny_model}", f"--train_data_dir={images}",
        "--placeholder_token=<cat-toy>", "--initializer_token=toy", "--resolution=64", "--train_batch_size=1",
        "--max_train_steps=3", "--lr_warmup_steps=0", "--only_save_embeds", f"--output_dir={out}",
        "--caption_extension=.txt", "--shuffle_caption", "--keep_tokens=1", "--enable_bucket",
        "--min_bucket_reso=32", "--max_bucket_reso=128", "--bucket_reso_steps=16", f"--mask_dir={masks}",
        "--latent_sampling=deterministic",
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    data = json.loads((out / "run.json").read_text())["identity"]["data"]
    assert data["options"]["latent_sampling"] == "deterministic" and data["options"]["mask_dir"] == str(masks)
    assert sorted(data["image_buckets"]) == ["48x80", "64x64", "80x48"] and "masks_sha256" in data
    # The root script's default formats: pdparams too, but not for SDXL, whose two encoders it cannot hold.
    assert (out / "learned_embeds.pdparams").is_file() == (family != "sdxl")
    assert (out / "learned_embeds.safetensors").is_file()


class _StopAt(TrainObserver):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: Any, state: Any) -> None:
        if state.step == self.step:
            run.request_stop()


def test_a_resumed_run_with_data_options_matches_an_uninterrupted_one(tiny_model: Path, tmp_path: Path) -> None:
    images = _three_aspect_ratios(tmp_path / "images")
    (images / "wide.txt").write_text("red, wide, flat", encoding="utf-8")
    with Image.open(images / "tall.png") as tall:
        rgba = tall.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    rgba.save(images / "tall.png")
    options = dict(
        train_batch_size=2,
        max_train_steps=6,
        checkpointing_steps=100,
        only_save_embeds=True,
        caption_extension=".txt",
        shuffle_caption=True,
        caption_tag_dropout_rate=0.3,
        alpha_mask=True,
        **BUCKETS,
    )
    whole = textinv.train(train_config(tiny_model, images, tmp_path / "whole", **options), show_progress=False)
    config = train_config(tiny_model, images, tmp_path / "out", **options)
    with pytest.raises(TrainingInterrupted):
        textinv.train(config, observers=[_StopAt(3)], show_progress=False)
    # Another caption is another run: refused.
    (images / "wide.txt").write_text("red, wide, round", encoding="utf-8")
    resume = dict(options, resume_from_checkpoint="latest", seed=None)
    with pytest.raises(UserError, match="captions, buckets, masks"):
        textinv.train(train_config(tiny_model, images, tmp_path / "out", **resume), show_progress=False)
    (images / "wide.txt").write_text("red, wide, flat", encoding="utf-8")
    resumed = textinv.train(train_config(tiny_model, images, tmp_path / "out", **resume), show_progress=False)
    assert same_vectors(resumed.embedding.vectors["text_encoder"], whole.embedding.vectors["text_encoder"])

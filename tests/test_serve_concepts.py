"""``textinv serve`` with several words in one job (--concepts, issue 27): the placeholder field's words, images split
by file name into each word's folder, concepts.toml, each word's file downloaded and loaded for generation; every bad
form refused in one line before anything is kept; a one-word form as it always was.

Driven through ServerState, as tests/test_serve.py does (the page is a thin layer over it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from textinv.config import UserError
from textinv.data.captions import image_captions
from textinv.data.concepts import concept_configs
from textinv.embeddings import read_embeddings
from textinv.events import RUN_FILE
from textinv.serve.errors import render_error
from textinv.serve.jobs import TrainRequest
from textinv.serve.state import GenerateRequest, ServerState
from textinv.serve.uploads import UploadLimits
from textinv.serve.words import Word, assign_images, parse_words, write_concepts_file


def wait_for(condition: Callable[[], bool], timeout: float = 300.0, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The four demo images at 96 px (cheap to decode); the browser names are given per test."""
    from textinv.tiny import demo_images_dir

    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for source in sorted(demo_images_dir().glob("*.jpg")):
        with Image.open(source) as image:
            target = folder / f"upload-{source.stem}"  # no suffix: the server judges the content
            image.convert("RGB").resize((96, 96)).save(target, format="PNG")
        paths.append(target)
    return paths


def named(pictures: list[Path], *names: str) -> list[tuple[str, str]]:
    """Uploads of the pictures (in turn) under the browser file names ``names``."""
    return [(str(pictures[index % len(pictures)]), name) for index, name in enumerate(names)]


def two_word_request(pictures: list[Path], tmp_path: Path, **overrides: object) -> TrainRequest:
    caption = tmp_path / "caption-upload"
    caption.write_text("{} on a red sofa\n", encoding="utf-8")
    images = named(pictures, "cat-toy-1.jpg", "Cat-Toy_2.jpg", "my-style_01.png", "MY-STYLE-02.png")
    values: dict[str, object] = dict(
        images=[*images, (str(caption), "cat-toy-1.txt")],  # a caption file follows its image into its word's folder
        captions="Cat-Toy_2: {} in the garden",
        placeholder_token="<cat-toy>, <my-style>",
        initializer_token="toy painting",
        max_train_steps=2,
        validation_prompt="",
    )
    values.update(overrides)
    return TrainRequest(**values)


# --- the whole job ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_words_train_from_images_split_by_file_name_and_download_and_generate(
    tmp_path: Path, tiny_model: Path, pictures: list[Path]
) -> None:
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    request = two_word_request(
        pictures,
        tmp_path,
        validation_prompt="a {token} on the beach",
        validation_steps=2,
        num_validation_images=1,
        validation_num_inference_steps=2,
    )
    job = state.start(request)
    assert [word.token for word in job.words] == ["<cat-toy>", "<my-style>"] and job.word_images == (2, 2)
    assert job.join(300)
    snap = state.snapshot()
    assert snap.status == "done", snap.message
    assert snap.message == "learned <cat-toy>, <my-style> in 2 steps"
    assert snap.progress_line().endswith("· <cat-toy>, <my-style> learned")

    # Each word's images (and the caption) in its own folder, and concepts.toml naming them.
    folder = job.folder
    stored = sorted(str(p.relative_to(folder)) for p in (folder / "images").rglob("*") if p.is_file())
    # Named by content (PNG uploads: .png), numbered within their word's folder, captions beside them.
    assert stored == [
        "images/cat-toy/00-cat-toy-1.png",
        "images/cat-toy/00-cat-toy-1.txt",
        "images/cat-toy/01-Cat-Toy_2.png",
        "images/cat-toy/01-Cat-Toy_2.txt",
        "images/my-style/00-my-style_01.png",
        "images/my-style/01-MY-STYLE-02.png",
    ]
    assert (folder / "images/cat-toy/01-Cat-Toy_2.txt").read_text(encoding="utf-8") == "{} in the garden\n"
    assert job.config.concepts == str(folder / "concepts.toml") and job.config.placeholder_token == ""
    words = concept_configs(job.config)
    assert [(w.placeholder_token, w.initializer_token) for w in words] == [
        ("<cat-toy>", "toy"),
        ("<my-style>", "painting"),
    ]
    assert [Path(w.train_data_dir) for w in words] == [folder / "images/cat-toy", folder / "images/my-style"]
    assert [w.caption_extension for w in words] == [".txt", None]  # only the word with captions reads them
    assert job.config.validation_prompt == ["a <cat-toy> on the beach", "a <my-style> on the beach"]

    # Both words trained, each into its own file with its own token; run.json says which images were whose.
    out = job.output_dir
    assert not (out / "learned_embeds.safetensors").exists()
    files = (out / "learned_embeds-cat-toy.safetensors", out / "learned_embeds-my-style.safetensors")
    assert snap.embeddings == files and snap.embedding == files[0]
    cat, style = (load_file(str(path)) for path in files)
    assert set(cat) == {"<cat-toy>"} and set(style) == {"<my-style>"}
    record = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    assert [(w["name"], w["initializer_token"], w["images"]) for w in record["concepts"]] == [
        ("cat-toy", "toy", 2),
        ("my-style", "painting", 2),
    ]
    # What training read: both captions of <cat-toy>'s images, none for <my-style> (a word without data options
    # records no data section at all).
    recorded = [(w.get("data") or {}).get("captions", {}) for w in record["identity"]["concepts"]]
    assert [c.get("images_with_caption", 0) for c in recorded] == [2, 0]
    assert image_captions(sorted((folder / "images/cat-toy").glob("*.png")), ".txt") == [
        "{} on a red sofa",
        "{} in the garden",
    ]
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    rows = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").get_input_embeddings().weight
    for vectors, start in ((cat["<cat-toy>"], "toy"), (style["<my-style>"], "painting")):
        start_row = rows[tokenizer.convert_tokens_to_ids(tokenizer.tokenize(start))[0]]
        assert not torch.equal(vectors[0], start_row)  # it learned: it left where it started
    assert (out / "validation" / "progress.png").is_file()

    # Download: one file per word, each its word's vectors under its name.
    exported = state.export_all("diffusers")
    assert [p.name for p in exported] == ["cat-toy.safetensors", "my-style.safetensors"]
    for path, source in zip(exported, files):
        (back,) = read_embeddings(path)
        (trained,) = read_embeddings(source)
        assert path.is_relative_to(state.downloads_dir) and back.token == trained.token
        assert torch.equal(back.vectors["text_encoder"], trained.vectors["text_encoder"])
    assert [p.name for p in state.export_all("a1111")] == ["cat-toy.pt", "my-style.pt"]

    # Generate: both words loaded; {token} names them all.
    outcome = state.generate(GenerateRequest(prompt="a {token} backpack", num_inference_steps=2, num_images=1))
    assert len(outcome.images) == 1
    assert "of 'a <cat-toy> <my-style> backpack' with <cat-toy>, <my-style>" in outcome.message
    vocabulary = state._pipeline.tokenizer.get_vocab()
    assert "<cat-toy>" in vocabulary and "<my-style>" in vocabulary
    alone = state.generate(GenerateRequest(prompt="a photo of <my-style>", num_inference_steps=2, num_images=1))
    assert "note" not in alone.message
    neither = state.generate(GenerateRequest(prompt="a photo", num_inference_steps=2, num_images=1))
    assert neither.message.endswith("; note: the prompt does not contain <cat-toy> or <my-style>")


@pytest.mark.slow
def test_two_words_stop_and_resume(tmp_path: Path, tiny_model: Path, pictures: list[Path]) -> None:
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    job = state.start(two_word_request(pictures, tmp_path, max_train_steps=20))
    wait_for(lambda: state.snapshot().step >= 2, what="step 2")
    state.stop()
    assert job.join(300)
    stopped = state.snapshot()
    assert stopped.status == "stopped" and 2 <= stopped.step < 20, stopped
    names = ["learned_embeds-cat-toy.safetensors", "learned_embeds-my-style.safetensors"]
    assert sorted(p.name for p in (job.output_dir / f"checkpoint-{stopped.step}").glob("learned_embeds*")) == names
    assert [p.name for p in stopped.embeddings] == names  # a stopped job's words can be downloaded already
    assert [p.name for p in state.export_all("diffusers")] == ["cat-toy.safetensors", "my-style.safetensors"]

    state.resume()
    assert job.join(300)
    done = state.snapshot()
    assert done.status == "done", done.message
    assert done.step == 20 and len(done.losses) == 20 and done.losses[: stopped.step] == stopped.losses
    assert [p.name for p in done.embeddings] == names


# --- refused forms ---------------------------------------------------------------------------------------
TWO = "<cat-toy> <my-style>"
SPLIT = ("cat-toy-1.jpg", "my-style-1.jpg")


@pytest.mark.parametrize(
    ("placeholder", "initializer", "names", "extra", "message"),
    [
        (
            TWO,
            "toy painting",
            ("cat-toy-1.jpg", "dog.jpg", "my-style-1.jpg"),
            {},
            "image 'dog.jpg' belongs to no word: start its file name with cat-toy or my-style (e.g. cat-toy-1.jpg)",
        ),
        (
            "<cat-toy>,<my-style>",
            "toy",
            ("cat-toy-1.jpg", "CAT-TOY-2.jpg"),
            {},
            "no image for <my-style>: upload images whose file names start with my-style (e.g. my-style-1.jpg)",
        ),
        (
            "<cat-toy> <my-style> <wave>",
            "toy, painting",
            SPLIT,
            {},
            "3 placeholder words (<cat-toy> <my-style> <wave>) but 2 initializer words (toy painting); give one "
            "initializer word per placeholder word, in the same order, or one for all",
        ),
        ("<cat-toy> <cat-toy>", "toy", SPLIT, {}, "<cat-toy> is in the placeholder field twice; give each word once"),
        (
            "<Cat-Toy> cat-toy",
            "toy",
            SPLIT,
            {},
            "<Cat-Toy> and cat-toy would both write learned_embeds-cat-toy.* (words that differ only in angle brackets "
            "or case give one file name); give them different words",
        ),
        (
            "<cat+toy> <my-style>",
            "toy",
            SPLIT,
            {},
            "placeholder_token '<cat+toy>' cannot name its files (learned_embeds-cat+toy.*): it holds '+'; use "
            "letters, digits, '.', '_' or '-' only, e.g. '<cat-toy>'",
        ),
        (
            TWO,
            "toy",
            SPLIT,
            {"lora_rank": 4},
            "the LoRA (rank 4) trains with one word, and the placeholder field holds 2; train one word, or set the "
            "LoRA rank to 0",
        ),
        (TWO, "toy", (), {}, "no images: drop 3-5 pictures of your object or style"),
    ],
    ids=["image-of-no-word", "word-without-image", "counts", "duplicate", "same-file-name", "invalid", "lora", "none"],
)
def test_a_bad_several_word_form_is_one_line_and_starts_nothing(
    tmp_path: Path,
    tiny_model: Path,
    pictures: list[Path],
    placeholder: str,
    initializer: str,
    names: tuple[str, ...],
    extra: dict[str, int],
    message: str,
) -> None:
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    request = TrainRequest(
        images=named(pictures, *names), placeholder_token=placeholder, initializer_token=initializer, **extra
    )
    with pytest.raises(UserError) as caught:
        state.start(request)
    assert render_error(caught.value) == "error: " + message  # the page's message box, one line
    assert state.snapshot() is None and not (state.work_dir / "jobs").exists()


def test_a_bad_image_of_the_second_word_keeps_nothing_of_the_first(
    tmp_path: Path, tiny_model: Path, pictures: list[Path]
) -> None:
    fake = tmp_path / "fake"
    fake.write_text("not a picture\n", encoding="utf-8")
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    images = [*named(pictures, "cat-toy-1.jpg"), (str(fake), "my-style-1.png")]
    with pytest.raises(UserError, match=r"^'my-style-1.png' is not an image"):
        state.start(TrainRequest(images=images, placeholder_token=TWO, initializer_token="toy"))
    assert state.snapshot() is None and not (state.work_dir / "jobs").exists()


# --- the rules, alone ------------------------------------------------------------------------------------
def test_one_placeholder_word_is_not_a_several_word_form() -> None:
    assert parse_words("<cat-toy>", "toy car") == []  # as before: the initializer is training's to check
    assert parse_words("  <cat-toy>  ", "toy") == []
    assert parse_words("<a>, <b>\n<c>", "x") == [Word("<a>", "x", "a"), Word("<b>", "x", "b"), Word("<c>", "x", "c")]


def test_an_image_goes_to_the_longest_word_its_name_starts_with() -> None:
    words = parse_words("<cat> <cat-toy>", "animal toy")
    uploads = [("x", "cat-toy-1.jpg"), ("x", "Cat_2.png"), ("x", "catalog.png"), ("x", "C:\\photos\\CAT-TOY.jpg")]
    assert assign_images(uploads, words, UploadLimits()) == [1, 0, 0, 1]
    with pytest.raises(UserError, match=r"^5 images is too many; give at most 4"):
        assign_images(uploads + uploads[:1], words, UploadLimits(max_images=4))


def test_the_concepts_file_reads_back_as_written(tmp_path: Path) -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as a package (what textinv.data.concepts reads with)
        import tomli as tomllib  # type: ignore[no-redef]

    words = [Word("<a.b>", 'to"y\\\x7f', "a.b"), Word("<猫>", "cat", "猫")]
    path = write_concepts_file(tmp_path, words, [0, 1, 1], {1: "a caption"}, "job-001")
    tables = tomllib.loads(path.read_text(encoding="utf-8"))["concept"]
    assert tables == [
        {"placeholder_token": "<a.b>", "initializer_token": 'to"y\\\x7f', "train_data_dir": "images/a.b"},
        {
            "placeholder_token": "<猫>",
            "initializer_token": "cat",
            "train_data_dir": "images/猫",
            "caption_extension": ".txt",
        },
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["concepts.toml"]  # written atomically: no temporary left


# --- one word: as it always was --------------------------------------------------------------------------
@pytest.mark.slow
def test_one_word_keeps_one_folder_and_learned_embeds(tmp_path: Path, tiny_model: Path, pictures: list[Path]) -> None:
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    # Names need not start with the word; a comma-free single word is the whole field, as before.
    images = named(pictures, "cat-toy-1.jpg", "dog.jpg", "03.jpg")
    job = state.start(
        TrainRequest(
            images=images,
            placeholder_token=" <cat-toy> ",
            initializer_token="toy",
            max_train_steps=2,
            validation_prompt="",
        )
    )
    assert job.join(300)
    snap = state.snapshot()
    assert snap.status == "done" and snap.message == "learned <cat-toy> in 2 steps", snap.message
    assert job.words == () and job.config.concepts is None and job.config.placeholder_token == "<cat-toy>"
    assert not (job.folder / "concepts.toml").exists()
    assert sorted(p.name for p in Path(job.config.train_data_dir).iterdir()) == [
        "00-cat-toy-1.png",
        "01-dog.png",
        "02-03.png",
    ]
    assert snap.embeddings == (job.output_dir / "learned_embeds.safetensors",) and snap.embedding == snap.embeddings[0]
    assert [p.name for p in state.export_all("diffusers")] == ["cat-toy.safetensors"]
    assert state.export("a1111").name == "cat-toy.pt"

"""Every model family (issue 7): detect, train, save, load (textinv's and diffusers' loaders), generate.

Each family's tiny pipeline is built through ``textinv tiny --family``, trained 20 steps once per
module (the prompts fed to the tokenizers and the scheduler's velocity calls are recorded), and the
tests below read that run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_config
from textinv import train
from textinv.cli import main
from textinv.config import UserError
from textinv.data.templates import (
    OBJECT_TEMPLATES_EN,
    OBJECT_TEMPLATES_ZH,
    STYLE_TEMPLATES_ZH,
    choose_language,
    templates_for,
)
from textinv.embeddings import TEXT_ENCODER, detect_format
from textinv.events import TrainResult
from textinv.inference.generation import generate, load_pipeline
from textinv.models import conditioning
from textinv.models.families import get_family
from textinv.models.loading import detect_family, load_model_parts, load_pipeline_folder
from textinv.models.tokens import initializer_ids

TOKEN = "<cat-toy>"
# family: (initializer, --language, the template languages the captions must come from)
CASES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "sd1": ("toy", None, ("en",)),
    "sd2": ("toy", None, ("en",)),
    "sd2-v": ("toy", None, ("en",)),
    "sdxl": ("toy", None, ("en",)),
    "zh-bert": ("猫", "zh", ("zh",)),  # a Chinese initializer of one token (WordPiece: one character)
    "zh-xlmr": ("猫", "zh_en", ("en", "zh")),  # one token once SentencePiece's bare "▁" is set aside
}
PIPELINE_CLASSES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd2-v": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "zh-bert": "StableDiffusionPipeline",
    "zh-xlmr": "AltDiffusionPipeline",
}
STEPS = 20


@dataclass
class FamilyRun:
    family: str
    model: Path
    result: TrainResult
    config: Any
    tokenized: list[tuple[Any, list[str]]] = field(default_factory=list)  # (tokenizer, captions) per call
    velocity_calls: int = 0


@pytest.fixture(scope="module", params=tuple(CASES))  # the UNet families; SD3/Flux: tests/test_sd3_flux.py
def family_run(
    request: pytest.FixtureRequest, train_images: Path, tmp_path_factory: pytest.TempPathFactory
) -> FamilyRun:
    family = request.param
    folder = tmp_path_factory.mktemp(f"family-{family}")
    model = folder / "model"
    assert main(["tiny", str(model), "--family", family]) == 0
    initializer, language, _ = CASES[family]
    config = train_config(
        model,
        train_images,
        folder / "out",
        initializer_token=initializer,
        language=language,
        max_train_steps=STEPS,
        checkpointing_steps=10,
        report_to="none",
        eval_steps=0,  # the captions and velocities counted below are the training steps' alone
        # One validation image at the end: the family's own pipeline class over the training's parts.
        validation_prompt=[f"a photo of {TOKEN}"],
        num_validation_images=1,
        validation_num_inference_steps=2,
        validation_steps=STEPS,
    )
    run = FamilyRun(family, model, None, config)  # type: ignore[arg-type]
    real_tokenize = conditioning.tokenize
    from diffusers import DDPMScheduler

    real_velocity = DDPMScheduler.get_velocity

    def recording_tokenize(tokenizer: Any, captions: Any, *rest: Any) -> Any:
        run.tokenized.append((tokenizer, list(captions)))
        return real_tokenize(tokenizer, captions, *rest)

    def counting_velocity(self: Any, *args: Any, **kwargs: Any) -> Any:
        run.velocity_calls += 1
        return real_velocity(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conditioning, "tokenize", recording_tokenize)
        patch.setattr(DDPMScheduler, "get_velocity", counting_velocity)
        run.result = train(config, show_progress=False)
    return run


def _encoder_names(family: str) -> list[str]:
    """The text encoders' pipeline slots (checkpoints keep the vectors by slot)."""
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else [TEXT_ENCODER]


def _encoders(family: str) -> list[tuple[str, str, str]]:
    """(role: the embedding's key, slot, tokenizer slot) of each text encoder."""
    if family == "sdxl":
        return [("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2")]
    return [(TEXT_ENCODER, "text_encoder", "tokenizer")]


def _row(tokenizer: Any, text_encoder: Any, token: str) -> torch.Tensor:
    return text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)].detach()


@pytest.mark.slow
def test_family_is_detected_and_recorded(family_run: FamilyRun) -> None:
    record = json.loads((family_run.result.output_dir / "run.json").read_text())
    assert detect_family(family_run.model).name == family_run.family == record["model"]["family"]
    assert (
        json.loads((family_run.model / "model_index.json").read_text())["_class_name"]
        == PIPELINE_CLASSES[family_run.family]
    )
    assert record["status"] == "completed" and len(family_run.result.losses) == STEPS
    assert len(list((family_run.result.output_dir / "validation").glob(f"step-*{STEPS}/*.png"))) == 1
    assert all(torch.isfinite(torch.tensor(family_run.result.losses)))


@pytest.mark.slow
def test_each_encoder_gets_its_own_vectors_and_only_those_rows_change(family_run: FamilyRun) -> None:
    """The saved pipeline's text encoders equal the base ones but for the placeholder rows."""
    vectors = family_run.result.embedding.vectors
    assert sorted(vectors) == sorted(role for role, _, _ in _encoders(family_run.family))
    base = load_model_parts(str(family_run.model))
    saved = load_model_parts(str(family_run.result.output_dir))
    initializer = CASES[family_run.family][0]
    for base_part, saved_part in zip(base.text_encoders, saved.text_encoders, strict=True):
        assert base_part.name == saved_part.name
        before = base_part.text_encoder.state_dict()
        after = saved_part.text_encoder.state_dict()
        input_rows = base_part.text_encoder.get_input_embeddings().weight
        embedding_key = next(k for k, v in before.items() if v.data_ptr() == input_rows.data_ptr())
        for key, weight in before.items():
            if key != embedding_key:
                assert torch.equal(after[key], weight), (saved_part.name, key)
        old_rows = before[embedding_key].shape[0]
        assert torch.equal(after[embedding_key][:old_rows], before[embedding_key]), saved_part.name
        learned = vectors[saved_part.role]
        assert learned.shape == (1, base_part.text_encoder.get_input_embeddings().weight.shape[1])
        assert torch.equal(after[embedding_key][old_rows:], learned), saved_part.name
        assert torch.equal(_row(saved_part.tokenizer, saved_part.text_encoder, TOKEN), learned[0])
        # Started from the initializer's row in this encoder's own vocabulary, then moved.
        (init_id,) = initializer_ids(base_part.tokenizer, initializer, 1)
        assert not torch.equal(learned[0], before[embedding_key][init_id])
        assert torch.allclose(learned[0], before[embedding_key][init_id], atol=0.2)


@pytest.mark.slow
def test_embedding_loads_in_textinv_and_diffusers_and_generates(family_run: FamilyRun) -> None:
    family, learned = family_run.family, family_run.result.embedding.vectors
    embedding_file = family_run.result.embedding_path
    assert detect_format(embedding_file) == ("sdxl" if family == "sdxl" else "diffusers")
    prompt = "一张<cat-toy>的照片" if family.startswith("zh") else "a photo of a <cat-toy>"

    # textinv's loader into a fresh pipeline of the family: every encoder gets its vectors.
    ours = load_pipeline(str(family_run.model), [embedding_file], device="cpu")
    assert type(ours).__name__ == PIPELINE_CLASSES[family]
    for role, slot, tokenizer_slot in _encoders(family):
        assert torch.equal(_row(getattr(ours, tokenizer_slot), getattr(ours, slot), TOKEN), learned[role][0])
    # No guidance, so one UNet pass a step: the machine is small and shared.
    image = generate(ours, prompt, num_inference_steps=2, guidance_scale=1.0, seed=0, height=64, width=64).images[0]
    assert image.size == (64, 64)

    # diffusers' own load_textual_inversion (SDXL: once per encoder, from clip_l / clip_g).
    theirs = load_pipeline_folder(family_run.model)
    if family == "sdxl":
        state = load_file(str(embedding_file))
        theirs.load_textual_inversion(
            state["clip_l"], token=TOKEN, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer
        )
        theirs.load_textual_inversion(
            state["clip_g"], token=TOKEN, text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2
        )
    else:
        theirs.load_textual_inversion(str(embedding_file))
    for role, slot, tokenizer_slot in _encoders(family):
        assert torch.equal(_row(getattr(theirs, tokenizer_slot), getattr(theirs, slot), TOKEN), learned[role][0])
    theirs.set_progress_bar_config(disable=True)
    # Latents only: decoding was shown above, and the VAE decode is the slowest part at this size.
    latents = theirs(
        prompt,
        num_inference_steps=2,
        guidance_scale=1.0,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.slow
def test_saved_pipeline_also_holds_what_ppdiffusers_reads(family_run: FamilyRun) -> None:
    """Issue 15: each CLIP tokenizer folder also holds paddlenlp's vocab.json / merges.txt / added_tokens.json, and
    each CLIP text encoder names its weights text_model.* (tests/test_ppdiffusers.py loads them in ppdiffusers)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = family_run.result.output_dir
    for name in _encoder_names(family_run.family):
        folder = out / ("tokenizer" if name == TEXT_ENCODER else "tokenizer_2")
        if family_run.family.startswith("zh"):  # WordPiece / Unigram: ppdiffusers reads other files; none written
            assert not (folder / "added_tokens.json").exists()
            continue
        assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        token_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(TOKEN)
        assert (
            json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
            == {TOKEN: token_id}
            == {TOKEN: len(vocab)}
        )
        with safe_open(str(out / name / "model.safetensors"), "pt") as weights:
            assert all(key.startswith("text_model.") or key == "text_projection.weight" for key in weights.keys())


@pytest.mark.slow
def test_captions_fed_to_the_tokenizers_follow_the_language(family_run: FamilyRun) -> None:
    _, language, expected = CASES[family_run.family]
    captions = [caption for _, batch in family_run.tokenized for caption in batch]
    encoders = len(_encoder_names(family_run.family))
    assert len(captions) == STEPS * encoders  # batch 1; SDXL tokenizes each caption with both tokenizers
    if encoders == 2:
        assert [c for _, b in family_run.tokenized[0::2] for c in b] == [
            c for _, b in family_run.tokenized[1::2] for c in b
        ]
    by_language = {
        "en": {template.format(TOKEN) for template in OBJECT_TEMPLATES_EN},
        "zh": {template.format(TOKEN) for template in OBJECT_TEMPLATES_ZH},
    }
    allowed = set().union(*(by_language[part] for part in expected))
    assert set(captions) <= allowed, set(captions) - allowed
    for part in expected:  # zh_en draws from both lists
        assert set(captions) & by_language[part], f"no {part} caption in {captions}"
    if "zh" in expected:
        # The placeholder is one token of the Chinese tokenizer inside Chinese text.
        tokenizer = family_run.tokenized[0][0]
        chinese = next(c for c in captions if c in by_language["zh"])
        ids = tokenizer(chinese, add_special_tokens=False).input_ids
        assert ids.count(tokenizer.convert_tokens_to_ids(TOKEN)) == 1
    record = json.loads((family_run.result.output_dir / "run.json").read_text())
    assert record["identity"]["language"] == (language or "en")


@pytest.mark.slow
def test_v_prediction_trains_against_the_velocity(family_run: FamilyRun) -> None:
    record = json.loads((family_run.result.output_dir / "run.json").read_text())
    if family_run.family == "sd2-v":
        assert record["model"]["prediction_type"] == "v_prediction"
        assert family_run.velocity_calls == STEPS  # one target per step (batch 1)
    else:
        assert record["model"]["prediction_type"] == "epsilon"
        assert family_run.velocity_calls == 0


@pytest.mark.slow
def test_checkpoint_holds_every_encoder_and_resumes_exactly(family_run: FamilyRun, tmp_path: Path) -> None:
    from textinv.training.checkpoints import read_checkpoint

    state, _ = read_checkpoint(family_run.result.output_dir / "checkpoint-10")
    assert sorted(state.vectors_by_encoder) == _encoder_names(family_run.family)
    assert torch.equal(state.vectors, state.vectors_by_encoder[TEXT_ENCODER])
    copy = tmp_path / "out"
    shutil.copytree(family_run.result.output_dir, copy)
    resumed_config = train_config(
        family_run.model,
        Path(family_run.config.train_data_dir),
        copy,
        initializer_token=family_run.config.initializer_token,
        language=family_run.config.language,
        max_train_steps=STEPS,
        checkpointing_steps=10,
        report_to="none",
        seed=None,
        resume_from_checkpoint="checkpoint-10",
        only_save_embeds=True,
    )
    resumed = train(resumed_config, show_progress=False)
    for name, vectors in family_run.result.embedding.vectors.items():
        assert torch.equal(resumed.embedding.vectors[name], vectors), name


# --- without training ------------------------------------------------------------------------------
def test_language_choice_follows_ppdiffusers_then_the_encoder() -> None:
    assert (
        choose_language(None, "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-EN-v0.1", get_family("zh-bert")) == "zh_en"
    )
    assert choose_language(None, "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1", get_family("zh-bert")) == "zh"
    assert choose_language(None, "/models/taiyi", get_family("zh-bert")) == "zh"
    assert choose_language(None, "BAAI/AltDiffusion", get_family("zh-xlmr")) == "zh_en"
    assert choose_language(None, "runwayml/stable-diffusion-v1-5", get_family("sd1")) == "en"
    assert choose_language("en", "my-chinese-model", get_family("zh-bert")) == "en"  # an explicit choice stands
    assert templates_for("style", "zh") == STYLE_TEMPLATES_ZH
    assert templates_for("object", "zh_en") == OBJECT_TEMPLATES_EN + OBJECT_TEMPLATES_ZH


def test_chinese_captions_on_a_clip_model_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="textinv.data.templates"):
        assert choose_language("zh", "runwayml/stable-diffusion-v1-5", get_family("sd1")) == "zh"
        assert choose_language(None, "someone/chinese-finetune", get_family("sd2")) == "zh"  # ppdiffusers' name rule
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and "--language zh on a sd1 model" in warnings[0] and "--language en" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="textinv.data.templates"):
        choose_language("zh_en", "BAAI/AltDiffusion", get_family("zh-xlmr"))
        choose_language(None, "/models/taiyi", get_family("zh-bert"))
        choose_language("en", "runwayml/stable-diffusion-v1-5", get_family("sd1"))
    assert caplog.records == []


def test_bad_language_is_one_line(train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--pretrained_model_name_or_path=x",
            f"--train_data_dir={train_images}",
            "--placeholder_token=<x>",
            "--initializer_token=toy",
            "--language=fr",
            f"--output_dir={tmp_path / 'out'}",
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--language" in lines[0] and "'fr'" in lines[0] and "zh_en" in lines[0]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _fake_pipeline(folder: Path, index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> Path:
    """A pipeline folder of JSON files only: enough for detection, which reads nothing else."""
    _write_json(folder / "model_index.json", index)
    for name, config in configs.items():
        _write_json(folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json"), config)
    for name, spec in index.items():
        if isinstance(spec, list):
            (folder / name).mkdir(exist_ok=True)
    return folder


SD_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD_CONFIGS = {
    "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 768},
    "unet": {"_class_name": "UNet2DConditionModel", "in_channels": 4},
    "scheduler": {"prediction_type": "epsilon"},
}
UNSUPPORTED = {
    # SD3 and Flux are trained since issue 25 (tests/test_sd3_flux.py); other transformer pipelines are not.
    "pixart": (
        {
            "_class_name": "PixArtAlphaPipeline",
            "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        },
        {"text_encoder": {"architectures": ["T5EncoderModel"]}, "scheduler": {}},
        ("PixArtAlphaPipeline", "PixArtTransformer2DModel"),
    ),
    "sdxl-refiner": (
        {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        },
        {},
        (
            "StableDiffusionXLImg2ImgPipeline",
            "without a first text encoder",
            "text_encoder_2: CLIPTextModelWithProjection",
        ),
    ),
    "t5-encoder": (
        {**SD_INDEX, "_class_name": "IFPipeline", "text_encoder": ["transformers", "T5EncoderModel"]},
        {**SD_CONFIGS, "text_encoder": {"architectures": ["T5EncoderModel"]}},
        ("IFPipeline", "T5EncoderModel"),
    ),
    "inpainting": (
        {**SD_INDEX, "_class_name": "StableDiffusionInpaintPipeline"},
        {**SD_CONFIGS, "unet": {"_class_name": "UNet2DConditionModel", "in_channels": 9}},
        ("StableDiffusionInpaintPipeline", "9 input channels"),
    ),
}


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
def test_unsupported_pipeline_is_one_line_naming_what_was_found(kind: str, tmp_path: Path) -> None:
    index, configs, fragments = UNSUPPORTED[kind]
    folder = _fake_pipeline(tmp_path / kind, index, configs)
    with pytest.raises(UserError) as refused:
        detect_family(folder)
    message = str(refused.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unsupported_pipeline_through_the_cli(
    train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index, configs, _ = UNSUPPORTED["pixart"]
    folder = _fake_pipeline(tmp_path / "pixart", index, configs)
    code = main(
        [
            "train",
            f"--pretrained_model_name_or_path={folder}",
            f"--train_data_dir={train_images}",
            "--placeholder_token=<x>",
            "--initializer_token=toy",
            f"--output_dir={tmp_path / 'out'}",
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "PixArtTransformer2DModel" in lines[0] and "SD3/3.5, Flux.1" in lines[0]


def test_sd1_json_detection_by_width_and_activation(tmp_path: Path) -> None:
    sd1 = _fake_pipeline(tmp_path / "sd1", SD_INDEX, SD_CONFIGS)
    sd2 = _fake_pipeline(
        tmp_path / "sd2",
        SD_INDEX,
        {**SD_CONFIGS, "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 1024}},
    )
    sd2_v = _fake_pipeline(
        tmp_path / "sd2v",
        SD_INDEX,
        {
            **SD_CONFIGS,
            "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 1024},
            "scheduler": {"prediction_type": "v_prediction"},
        },
    )
    assert [detect_family(path).name for path in (sd1, sd2, sd2_v)] == ["sd1", "sd2", "sd2-v"]


def test_unknown_tiny_family_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", str(tmp_path / "m"), "--family", "sd4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sd4" in err[0] and "zh-xlmr" in err[0]

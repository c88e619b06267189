"""SD3/3.5 and Flux.1 (issue 25): training moves only the placeholder's rows in each chosen encoder, the files hold
ComfyUI's keys, a file read back gives the encoder outputs of the end of training, resume is exact, diffusers' own
Flux loader agrees with textinv's, and bad --text_encoders are refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import textinv
from conftest import REPO, sigint_on_loss_call, train_config
from textinv.config import TrainingInterrupted
from textinv.embeddings import load_embeddings, read_embeddings
from textinv.models.loading import load_pipeline_folder

FLOW_FAMILIES = ("sd3", "flux")
# The roles each family's encoders have, and the slots that hold them (diffusers' StableDiffusion3Pipeline /
# FluxPipeline attribute names).
SLOTS = {
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
TOKEN = "<q-toy>"


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from textinv.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("flow-models")
    return {family: build_tiny_pipeline(root / family, family=family, seed=0) for family in FLOW_FAMILIES}


def _config(model: Path, images: Path, out: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = dict(
        placeholder_token=TOKEN, max_train_steps=4, learning_rate=5e-2, eval_steps=2, eval_samples=4, report_to="none"
    )
    values.update(overrides)
    return train_config(model, images, out, **values)


def _embedding_rows(folder: Path, slot: str) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(str(next((folder / slot).glob("*.safetensors"))))
    key = next(k for k in weights if k.endswith(("embed_tokens.weight", "token_embedding.weight", "shared.weight")))
    return weights[key]


@pytest.mark.slow
@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_training_moves_only_the_placeholder_rows_and_writes_comfyui_keys(
    family: str, flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    model = flow_models[family]
    validation = dict(validation_prompt=[f"a photo of {TOKEN}"], num_validation_images=1, validation_steps=4)
    result = textinv.train(
        _config(model, train_images, tmp_path / "out", validation_num_inference_steps=2, **validation),
        show_progress=False,
    )
    out = result.output_dir
    # Validation images through the family's own pipeline over training's parts.
    assert len(list((out / "validation" / "step-000004").glob("*.png"))) == 1
    with safe_open(str(out / "learned_embeds.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    assert keys == set(SLOTS[family])  # ComfyUI's keys: clip_l (clip_g) t5xxl
    for role, slot in SLOTS[family].items():
        base, trained = _embedding_rows(model, slot), _embedding_rows(out, slot)
        tokenizer_dir = out / TOKENIZERS[slot]
        from transformers import AutoTokenizer

        token_id = AutoTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids(TOKEN)
        vectors = tensors[role]
        assert vectors.shape == (1, base.shape[1])
        # Every row of the base vocabulary is untouched; the placeholder's row holds the file's vector.
        assert torch.equal(trained[: base.shape[0]][:token_id], base[:token_id])
        assert torch.equal(trained[token_id], vectors[0])
        assert not torch.equal(
            vectors[0],
            base[AutoTokenizer.from_pretrained(model / TOKENIZERS[slot])("toy", add_special_tokens=False).input_ids[0]],
        )


def _prompt_embeds(pipe: Any, prompt: str) -> list[torch.Tensor]:
    """The prompt embeddings the pipeline feeds its transformer (each tokenizer spells the multi-vector token)."""
    from textinv.models.families import prompt_arguments
    from textinv.models.tokens import expand_loaded_tokens

    prompts = prompt_arguments(pipe, prompt, expand_loaded_tokens)
    with torch.no_grad():
        if "prompt_3" in prompts:  # SD3
            out = pipe.encode_prompt(**prompts, device="cpu", do_classifier_free_guidance=False)
            return [out[0], out[2]]
        out = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, device="cpu")
        return [out[0], out[1]]


@pytest.mark.slow
@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_a_file_read_back_gives_the_encoder_outputs_of_the_trained_pipeline(
    family: str, flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    result = textinv.train(
        _config(flow_models[family], train_images, tmp_path / "out", num_vectors=2), show_progress=False
    )
    prompt = f"a photo of {TOKEN} on a beach"
    trained = load_pipeline_folder(result.output_dir)  # the saved pipeline: the learned rows in its encoders
    base = load_pipeline_folder(flow_models[family])
    load_embeddings(base, result.output_dir / "learned_embeds.safetensors")
    for got, expected in zip(_prompt_embeds(base, prompt), _prompt_embeds(trained, prompt)):
        assert torch.equal(got, expected)
    untouched = load_pipeline_folder(flow_models[family])
    assert not torch.equal(_prompt_embeds(untouched, prompt)[0], _prompt_embeds(base, prompt)[0])


@pytest.mark.slow
def test_diffusers_flux_loader_gives_textinvs_prompt_embeddings(
    flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    result = textinv.train(
        _config(flow_models["flux"], train_images, tmp_path / "out", num_vectors=2), show_progress=False
    )
    prompt = f"a photo of {TOKEN}"
    ours = load_pipeline_folder(flow_models["flux"])
    load_embeddings(ours, result.embedding_path)
    theirs = load_pipeline_folder(flow_models["flux"])
    state = load_file(str(result.embedding_path))
    # The lines docs/families.md shows: CLIP-L into text_encoder, T5 into text_encoder_2 / tokenizer_2.
    theirs.load_textual_inversion(
        state["clip_l"], token=TOKEN, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer
    )
    theirs.load_textual_inversion(
        state["t5xxl"], token=TOKEN, text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2
    )
    with torch.no_grad():
        expected = theirs.encode_prompt(prompt=prompt, prompt_2=prompt, device="cpu")
    for got, want in zip(_prompt_embeds(ours, prompt), expected[:2]):
        assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_resume_equals_an_uninterrupted_run(
    family: str, flow_models: dict[str, Path], train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(max_train_steps=6, lr_scheduler="cosine", only_save_embeds=True, checkpointing_steps=100, seed=3)
    full = textinv.train(_config(flow_models[family], train_images, tmp_path / "full", **settings), show_progress=False)
    sigint_on_loss_call(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        textinv.train(_config(flow_models[family], train_images, tmp_path / "cut", **settings), show_progress=False)
    monkeypatch.undo()
    resumed = textinv.train(
        _config(flow_models[family], train_images, tmp_path / "cut", **settings, resume_from_checkpoint="latest"),
        show_progress=False,
    )
    assert set(resumed.embedding.vectors) == set(SLOTS[family])
    for role, vectors in full.embedding.vectors.items():
        assert torch.equal(resumed.embedding.vectors[role], vectors)
    curve = json.loads((tmp_path / "full" / "run.json").read_text())["eval"]["losses"]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["eval"]["losses"] == curve


@pytest.mark.slow
def test_text_encoders_chooses_which_encoders_learn(
    flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    """T5 alone: only t5xxl in the file; the CLIP encoder and tokenizer are saved as they were."""
    result = textinv.train(
        _config(flow_models["sd3"], train_images, tmp_path / "out", text_encoders=["t5xxl"]), show_progress=False
    )
    assert set(read_embeddings(result.embedding_path)[0].vectors) == {"t5xxl"}
    for slot in ("text_encoder", "text_encoder_2"):
        assert torch.equal(_embedding_rows(result.output_dir, slot), _embedding_rows(flow_models["sd3"], slot))
        assert (
            TOKEN
            not in json.loads((result.output_dir / TOKENIZERS[slot] / "tokenizer_config.json").read_text())
            .get("added_tokens_decoder", {})
            .__repr__()
        )


def test_a_text_encoder_the_model_lacks_is_one_line_exit_2_and_nothing_written(
    flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "textinv.cli",
        "train",
        "--pretrained_model_name_or_path",
        str(flow_models["flux"]),
    ]
    command += ["--train_data_dir", str(train_images), "--placeholder_token", TOKEN, "--initializer_token", "toy"]
    command += ["--output_dir", str(out), "--text_encoders", "clip_g"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "textinv: error: --text_encoders clip_g: a Flux.1 model has no 'clip_g' text encoder; give some of: clip_l, t5xxl"
    )
    assert not out.exists()


def test_flux_trained_in_clip_l_alone_warns_what_it_means(
    flow_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from textinv.models.families import check_text_encoders, get_family

    with caplog.at_level(logging.WARNING):
        check_text_encoders(get_family("flux"), ["clip_l"])
        check_text_encoders(get_family("flux"), ["clip_l", "t5xxl"])
        check_text_encoders(get_family("sd3"), ["clip_l"])  # SD3's CLIP-L also gives the sequence: no warning
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "only the pooled vector" in warnings[0] and "t5xxl" in warnings[0]


def test_sizes_must_fit_the_transformers_patches(
    flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    from textinv.config import UserError

    with pytest.raises(UserError, match=r"multiples of 16 px, and this run has 72x72; use --resolution 64"):
        textinv.train(_config(flow_models["sd3"], train_images, tmp_path / "out", resolution=72), show_progress=False)


def test_families_are_recognised_from_their_folders(flow_models: dict[str, Path]) -> None:
    from textinv.models.loading import detect_family

    assert [detect_family(flow_models[name]).name for name in FLOW_FAMILIES] == list(FLOW_FAMILIES)


def test_convert_offers_every_format_textinv_writes() -> None:
    from textinv.cli import CONVERT_FORMATS
    from textinv.embeddings import WRITE_FORMATS

    assert sorted(CONVERT_FORMATS) == sorted(WRITE_FORMATS)


def test_checkpointed_text_encoders_compute_what_they_compute_in_eval_mode(flow_models: dict[str, Path]) -> None:
    """--gradient_checkpointing puts trained encoders in training mode; T5's functional attention dropout must stay off."""
    from types import SimpleNamespace

    from textinv.models.loading import load_model_parts
    from textinv.models.precision import apply_to_text_encoders

    parts = load_model_parts(str(flow_models["flux"]))
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    encoders = [part.text_encoder for part in parts.text_encoders]
    with torch.no_grad():
        before = [encoder(ids)[0] for encoder in encoders]
    tokens = {str(i): SimpleNamespace(text_encoder=encoder) for i, encoder in enumerate(encoders)}
    apply_to_text_encoders(SimpleNamespace(gradient_checkpointing=True), SimpleNamespace(tokens=tokens))
    assert all(encoder.training for encoder in encoders)
    for encoder, expected in zip(encoders, before):
        assert torch.equal(encoder(ids)[0], expected)


def test_untrained_encoders_keep_a_bounded_cache(flow_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from textinv.models import conditioning
    from textinv.models.loading import load_model_parts

    monkeypatch.setattr(conditioning, "FROZEN_CACHE_CAPTIONS", 3)
    parts = load_model_parts(str(flow_models["flux"]))
    trainable = conditioning.add_placeholder(parts, TOKEN, 1, "toy", text_encoders=["t5xxl"])
    clip = parts.text_encoders[0]
    outputs = []
    for word in ("cat", "dog", "toy", "red", "beach", "cat"):
        ids = conditioning.tokenize(clip.tokenizer, [f"a {word}"]).input_ids
        outputs.append(trainable._frozen_output(clip, ids, None).pooled)
        assert len(trainable._frozen_outputs) <= 3
    with torch.no_grad():
        again = clip.text_encoder(conditioning.tokenize(clip.tokenizer, ["a cat"]).input_ids).pooler_output
    assert torch.equal(outputs[-1], again) and torch.equal(outputs[0], again)  # recomputed after eviction: the same


def test_t5_vectors_train_at_a_rate_scaled_to_t5s_rows(flow_models: dict[str, Path]) -> None:
    from textinv.models import conditioning
    from textinv.models.loading import load_model_parts
    from textinv.training.builders import make_optimizer, parameter_groups

    parts = load_model_parts(str(flow_models["sd3"]))
    trainable = conditioning.add_placeholder(parts, TOKEN, 1, "toy")
    clip, t5 = parts.text_encoders[0], parts.text_encoders[2]
    norms = [
        part.text_encoder.get_input_embeddings().weight[: len(part.tokenizer) - 1].norm(dim=1).median()
        for part in (t5, clip)
    ]
    config = train_config(Path("m"), Path("i"), Path("o"), learning_rate=1e-3)
    optimizer = make_optimizer(config, parameter_groups(config, trainable, None), 1)
    assert [len(group["params"]) for group in optimizer.param_groups] == [2, 1]  # CLIP-L + CLIP-G, then T5
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-3 * float(norms[0] / norms[1]), rel=1e-6)
    assert optimizer.param_groups[1]["params"][0] is trainable.tokens["text_encoder_3"].vectors
    given = train_config(Path("m"), Path("i"), Path("o"), learning_rate=1e-3, t5_learning_rate=0.5)
    assert make_optimizer(given, parameter_groups(given, trainable, None), 1).param_groups[1]["lr"] == 0.5

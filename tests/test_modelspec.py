"""Stability AI's ModelSpec keys in every safetensors embedding file textinv writes (issue 27, "Metadata"): a run's
final, snapshot, best and checkpoint files, for a single- and a multi-encoder family; `inspect` shows them; `convert`
carries them; a file without them loads and inspects as before."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import textinv
from conftest import REPO, TEST_DATA, train_config
from textinv.config import TrainConfig
from textinv.embeddings import (
    CLIP_G,
    CLIP_L,
    TEXT_ENCODER,
    Embedding,
    convert,
    describe,
    description_table,
    load_embeddings,
    read_embeddings,
    write_embedding,
)
from textinv.embeddings.modelspec import SPEC_VERSION, WRITTEN_KEYS, file_date, textual_inversion_metadata
from textinv.events import BEST_EMBEDDING_FILE
from textinv.models.families import FAMILIES
from textinv.tiny import TinySpec, build_tiny_pipeline
from textinv.training.file_metadata import base_model_name, run_file_metadata

TOKEN = "<cat-toy>"
STABILITY_AI = "https://github.com/Stability-AI/generative-models"
# ModelSpec's README (Architecture ID Listing) and kohya-ss/sd-scripts' library/sai_model_spec.py.
KOHYA_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-3",
    "flux": "flux-1",
}
RUN = dict(
    max_train_steps=4,
    save_steps=2,
    eval_steps=2,
    eval_samples=2,
    checkpointing_steps=2,
    only_save_embeds=True,
    report_to="none",
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "textinv.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def assert_modelspec(
    path: Path, architecture: str, step: int, base_model: str, resolution: str, since: datetime.datetime
) -> None:
    keys = header(path)
    missing = [key for key in WRITTEN_KEYS if key not in keys]
    assert not missing, f"{path.name} lacks {missing}: {keys}"
    assert keys["modelspec.sai_model_spec"] == SPEC_VERSION == "1.0.0"
    assert keys["modelspec.architecture"] == f"{architecture}/textual-inversion", path.name
    assert keys["modelspec.title"] == keys["modelspec.trigger_phrase"] == TOKEN
    assert keys["modelspec.resolution"] == resolution
    assert keys["textinv_base_model"] == base_model
    assert keys["step"] == str(step), path.name
    written = datetime.datetime.fromisoformat(keys["modelspec.date"].replace("Z", "+00:00"))
    assert written.tzinfo is not None and since <= written <= _now(), keys["modelspec.date"]


# --- a whole run -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_safetensors_file_of_a_run_carries_the_modelspec_keys(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    since = _now()
    output_dir = tmp_path / "out"
    config = train_config(
        tiny_model, train_images, output_dir, embedding_formats=["diffusers", "a1111", "pdparams"], **RUN
    )
    result = textinv.train(config, show_progress=False)
    best_step = json.loads((output_dir / "run.json").read_text())["eval"]["best_step"]
    expected = {
        output_dir / "learned_embeds.safetensors": 4,
        output_dir / "learned_embeds-steps-2.safetensors": 2,
        output_dir / BEST_EMBEDDING_FILE: best_step,
        output_dir / "checkpoint-2" / "learned_embeds.safetensors": 2,
    }
    found = set(output_dir.rglob("*.safetensors"))
    assert found == set(expected), sorted(str(p.relative_to(output_dir)) for p in found)
    for path, step in expected.items():
        assert_modelspec(path, "stable-diffusion-v1", step, tiny_model.name, "64x64", since)
    # The keys do not change what the files hold, and the formats that cannot carry them still load.
    final = read_embeddings(output_dir / "learned_embeds.safetensors")[0]
    assert torch.equal(final.vectors[TEXT_ENCODER], result.embedding.vectors[TEXT_ENCODER])
    assert final.file_metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    for other in ("learned_embeds.pt", "learned_embeds.pdparams", "learned_embeds-steps-2.pt"):
        (loaded,) = read_embeddings(output_dir / other)
        assert loaded.token == TOKEN and loaded.file_metadata == {}  # .pt / .pdparams have no header to hold them


@pytest.mark.slow
def test_an_sdxl_run_writes_the_xl_architecture_into_its_two_encoder_files(tmp_path: Path, train_images: Path) -> None:
    since = _now()
    model = build_tiny_pipeline(tmp_path / "tiny-sdxl", family="sdxl", seed=0)
    output_dir = tmp_path / "out"
    config = train_config(
        model, train_images, output_dir, **{**RUN, "max_train_steps": 2, "save_steps": 1, "eval_steps": 1}
    )
    textinv.train(config, show_progress=False)
    best_step = json.loads((output_dir / "run.json").read_text())["eval"]["best_step"]
    expected = {
        output_dir / "learned_embeds.safetensors": 2,
        output_dir / "learned_embeds-steps-1.safetensors": 1,
        output_dir / BEST_EMBEDDING_FILE: best_step,
    }
    assert set(output_dir.rglob("*.safetensors")) == set(expected)
    for path, step in expected.items():
        with safe_open(str(path), framework="pt") as handle:
            assert set(handle.keys()) == {"clip_l", "clip_g"}  # ComfyUI's / the web UI's SDXL layout
        assert_modelspec(path, "stable-diffusion-xl-v1-base", step, "tiny-sdxl", "64x64", since)
    # And the file loads into an SDXL pipeline, both encoders.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    assert load_embeddings(pipe, output_dir / "learned_embeds.safetensors") == [TOKEN]
    assert TOKEN in pipe.tokenizer.get_vocab() and TOKEN in pipe.tokenizer_2.get_vocab()


def test_the_best_file_rewritten_on_resume_keeps_the_keys(tmp_path: Path) -> None:
    """A resumed run writes the checkpoint's best vectors again (held_out.rewrite_best_files), keys and all."""
    from textinv.training.held_out import HeldOutEvaluation

    config = TrainConfig(str(tmp_path / "base"), "images", TOKEN, "toy", resolution=96)
    evaluation = HeldOutEvaluation(config, held=None, device=torch.device("cpu"))  # type: ignore[arg-type]
    evaluation.best_step, evaluation.best_vectors = 6, {"text_encoder": torch.ones(1, 768)}
    encoder = SimpleNamespace(name="text_encoder", role=TEXT_ENCODER)
    run = SimpleNamespace(output_dir=tmp_path, parts=SimpleNamespace(text_encoders=[encoder], family=FAMILIES["sd2-v"]))
    evaluation.rewrite_best_files(run)  # type: ignore[arg-type]
    keys = header(tmp_path / BEST_EMBEDDING_FILE)
    assert keys["modelspec.architecture"] == "stable-diffusion-v2-768-v/textual-inversion"
    assert (keys["step"], keys["modelspec.resolution"], keys["modelspec.title"]) == ("6", "96x96", TOKEN)


# --- the families' IDs -------------------------------------------------------------------------------------------
def test_each_family_declares_its_modelspec_architecture() -> None:
    architectures = {name: family.modelspec_architecture for name, family in FAMILIES.items()}
    for name, expected in KOHYA_ARCHITECTURES.items():
        assert architectures[name] == expected, name
    # Different inferencing needs, different IDs: the Chinese families' vectors are not SD 1.x's CLIP's.
    assert len(set(architectures.values())) == len(architectures), architectures
    assert all(architectures[name].startswith("stable-diffusion-v1-") for name in ("zh-bert", "zh-xlmr"))
    implementations = {name: family.modelspec_implementation for name, family in FAMILIES.items()}
    assert implementations["flux"] == "https://github.com/black-forest-labs/flux"
    assert all(implementations[name] == STABILITY_AI for name in ("sd1", "sd2", "sd2-v", "sdxl", "sd3"))
    assert implementations["zh-bert"] == implementations["zh-xlmr"] == "diffusers"


def test_the_run_keys_name_the_size_as_width_x_height_and_never_a_local_path(tmp_path: Path) -> None:
    folder = tmp_path / "private" / "my-model"
    folder.mkdir(parents=True)
    config = TrainConfig(str(folder), "images", TOKEN, "toy", width=96, height=64)
    keys = run_file_metadata(config, FAMILIES["flux"])
    assert keys["modelspec.resolution"] == "96x64"  # kohya's "(width)x(height)"
    assert keys["modelspec.architecture"] == "flux-1/textual-inversion"
    assert keys["textinv_base_model"] == "my-model" and "private" not in json.dumps(keys)
    assert base_model_name("stabilityai/stable-diffusion-2-1", "fp16") == "stabilityai/stable-diffusion-2-1@fp16"
    cached = tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert base_model_name(str(cached)) == "runwayml/stable-diffusion-v1-5"


def test_the_date_is_iso_8601_utc_and_source_date_epoch_fixes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert (
        file_date(datetime.datetime(2024, 5, 1, 14, 3, 9, 500, tzinfo=datetime.timezone.utc)) == "2024-05-01T14:03:09Z"
    )
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert file_date() == "2023-11-14T22:13:20Z"
    keys = textual_inversion_metadata(FAMILIES["sd1"], TOKEN, "base", 512, 512)
    assert keys["modelspec.date"] == "2023-11-14T22:13:20Z"


# --- every safetensors writer, inspect, convert --------------------------------------------------------------------
def _sdxl_embedding() -> Embedding:
    keys = textual_inversion_metadata(
        FAMILIES["sdxl"], TOKEN, "stabilityai/sdxl-base", 1024, 1024, "2024-01-02T03:04:05Z"
    )
    vectors = {CLIP_L: torch.randn(2, 768), CLIP_G: torch.randn(2, 1280)}
    return Embedding(TOKEN, vectors, step=30, file_metadata=keys)


@pytest.mark.parametrize("format", ["sdxl", "comfyui", "onetrainer", "diffusers-advanced"])
def test_every_multi_encoder_layout_writes_and_reads_the_keys(tmp_path: Path, format: str) -> None:
    embedding = _sdxl_embedding()
    path = write_embedding(embedding, tmp_path / "e.safetensors", format)
    assert {key: header(path)[key] for key in WRITTEN_KEYS} == embedding.file_metadata
    (read,) = read_embeddings(path)
    assert read.file_metadata == embedding.file_metadata and read.step == 30


def test_single_encoder_safetensors_layouts_write_the_keys_and_pickles_do_not_break(tmp_path: Path) -> None:
    keys = textual_inversion_metadata(FAMILIES["sd1"], TOKEN, "base", 512, 512, "2024-01-02T03:04:05Z")
    embedding = Embedding(TOKEN, {TEXT_ENCODER: torch.randn(3, 768)}, step=5, file_metadata=keys)
    for name, format in (("d.safetensors", "diffusers"), ("a.safetensors", "a1111")):
        path = write_embedding(embedding, tmp_path / name, format)
        assert {key: header(path)[key] for key in WRITTEN_KEYS} == keys, format
        assert header(path)["format"] == "pt" and header(path)["step"] == "5"
        assert read_embeddings(path)[0].file_metadata == keys
    for name in ("p.pt", "b.bin", "x.pdparams"):
        (read,) = read_embeddings(write_embedding(embedding, tmp_path / name))
        assert torch.equal(read.vectors[TEXT_ENCODER], embedding.vectors[TEXT_ENCODER])


def test_diffusers_loads_a_file_with_the_keys(tiny_model: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    keys = textual_inversion_metadata(FAMILIES["sd1"], TOKEN, "base", 64, 64)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    embedding = Embedding(TOKEN, {TEXT_ENCODER: torch.randn(2, width)}, step=3, file_metadata=keys)
    path = write_embedding(embedding, tmp_path / "learned_embeds.safetensors")
    pipe.load_textual_inversion(str(path))  # diffusers' own loader ignores the header
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert pipe.tokenizer.unk_token_id not in ids
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, embedding.vectors[TEXT_ENCODER])


def test_inspect_prints_the_keys(tmp_path: Path) -> None:
    path = write_embedding(_sdxl_embedding(), tmp_path / "learned_embeds.safetensors")
    info = describe(path)
    assert info["tokens"][0]["metadata"]["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    for key, value in _sdxl_embedding().file_metadata.items():
        assert any(line.split() == [key, value] for line in result.stdout.splitlines()), (key, result.stdout)
    json_out = run_cli("inspect", str(path), "--json")
    assert json.loads(json_out.stdout)["tokens"][0]["metadata"]["modelspec.resolution"] == "1024x1024"


def test_convert_carries_the_keys_and_renames_the_token_in_them(tmp_path: Path) -> None:
    source = write_embedding(_sdxl_embedding(), tmp_path / "learned_embeds.safetensors")
    out = convert(source, tmp_path / "onetrainer.safetensors", to="onetrainer", token="<other>")
    keys = header(out)
    assert keys["modelspec.title"] == keys["modelspec.trigger_phrase"] == keys["name"] == "<other>"
    assert keys["modelspec.date"] == "2024-01-02T03:04:05Z"  # the model's date, not the conversion's
    assert keys["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    single = Embedding(TOKEN, {TEXT_ENCODER: torch.randn(1, 768)}, step=2, file_metadata={"modelspec.title": TOKEN})
    pt = convert(write_embedding(single, tmp_path / "s.safetensors"), tmp_path / "s.pt")
    back = convert(pt, tmp_path / "back.safetensors")  # through a .pt, which holds no header: nothing to carry
    assert "modelspec.title" not in header(back) and read_embeddings(back)[0].token == TOKEN


# --- files without the keys ----------------------------------------------------------------------------------------
def test_a_file_without_metadata_still_loads_inspects_and_converts(tiny_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.safetensors"
    save_file({TOKEN: torch.randn(2, TinySpec().text_hidden_size)}, str(bare))  # no header metadata at all
    sdxl = tmp_path / "bare-sdxl.safetensors"
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(sdxl))
    committed = TEST_DATA / "embeddings" / "padmanabh_pop_art.bin"
    for path in (bare, sdxl, committed):
        (embedding,) = read_embeddings(path)
        assert embedding.file_metadata == {}
        info = describe(path)
        assert info["tokens"][0]["metadata"] == {}
        assert "metadata of" not in description_table(info)
    assert header(convert(bare, tmp_path / "c.safetensors")) == {"format": "pt"}  # nothing made up
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    assert load_embeddings(pipe, bare) == [TOKEN]


@pytest.mark.interop
def test_third_party_safetensors_without_modelspec_inspect_as_before(interop_data: Path) -> None:
    for name in ("Kaleidia_SDXL-Detail.safetensors", "ttekcor_learned_embeds.safetensors"):
        info = describe(interop_data / "embeddings" / name)
        assert all(entry["metadata"] == {} for entry in info["tokens"]), name

"""SD3 and Flux through everything else that works for SD1/SDXL (issue 25): the root script, captions, buckets and
masks, bf16 export exactness, the frozen encoders' cache, generation, the model card's code, several processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import textinv
from conftest import REPO, train_config
from textinv.models.families import get_family

TOKEN = "<q-toy>"


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from textinv.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("flow-models")
    return {family: build_tiny_pipeline(root / family, family=family, seed=1) for family in ("sd3", "flux")}


def _config(model: Path, images: Path, out: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = dict(placeholder_token=TOKEN, max_train_steps=3, eval_steps=0, report_to="none")
    values.update(overrides)
    return train_config(model, images, out, **values)


@pytest.mark.slow
def test_the_root_script_trains_flux_with_ppdiffusers_flags(
    flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "train_textual_inversion.py")]
    command += ["--pretrained_model_name_or_path", str(flow_models["flux"]), "--train_data_dir", str(train_images)]
    command += ["--placeholder_token", TOKEN, "--initializer_token", "toy", "--resolution", "64"]
    command += ["--max_train_steps", "2", "--train_batch_size", "1", "--output_dir", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Its default pdparams holds one encoder's vectors: left out with a line, the ComfyUI file written.
    assert "writing diffusers' learned_embeds.safetensors only" in done.stderr
    assert sorted(load_file(str(out / "learned_embeds.safetensors"))) == ["clip_l", "t5xxl"]
    assert not (out / "learned_embeds.pdparams").exists()


@pytest.mark.slow
def test_captions_buckets_and_masks_train_flux_at_its_resolution_rules(
    flow_models: dict[str, Path], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("wide", (128, 64)), ("tall", (64, 128)), ("square", (96, 96))):
        image = Image.new("RGBA", size, (200, 40, 40, 255))
        image.putpixel((0, 0), (0, 0, 0, 0))  # one transparent pixel: --alpha_mask has something to read
        image.save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a {name} red toy, [name]", encoding="utf-8")
    result = textinv.train(
        _config(
            flow_models["flux"],
            images,
            tmp_path / "out",
            resolution=96,
            enable_bucket=True,
            min_bucket_reso=64,
            max_bucket_reso=192,
            bucket_reso_steps=32,
            caption_extension=".txt",
            alpha_mask=True,
            train_batch_size=1,
        ),
        show_progress=False,
    )
    record = json.loads((result.output_dir / "run.json").read_text())
    buckets = record["identity"]["data"]["image_buckets"]
    assert len(buckets) == 3 and len(set(buckets)) == 3  # three aspect ratios, three buckets
    assert all(int(side) % 16 == 0 for bucket in buckets for side in bucket.split("x"))
    assert all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.slow
def test_bf16_run_saves_the_base_encoder_bytes_and_the_learned_rows(
    flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    model = flow_models["flux"]
    result = textinv.train(_config(model, train_images, tmp_path / "out", mixed_precision="bf16"), show_progress=False)
    for slot, role in (("text_encoder", "clip_l"), ("text_encoder_2", "t5xxl")):
        # Saved CLIP encoders name their weights text_model.* (what ppdiffusers reads; issue 15).
        base = {k.removeprefix("text_model."): v for k, v in load_file(str(model / slot / "model.safetensors")).items()}
        saved = load_file(str(result.output_dir / slot / "model.safetensors"))
        saved = {k.removeprefix("text_model."): v for k, v in saved.items()}
        key = next(k for k in base if k.endswith(("token_embedding.weight", "shared.weight")))
        rows = base[key].shape[0]
        assert saved[key].dtype == base[key].dtype == torch.float32
        assert torch.equal(saved[key][:rows], base[key])
        assert torch.equal(saved[key][rows:], result.embedding.vectors[role])
        assert all(torch.equal(saved[name], tensor) for name, tensor in base.items() if name != key)


@pytest.mark.slow
def test_an_encoder_without_vectors_runs_once_per_caption(
    flow_models: dict[str, Path], train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD3 trained in T5 alone: each CLIP encoder sees each distinct caption once, T5 every step."""
    import dataclasses

    calls: dict[str, list[bytes]] = {"clip_l": [], "clip_g": [], "t5xxl": []}
    real = get_family("sd3").call_encoder

    def counting(role: Any, encoder: Any, ids: torch.Tensor, mask: Any) -> Any:
        calls[role.role].extend(row.numpy().tobytes() for row in ids)
        return real(role, encoder, ids, mask)

    family = dataclasses.replace(get_family("sd3"), call_encoder=counting)
    monkeypatch.setattr("textinv.models.families.FAMILIES", {**textinv.models.families.FAMILIES, "sd3": family})
    monkeypatch.setattr("textinv.models.families.SD3", family)
    result = textinv.train(
        _config(flow_models["sd3"], train_images, tmp_path / "out", text_encoders=["t5xxl"], max_train_steps=6),
        show_progress=False,
    )
    assert set(result.embedding.vectors) == {"t5xxl"}
    assert len(calls["t5xxl"]) == 6  # batch 1, 6 steps: the trained encoder runs every time
    for role in ("clip_l", "clip_g"):
        assert len(calls[role]) == len(set(calls[role])) == len(set(calls["t5xxl"])), role


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_uses_the_word_and_the_model_card_code_loads_it(
    family: str, flow_models: dict[str, Path], train_images: Path, tmp_path: Path
) -> None:
    from textinv.inference.generation import generate, load_pipeline
    from textinv.observers.model_card import render_model_card

    model = flow_models[family]
    config = _config(model, train_images, tmp_path / "out", num_vectors=2)
    result = textinv.train(config, show_progress=False)
    prompt = f"a photo of {TOKEN}"
    settings: dict[str, Any] = dict(num_inference_steps=2, seed=0, height=64, width=64)
    plain = generate(load_pipeline(str(model), device="cpu"), prompt, **settings).images[0]
    pipe = load_pipeline(str(model), [result.embedding_path], device="cpu")
    learned = generate(pipe, prompt, **settings).images[0]
    assert learned.size == (64, 64)
    assert plain.tobytes() != learned.tobytes()  # the same prompt: only the word's vectors differ

    # The card's code, as printed, loads both encoders' rows.
    record = json.loads((result.output_dir / "run.json").read_text())
    card = render_model_card(config, record, result.output_dir)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)  # type: ignore[union-attr]
    scope: dict[str, Any] = {}
    exec("\n".join(line for line in code.splitlines() if not line.startswith("image = ")), scope)
    carded = scope["pipe"]
    for role, slot, tokenizer_slot in ((e.role, e.slot, e.tokenizer_slot) for e in get_family(family).encoders):
        tokenizer, encoder = getattr(carded, tokenizer_slot), getattr(carded, slot)
        ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), result.embedding.vectors[role])


@pytest.mark.multiprocess
def test_two_processes_train_flux_as_one(flow_models: dict[str, Path], train_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613"]
    command += [str(REPO / "train_textual_inversion.py"), "--pretrained_model_name_or_path", str(flow_models["flux"])]
    command += ["--train_data_dir", str(train_images), "--placeholder_token", TOKEN, "--initializer_token", "toy"]
    command += ["--resolution", "64", "--max_train_steps", "2", "--train_batch_size", "1", "--output_dir", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["num_processes"] == 2
    digests = record["vectors_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks hold different vectors"

"""The seed's own script trains in the Paddle venv, and its file works in textinv (issue 29).

ppdiffusers' ``train_textual_inversion.py``, unmodified (the reference scripts' folder: $TEXTINV_REFERENCE_DIR or
../shared/reference), runs as a user runs it, through bench/reference_scripts.py, for 10 steps at 64 px on a
Paddle-format copy of the tiny pipeline and the test images. Its ``learned_embeds.pdparams`` must then load in textinv
through ``inspect``, ``convert`` and ``generate``, and give the text-encoder output ppdiffusers gives with it (loaded
the seed's way: tests/paddle_snippets.py snippet 2).

Needs the Paddle venv (`make paddle-venv`) and the reference scripts: without them these tests skip, saying how to get
them; with TEXTINV_REQUIRE_INTEROP=1 (CI) they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import reference_env
from conftest import REPO
from reference_scripts import run_seed_script

pytestmark = [pytest.mark.interop(needs="paddle"), pytest.mark.slow]

TOKEN = "<bench>"  # bench/reference_scripts.py's placeholder
PROMPT = f"a photo of {TOKEN}"
STEPS = 10
NEW_TOKEN_ID = 49408  # the first id after CLIP's 49408-word vocabulary
# Measured: 1.07e-06 at most (float32 kernels of two frameworks); 1e-5 leaves a margin of about 10x.
HIDDEN_TOLERANCE = 1e-5


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "textinv.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def pdparams(
    paddle_python: Path,  # first: without the venv or the scripts the tests skip before building anything
    reference_scripts: Path,
    tiny_model: Path,
    train_images: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The seed's script's learned_embeds.pdparams after 10 steps (one thread: CI's machines are shared)."""
    root = tmp_path_factory.mktemp("seed-script")
    paddle_model = reference_env.convert_to_paddle(tiny_model, root / "tiny-sd1-paddle", paddle_python)
    run = run_seed_script(
        paddle_model, train_images, 64, STEPS, 1, root / "run", paddle_python=paddle_python, reference=reference_scripts
    )
    assert run.exit_code == 0, run.stderr_tail
    assert len(run.step_seconds) == STEPS and run.framework_threads == 1  # every optimizer step seen; one thread
    out = Path(run.output_dir) / "out"
    assert sorted(path.name for path in out.glob("learned_embeds*")) == ["learned_embeds.pdparams"]  # no snapshot
    return out / "learned_embeds.pdparams"


@pytest.fixture(scope="module")
def paddle(
    paddle_python: Path, pdparams: Path, ppdiffusers_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """In ppdiffusers (one subprocess): what paddle.load reads from the file, and snippet 2's text-encoder output."""
    folder = tmp_path_factory.mktemp("seed-arrays")
    jobs = {
        "prompt": PROMPT,
        "token": TOKEN,
        "snippet1": [],
        "snippet2": [{"base": str(ppdiffusers_base), "embeds": str(pdparams)}],
        "arrays": [{"embeds": str(pdparams), "folder": str(folder)}],
    }
    (folder / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    command = [str(paddle_python), str(REPO / "tests" / "paddle_snippets.py"), str(folder / "jobs.json")]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=reference_env.paddle_environment()
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, (completed.stdout[-2000:], completed.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT ") :])


def paddle_vector(paddle: dict[str, Any]) -> np.ndarray:
    (entry,) = paddle["arrays"][0]
    assert entry["token"] == TOKEN
    return np.load(entry["npy"])


def test_inspect_reports_the_token_and_shape(pdparams: Path, paddle: dict[str, Any]) -> None:
    result = run_cli("inspect", str(pdparams), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["format"] == "pdparams"
    (word,) = info["tokens"]
    vector = paddle_vector(paddle)
    assert vector.shape == (1, 32)  # the tiny CLIP's width, one vector
    # A .pdparams names no encoder: one role, the text encoder; 32 wide fits no real family.
    expected = {"token": TOKEN, "num_vectors": 1, "counts": {"text_encoder": 1}, "dims": {"text_encoder": 32}}
    assert {key: word[key] for key in expected} == expected
    assert word["dtype"] == {"text_encoder": "float32"} and word["family"] == "unknown"
    assert abs(word["norms"]["text_encoder"][0] - float(np.linalg.norm(vector[0]))) < 1e-6


def test_convert_to_safetensors_keeps_the_vector_exactly(
    pdparams: Path, paddle: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    target = tmp_path / "learned_embeds.safetensors"
    result = run_cli("convert", str(pdparams), str(target))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"wrote {target} (diffusers)"
    converted = load_file(str(target))
    assert list(converted) == [TOKEN]
    expected = torch.from_numpy(paddle_vector(paddle))
    assert converted[TOKEN].dtype == torch.float32 and torch.equal(converted[TOKEN], expected)
    # 10 steps moved it from where the seed's script started it: the initializer word's row.
    start = load_file(str(tiny_model / "text_encoder" / "model.safetensors"))
    rows = next(value for key, value in start.items() if key.endswith("token_embedding.weight"))
    from transformers import CLIPTokenizer

    (toy,) = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")("toy", add_special_tokens=False).input_ids
    assert not torch.equal(converted[TOKEN][0], rows[toy])


def generate(model: Path, output_dir: Path, *extra: str) -> tuple[np.ndarray, str]:
    result = run_cli(
        "generate", "--model", str(model), "--prompt", PROMPT, "--seed", "3", "--num_inference_steps", "3",
        "--height", "64", "--width", "64", "--cpu_threads", "1", "--output_dir", str(output_dir), *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = output_dir.glob("*.png")
    return np.asarray(Image.open(path)), result.stderr


def test_generate_uses_the_learned_word(pdparams: Path, tiny_model: Path, tmp_path: Path) -> None:
    with_word, log = generate(tiny_model, tmp_path / "with", "--embeddings", str(pdparams))
    without, _ = generate(tiny_model, tmp_path / "without")
    assert with_word.shape == (64, 64, 3) and not np.array_equal(with_word, without)
    # generate's report of the file: the word, one vector for the text encoder (textinv.embeddings.load).
    # textinv warns of no word it cannot place; this checks that nothing but the loading line mentions the word.
    mentions = [line for line in log.splitlines() if TOKEN in line or "warn" in line.lower()]
    assert mentions == [f"loaded {TOKEN} (text_encoder 1 vector(s)) from {pdparams}"]


def test_text_encoder_output_matches_ppdiffusers(pdparams: Path, paddle: dict[str, Any], tiny_model: Path) -> None:
    from textinv.inference.generation import load_pipeline

    pipe = load_pipeline(str(tiny_model), [pdparams], device="cpu")
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids)[0][0].numpy()
    (seed_way,) = paddle["snippet2"]
    assert seed_way["file_tokens"] == [TOKEN] and seed_way["token_id"] == NEW_TOKEN_ID
    assert ids.input_ids[0].tolist() == seed_way["input_ids"] and seed_way["input_ids"].count(NEW_TOKEN_ID) == 1
    row = pipe.text_encoder.get_input_embeddings().weight[NEW_TOKEN_ID].detach()
    assert torch.equal(row, torch.tensor(seed_way["row"], dtype=torch.float32))
    difference = float(np.abs(hidden - np.array(seed_way["hidden"], dtype=np.float32)).max())
    assert difference <= HIDDEN_TOLERANCE, f"max abs difference {difference:.3g}"

"""ppdiffusers (PaddlePaddle) users load textinv's results unchanged: the seed's two snippets, in real ppdiffusers.

textinv trains a tiny pipeline through the root train_textual_inversion.py; then the Paddle venv's python
(`make paddle-venv`, or $TEXTINV_PADDLE_PYTHON) runs tests/paddle_snippets.py on the result, as a subprocess:

1. ``StableDiffusionPipeline.from_pretrained(output_dir)`` and a 2-step generation;
2. the base model, plus ``paddle.load("learned_embeds(-steps-N).pdparams")`` written into new token rows.

Without the venv these tests skip, saying how to build it; with TEXTINV_REQUIRE_INTEROP=1 (CI) they fail (the
fixtures paddle_python and ppdiffusers_base are in tests/conftest.py, shared with tests/test_seed_script.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import reference_env
from conftest import REPO

pytestmark = [pytest.mark.interop(needs="paddle"), pytest.mark.slow]

TOKEN = "<cat-toy>"
PROMPT = f"a photo of {TOKEN}"
SAVE_STEPS, MAX_STEPS = 2, 4


def train_with_root_script(base: Path, images: Path, output_dir: Path, *extra: str) -> Path:
    command = [
        sys.executable, "-u", str(REPO / "train_textual_inversion.py"),
        f"--pretrained_model_name_or_path={base}", f"--train_data_dir={images}",
        "--learnable_property=object", f"--placeholder_token={TOKEN}", "--initializer_token=toy",
        "--resolution=64", "--train_batch_size=1", f"--max_train_steps={MAX_STEPS}", "--learning_rate=5e-3",
        "--lr_warmup_steps=0", f"--save_steps={SAVE_STEPS}", "--seed=42", f"--output_dir={output_dir}", *extra,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def runs(ppdiffusers_base: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The seed's command line (default layout), and the same run with --ppdiffusers_weights."""
    root = tmp_path_factory.mktemp("ppd-runs")
    return {
        "default": train_with_root_script(ppdiffusers_base, train_images, root / "textual_inversion_cat"),
        "native": train_with_root_script(ppdiffusers_base, train_images, root / "native", "--ppdiffusers_weights"),
    }


@pytest.fixture(scope="module")
def paddle(
    paddle_python: Path, runs: dict[str, Path], ppdiffusers_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Both snippets in real ppdiffusers, in one subprocess (importing Paddle takes seconds)."""
    default, native = runs["default"], runs["native"]
    jobs = {
        "prompt": PROMPT,
        "token": TOKEN,
        "snippet1": [
            {"folder": str(default), "from_diffusers": True},  # the default layout: the README's one argument
            {"folder": str(native), "from_diffusers": False},  # the seed's snippet 1, literally
            {"folder": str(native), "from_diffusers": True},  # the habit must not break a native folder
        ],
        "snippet2": [
            {"base": str(ppdiffusers_base), "embeds": str(default / f"learned_embeds-steps-{SAVE_STEPS}.pdparams")},
            {"base": str(ppdiffusers_base), "embeds": str(default / "learned_embeds.pdparams")},
        ],
    }
    jobs_file = tmp_path_factory.mktemp("ppd-jobs") / "jobs.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
    env = reference_env.paddle_environment()  # offline; nothing of our venv leaks into Paddle's
    command = [str(paddle_python), str(REPO / "tests" / "paddle_snippets.py"), str(jobs_file)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, (completed.stdout[-2000:], completed.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT ") :])


def transformers_facts(folder: Path) -> dict[str, Any]:
    """What diffusers/transformers make of a folder: the prompt's ids, the token's id and the hidden state."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids)[0][0].numpy()
    return {
        "input_ids": ids.input_ids[0].tolist(),
        "token_id": pipe.tokenizer.convert_tokens_to_ids(TOKEN),
        "hidden": hidden,
    }


def vector(path: Path) -> np.ndarray:
    return load_file(str(path))[TOKEN].numpy()


def test_snippet1_from_diffusers_keeps_the_token_and_the_text_encoder(paddle: dict, runs: dict[str, Path]) -> None:
    got, expected = paddle["snippet1"][0], transformers_facts(runs["default"])
    assert TOKEN in got["pieces"] and got["token_id"] == expected["token_id"] == 49408  # one piece, one id
    assert got["input_ids"] == expected["input_ids"] and got["input_ids"].count(got["token_id"]) == 1
    np.testing.assert_allclose(
        np.array(got["row"])[None], vector(runs["default"] / "learned_embeds.safetensors"), atol=1e-7
    )
    assert np.abs(np.array(got["hidden"]) - expected["hidden"]).max() < 1e-4  # the real weights, not random ones
    assert got["image_finite"] and got["image_shape"] == [1, 64, 64, 3]


def test_snippet1_runs_literally_on_ppdiffusers_weights(paddle: dict, runs: dict[str, Path]) -> None:
    expected = transformers_facts(runs["native"])
    for got in paddle["snippet1"][1:]:  # without from_diffusers=True, then with it
        assert got["token_id"] == expected["token_id"] and got["input_ids"] == expected["input_ids"]
        np.testing.assert_allclose(
            np.array(got["row"])[None], vector(runs["native"] / "learned_embeds.safetensors"), atol=1e-7
        )
        assert np.abs(np.array(got["hidden"]) - expected["hidden"]).max() < 1e-4
        assert got["image_finite"]


def test_ppdiffusers_weights_change_nothing_for_diffusers(runs: dict[str, Path]) -> None:
    """Same seed, same vectors: the extra files leave what diffusers/transformers load as it was."""
    default, native = transformers_facts(runs["default"]), transformers_facts(runs["native"])
    assert default["input_ids"] == native["input_ids"]
    assert np.array_equal(default["hidden"], native["hidden"])


def test_snippet2_pdparams_snapshot_rows_and_hidden_state(paddle: dict, runs: dict[str, Path]) -> None:
    snapshot, final = paddle["snippet2"]
    default = runs["default"]
    assert snapshot["file_tokens"] == [TOKEN] and snapshot["file_shapes"] == [[1, 32]]
    snapshot_vector = vector(default / f"learned_embeds-steps-{SAVE_STEPS}.safetensors")
    np.testing.assert_allclose(np.array(snapshot["row"])[None], snapshot_vector, atol=1e-7)
    assert snapshot["token_id"] == 49408 and snapshot["input_ids"].count(49408) == 1
    # The final .pdparams on the base gives what the saved pipeline gives (snippet 2 == snippet 1).
    np.testing.assert_allclose(np.array(final["row"])[None], vector(default / "learned_embeds.safetensors"), atol=1e-7)
    assert np.abs(np.array(final["hidden"]) - np.array(paddle["snippet1"][0]["hidden"])).max() < 1e-4

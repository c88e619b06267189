"""The command line as a real subprocess: exit codes end to end, and good input does what it says.

The full bad-input table is tests/test_bad_inputs.py (in-process, same code path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, train_args


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "textinv.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def test_missing_train_data_dir(tiny_model: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli(*train_args(tiny_model, tmp_path / "nope", tmp_path / "out")), "nope", "does not exist")


@pytest.mark.slow
def test_some_unreadable_images_warn_and_train_goes_on(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in train_images.iterdir():
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "corrupt.png").write_bytes(b"\x89PNG garbage")
    result = run_cli(*train_args(tiny_model, folder, tmp_path / "out", "--only_save_embeds"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "corrupt.png" in result.stderr and "skipping 1 unreadable" in result.stderr
    assert (tmp_path / "out" / "learned_embeds.safetensors").is_file()


def test_wrong_type_and_unknown_flag(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli(*train_args(tiny_model, train_images, tmp_path / "out", "--learning_rate=fast")), "fast")
    assert_user_error(run_cli(*train_args(tiny_model, train_images, tmp_path / "out", "--lr_scheduler=steep")), "steep")
    assert_user_error(run_cli(*train_args(tiny_model, train_images, tmp_path / "out", "--frobnicate")), "--frobnicate")


def test_output_dir_with_another_run_is_refused(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "learned_embeds.safetensors").write_bytes(b"precious")
    result = run_cli(*train_args(tiny_model, train_images, out))
    assert_user_error(result, "already holds another run", "--overwrite_output_dir")
    assert (out / "learned_embeds.safetensors").read_bytes() == b"precious"


@pytest.mark.slow
def test_tiny_then_generate_is_reproducible(tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    assert run_cli("tiny", str(model)).returncode == 0
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert_user_error(run_cli("tiny", str(model)), "not empty")
    common = [
        "generate",
        "--model",
        str(model),
        "--prompt",
        "a toy",
        "--num_images",
        "2",
        "--num_inference_steps",
        "3",
        "--seed",
        "5",
        "--height",
        "64",
        "--width",
        "64",
    ]
    first = run_cli(*common, "--output_dir", str(tmp_path / "a"))
    second = run_cli(*common, "--output_dir", str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    a = sorted((tmp_path / "a").glob("*.png"))
    b = sorted((tmp_path / "b").glob("*.png"))
    assert [p.name for p in a] == ["a-toy-seed5.png", "a-toy-seed6.png"]
    pixels = [np.asarray(Image.open(p)) for p in a + b]
    assert pixels[0].shape == (64, 64, 3)
    assert np.array_equal(pixels[0], pixels[2]) and np.array_equal(pixels[1], pixels[3])
    assert not np.array_equal(pixels[0], pixels[1])
    # A second run into the same folder never overwrites the first images.
    again = run_cli(*common, "--output_dir", str(tmp_path / "a"))
    assert again.returncode == 0
    assert len(list((tmp_path / "a").glob("*.png"))) == 4


def test_generate_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli("generate", "--model", str(tmp_path / "none"), "--prompt", "x"), "does not exist")
    assert_user_error(
        run_cli("generate", "--model", str(tiny_model), "--prompt", "x", "--num_images", "0"), "--num_images 0"
    )
    assert_user_error(
        run_cli(
            "generate",
            "--model",
            str(tiny_model),
            "--prompt",
            "x",
            "--embeddings",
            str(tmp_path / "missing.safetensors"),
        ),
        "missing.safetensors",
    )


@pytest.mark.slow
def test_generate_with_embedding_changes_the_image(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from textinv import cli

    # One prompt throughout: only the embedding differs between the runs, so a loader that dropped the file (the
    # prompt then reads "<", "thing", ">") or kept the token but not its vector gives equal images.
    vectors = {
        "a": torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 5,
        "b": torch.randn(1, 32, generator=torch.Generator().manual_seed(1)) * 5,
    }
    common = [
        "generate",
        "--model",
        str(tiny_model),
        "--num_inference_steps",
        "3",
        "--seed",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--prompt",
        "a <thing>",
    ]
    images = {}
    for name in ("a", "b", "none"):
        extra = []
        if name in vectors:
            save_file({"<thing>": vectors[name]}, str(tmp_path / f"{name}.safetensors"))
            extra = ["--embeddings", str(tmp_path / f"{name}.safetensors")]
        # In this process: three child processes would spend ~30 s importing torch and diffusers again.
        assert cli.main([*common, *extra, "--output_dir", str(tmp_path / name)]) == 0
        images[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))))
    assert not np.array_equal(images["a"], images["none"])  # the embedding is used at all
    assert not np.array_equal(images["a"], images["b"])  # and its vector, not only its token


@pytest.mark.slow
def test_demo_writes_embedding_and_image(tmp_path: Path) -> None:
    result = run_cli("demo", "--output_dir", str(tmp_path / "demo"), "--steps", "30")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "demo" / "learned_embeds.safetensors").is_file()
    images = list((tmp_path / "demo" / "samples").glob("*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)
    # Running the demo again replaces its own previous results instead of refusing.
    assert run_cli("demo", "--output_dir", str(tmp_path / "demo"), "--steps", "5").returncode == 0

"""textinv leaves glibc's allocator at its defaults (issue 29: docs/speed.md's table); where memory comes from must not
change what is learned. Each run is a process of its own, since an allocator setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_args


def _train(model: Path, images: Path, output_dir: Path, **allocator_env: str) -> tuple[dict, tuple[float, float]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.update(allocator_env)
    args = train_args(model, images, output_dir, "--max_train_steps=4", "--eval_steps=0", "--only_save_embeds")
    finished = subprocess.run([sys.executable, "-m", "textinv.cli", *args], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    record = json.loads((output_dir / "run.json").read_text())
    assert record["steps_done"] == 4
    return load_file(str(output_dir / "learned_embeds.safetensors")), (
        record["final_loss"],
        record["lowest_train_loss"],
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's MALLOC_* variables")
def test_where_memory_comes_from_leaves_the_vectors_and_losses_bit_identical(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    defaults, default_losses = _train(tiny_model, train_images, tmp_path / "glibc")
    # Every block of 4 KiB or more mapped fresh and unmapped when freed (what the 1 MiB threshold textinv set before
    # issue 29 did to SD-sized activations), and one arena: other addresses, other reuse.
    mapped, mapped_losses = _train(
        tiny_model, train_images, tmp_path / "mmap", MALLOC_MMAP_THRESHOLD_="4096", MALLOC_ARENA_MAX="1"
    )
    assert mapped_losses == default_losses
    assert defaults.keys() == mapped.keys() == {"<cat-toy>"}
    assert torch.equal(defaults["<cat-toy>"], mapped["<cat-toy>"])

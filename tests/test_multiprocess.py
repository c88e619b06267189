"""Many processes through the engines users already have: accelerate launch and torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import textinv
from conftest import REPO, train_config
from textinv.training.checkpoints import list_checkpoints

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # 2-process training under accelerate and torchrun

BIN = Path(sys.executable).parent
# 3 images x 2 repeats; 2 processes x batch 1 x accumulation 2 = 4 examples a step, with --scale_lr.
SHARED_FLAGS = dict(
    max_train_steps=4,
    learning_rate=1e-3,
    scale_lr=True,
    lr_warmup_steps=0,
    repeats=2,
    seed=5,
    gradient_accumulation_steps=2,
    checkpointing_steps=2,
    only_save_embeds=True,
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _flags(tiny_model: Path, train_images: Path, output_dir: Path, batch_size: int) -> list[str]:
    flags = [
        f"--pretrained_model_name_or_path={tiny_model}",
        f"--train_data_dir={train_images}",
        "--placeholder_token=<cat-toy>",
        "--initializer_token=toy",
        "--resolution=64",
        f"--train_batch_size={batch_size}",
        f"--output_dir={output_dir}",
    ]
    for name, value in SHARED_FLAGS.items():
        flags.append(f"--{name}" if value is True else f"--{name}={value}")
    return flags


@pytest.fixture(scope="module")
def one_process_twice_the_batch(tiny_model: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    output_dir = tmp_path_factory.mktemp("single") / "out"
    settings = {**SHARED_FLAGS, "train_batch_size": 2}
    result = textinv.train(train_config(tiny_model, train_images, output_dir, **settings), show_progress=False)
    record = json.loads((output_dir / "run.json").read_text())
    return {"vectors": result.embedding.vectors["text_encoder"], "record": record}


def _initializer_row(tiny_model: Path) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    (token_id,) = tokenizer.encode("toy", add_special_tokens=False)
    return encoder.get_input_embeddings().weight[token_id : token_id + 1].detach()


LAUNCHERS = {
    # On a machine without CUDA, accelerate's multi-process launcher is still the one named --multi_gpu.
    "accelerate": lambda port: [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={port}",
    ],
    "torchrun": lambda port: [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port}"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_agree_and_match_one_process_with_twice_the_batch(
    launcher: str, tiny_model: Path, train_images: Path, tmp_path: Path, one_process_twice_the_batch: dict
) -> None:
    output_dir = tmp_path / "out"
    command = [*LAUNCHERS[launcher](_free_port()), str(REPO / "train_textual_inversion.py")]
    command += _flags(tiny_model, train_images, output_dir, batch_size=1)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]

    record = json.loads((output_dir / "run.json").read_text())
    assert record["num_processes"] == 2
    digests = record["vectors_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks hold different vectors"
    # --scale_lr counts processes: the same effective LR as one process with twice the batch.
    assert record["effective_learning_rate"] == pytest.approx(
        one_process_twice_the_batch["record"]["effective_learning_rate"]
    )
    assert record["effective_learning_rate"] == pytest.approx(1e-3 * 4)

    vectors = load_file(output_dir / "learned_embeds.safetensors")["<cat-toy>"]
    reference = one_process_twice_the_batch["vectors"]
    assert not torch.allclose(vectors, _initializer_row(tiny_model), atol=1e-4), "nothing was trained"
    assert (vectors - reference).abs().max().item() < 1e-5
    # The loss each rank saw is all-reduced, so the logged curve is the single-process one.
    assert record["final_loss"] == pytest.approx(one_process_twice_the_batch["record"]["final_loss"], rel=1e-4)

    # Only the main process writes: one line of output, one checkpoint tree with an RNG file per rank.
    assert finished.stdout.count("learned <cat-toy>") == 1
    assert finished.stderr.count("steps, 4 example(s) per step") == 1
    checkpoint = list_checkpoints(output_dir)[-1]
    assert sorted(path.name for path in checkpoint.glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]

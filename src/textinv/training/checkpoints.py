"""Resumable checkpoints: small (the trainable state is tiny), atomic, pruned only when complete.

A checkpoint is a folder ``checkpoint-{step}`` in output_dir holding:

- ``state.pt``: step, placeholder vectors, optimizer and LR-scheduler state, loss history
  (read back with ``torch.load(weights_only=True)``: plain data and tensors only). The vectors
  of every text encoder are under ``vectors_by_encoder`` (SDXL has two); ``vectors`` holds the
  first encoder's, as checkpoints written before SDXL support did (and still read); with fp16, the
  loss scaler's state (``grad_scaler``: its scale and growth tracker, so a resume does not restart at 65536);
- ``rng_state_{rank}.pt``: python, numpy, torch RNG states of each process, and the CUDA RNG state of
  its own GPU only (a resume may see fewer or other GPUs; checkpoints that hold every GPU's still read);
- ``learned_embeds.safetensors``: the vectors at that step, loadable like any embedding.

The folder is assembled under a temporary name and renamed into place, so a checkpoint either
exists whole or not at all.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from textinv.config import UserError
from textinv.embeddings import save_diffusers
from textinv.events import EMBEDDING_FILE, RunContext
from textinv.files import atomic_dir

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.pt"


FIRST_ENCODER = "text_encoder"  # the key of a one-encoder checkpoint's vectors (textinv.embeddings.TEXT_ENCODER)


@dataclass
class CheckpointState:
    step: int
    vectors: torch.Tensor  # the first text encoder's
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    losses: list[float]
    seed: int
    # Every text encoder's vectors by encoder name; empty means {FIRST_ENCODER: vectors}.
    vectors_by_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    # The eval_loss curve and best vectors (textinv.training.held_out); empty without --eval_steps or in older checkpoints.
    held_out: dict[str, Any] = field(default_factory=dict)
    # fp16's torch.amp.GradScaler state_dict(); empty in fp32/bf16 and in older checkpoints.
    grad_scaler: dict[str, Any] = field(default_factory=dict)
    # The LoRA adapters by component (--lora_rank; textinv.training.lora); empty without them.
    lora: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors_by_encoder:
            self.vectors_by_encoder = {FIRST_ENCODER: self.vectors}


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    """``latest`` (the newest in output_dir) or a checkpoint folder path."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(
                f"--resume_from_checkpoint latest: {str(output_dir)!r} has no checkpoint-N folder; "
                "train with --checkpointing_steps N to make some, or drop the flag"
            )
        return checkpoints[-1]
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists():
        path = output_dir / spec
    if (path / STATE_FILE).is_file():
        return path
    found = [checkpoint.name for checkpoint in list_checkpoints(output_dir)]
    there = (
        f"{str(output_dir)!r} has {', '.join(found)} (or give 'latest')"
        if found
        else (
            f"{str(output_dir)!r} has no checkpoint; train with --checkpointing_steps N to make some, or drop the flag"
        )
    )
    if not path.exists():
        raise UserError(f"--resume_from_checkpoint {spec!r} does not exist; {there}")
    raise UserError(f"--resume_from_checkpoint {spec!r} is not a checkpoint folder (no {STATE_FILE}); {there}")


# Not accelerate's save_state/load_state: measured 2026-12-02 (accelerate 1.15) on an embedding row with AdamW, it
# writes 4 files (18.8 KB, 14.5 KB of it random_states_0.pkl) against state.pt + rng_state_N.pt here, and the step,
# losses and held-out state would be register_for_checkpointing objects, which load_state reads back with
# torch.load(weights_only=False): it unpickles files from the output folder, where this module reads weights_only=True.
# Resume is bit-identical as it is (tests/test_resume.py): textinv's own draws use explicit generators, so these global
# states only cover what libraries draw.
def rng_state() -> dict[str, Any]:
    numpy_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU (torch.cuda.current_device()) only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state, in device order
            index = torch.cuda.current_device()
            if index >= len(cuda):
                logger.warning("the checkpoint has no CUDA RNG state for GPU %d; it keeps its own", index)
                return
            cuda = cuda[index]
        torch.cuda.set_rng_state(cuda)


def write_state(folder: Path, state: CheckpointState) -> None:
    torch.save(
        {
            "step": state.step,
            "vectors": state.vectors.detach().cpu(),
            "vectors_by_encoder": {name: tensor.detach().cpu() for name, tensor in state.vectors_by_encoder.items()},
            "optimizer": state.optimizer,
            "lr_scheduler": state.lr_scheduler,
            "losses": list(state.losses),
            "seed": state.seed,
            "held_out": state.held_out,
            "grad_scaler": state.grad_scaler,
            "lora": state.lora,
        },
        folder / STATE_FILE,
    )


def write_rng_state(folder: Path, rank: int) -> None:
    torch.save(rng_state(), folder / f"rng_state_{rank}.pt")


def read_checkpoint(folder: Path, rank: int = 0) -> tuple[CheckpointState, Optional[dict[str, Any]]]:
    """The training state, and this process's RNG state if it was saved."""
    try:
        data = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        rng_file = folder / f"rng_state_{rank}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    except Exception as error:
        raise UserError(
            f"checkpoint {str(folder)!r} cannot be read ({type(error).__name__}); resume from another one"
        ) from None
    state = CheckpointState(
        step=int(data["step"]),
        vectors=data["vectors"],
        optimizer=data["optimizer"],
        lr_scheduler=data["lr_scheduler"],
        losses=[float(x) for x in data["losses"]],
        seed=int(data["seed"]),
        vectors_by_encoder=dict(data.get("vectors_by_encoder") or {}),  # absent in older checkpoints
        held_out=dict(data.get("held_out") or {}),
        grad_scaler=dict(data.get("grad_scaler") or {}),
        lora=dict(data.get("lora") or {}),
    )
    return state, rng


def prune_checkpoints(output_dir: Path, keep: Optional[int]) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep``; returns what was removed."""
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(0, len(checkpoints) - keep)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", path.name, keep)
    return removed


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def save_checkpoint(
    run: RunContext,
    step: int,
    optimizer: Any,
    lr_scheduler: Any,
    losses: list[float],
    embedding: Any,
    held_out: Optional[dict[str, Any]] = None,
    grad_scaler: Optional[dict[str, Any]] = None,
    lora: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``checkpoint-{step}``: every process adds its RNG state to a staging folder, the main process
    renames it into place, then prunes the oldest beyond ``--checkpoints_total_limit``.

    ``embedding`` is the step's vectors as an Embedding (written beside the state, loadable like any); with several
    words (--concepts), ``{file name: Embedding}``, one file each.
    """
    accelerator = run.accelerator
    target = run.output_dir / f"checkpoint-{step}"
    staging = run.output_dir / f".checkpoint-{step}.staging.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_rng_state(staging, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = CheckpointState(
            step=step,
            vectors=run.trainable.vectors.detach().cpu().clone(),
            vectors_by_encoder={
                name: v.detach().cpu().clone() for name, v in run.trainable.vectors_by_encoder().items()
            },
            optimizer=optimizer.state_dict(),
            lr_scheduler=lr_scheduler.state_dict(),
            losses=losses[:step],
            seed=run.seed,
            held_out=held_out or {},
            grad_scaler=grad_scaler or {},
            lora=lora or {},
        )
        with atomic_dir(target) as folder:
            for rng_file in staging.iterdir():
                os.replace(rng_file, folder / rng_file.name)
            write_state(folder, state)
            for name, one in (embedding if isinstance(embedding, dict) else {EMBEDDING_FILE: embedding}).items():
                save_diffusers(one, folder / name)
        shutil.rmtree(staging, ignore_errors=True)
        prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit)
        logger.info("saved %s", target)
    accelerator.wait_for_everyone()
    return target

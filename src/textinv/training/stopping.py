"""Stopping a run cleanly: SIGINT/SIGTERM finish the step and checkpoint; non-finite values and running out
of device memory stop it (one line, the last good vectors kept).

Every process stops at the same step (:func:`agreed_stop`), so a multi-process checkpoint is whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import TrainingInterrupted, UserError
from textinv.events import RunContext

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or the vectors stopped being finite."""


DIVERGED_HINT = "Lower --learning_rate (e.g. by 10x), turn on --max_grad_norm 1.0, or train in fp32"


class TrainingOutOfMemory(UserError):
    """The device ran out of memory (a UserError: one line, exit 2; the settings are the user's to change)."""


def out_of_memory_text(config: Any, device: Any, step: Optional[int], where: str = "") -> str:
    """One line: where memory ran out, what was asked for, what to change, where the last good vectors are."""
    gpu = ""
    if getattr(device, "type", "") == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        gpu = f" ({torch.cuda.get_device_name(device)}, {total:.0f} GiB)"
    when = f"at step {step}" if step is not None else "while loading the model"
    size = f"{config.image_width}x{config.image_height}"
    weights = "fp32" if config.mixed_precision in (None, "no") else config.mixed_precision
    asked = f"batch {config.train_batch_size} at {size}, frozen weights {weights}"
    hints = []
    if config.train_batch_size > 1:
        smaller = max(1, config.train_batch_size // 4)
        keep = config.train_batch_size // smaller * config.gradient_accumulation_steps
        hints.append(f"--train_batch_size {smaller} --gradient_accumulation_steps {keep} (the same examples per step)")
    if not config.gradient_checkpointing:
        hints.append("--gradient_checkpointing")
    if config.mixed_precision in (None, "no"):
        hints.append("--mixed_precision bf16 (fp16 on GPUs without bf16)")
    fix = ", ".join(hints) if hints else "a smaller --resolution or a GPU with more memory"
    resume = "; then run again with --resume_from_checkpoint latest" if where else ""
    return f"out of memory on {device}{gpu} {when} ({asked}); try {fix}{where}{resume}"


class StoppedBeforeFirstStep(BaseException):
    """A SIGINT/SIGTERM while the run was still setting up (loading the model, encoding images): it stops at once.
    A BaseException, so that no ``except Exception`` in a loader swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(run: Any) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once. While ``run`` is
    ``setting_up`` (before the first step) they stop at once: :class:`StoppedBeforeFirstStep`.

    ``run`` is anything with a ``stop_requested`` attribute (a RunContext, or the recipe before it has one).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if getattr(run, "setting_up", False):  # before the first step there is nothing to finish or keep
            raise StoppedBeforeFirstStep(signum)
        if run.stop_requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop_requested = signum
        logger.warning("%s received: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    # A signal the launcher set to be ignored (background jobs of a non-interactive shell ignore
    # SIGINT) stays ignored: whoever started us asked for that.
    watched = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, ask_to_stop) for sig in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def agreed_stop(run: RunContext) -> int:
    """The stop signal if any process was asked to stop (all processes stop at the same step)."""
    requested = run.stop_requested or 0
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([requested], device=run.accelerator.device)
        requested = int(run.accelerator.reduce(flag, reduction="sum").item() and max(requested, signal.SIGTERM))
    return requested


@contextlib.contextmanager
def setting_up(recipe: Any, output_dir: Path) -> Iterator[None]:
    """The run's set-up, up to its first step. Anything that ends it there (a wrong data folder, an existing token, a
    bad resume, running out of memory, a SIGINT/SIGTERM while the model loads) leaves no output folder this run
    created: nothing was learned yet. Then ``recipe.setting_up`` turns off, and signals wait for a step's end."""
    missing = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    created = missing[-1] if missing else None  # the outermost folder the run will create (out/, or a/b/ of a/b/out)
    try:
        yield
    except torch.OutOfMemoryError:
        _remove_if_created(created)
        raise TrainingOutOfMemory(out_of_memory_text(recipe.config, getattr(recipe, "device", None), None)) from None
    except StoppedBeforeFirstStep as stopped:
        _remove_if_created(created)
        raise TrainingInterrupted(0, 0, stopped.signum, None) from None
    except BaseException:
        _remove_if_created(created)
        raise
    recipe.setting_up = False


def _remove_if_created(created: Optional[Path]) -> None:
    """Remove the folder this run created (the main process's: the others never create it)."""
    if created is None or int(os.environ.get("RANK", "0")) != 0 or not created.is_dir():
        return
    shutil.rmtree(created, ignore_errors=True)
    logger.debug("removed %s: the run ended before its first step", created)

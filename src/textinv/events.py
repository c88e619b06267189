"""What a training run tells the code that watches it: the observer interface and the data it sees.

This module imports nothing else of textinv, so observers (progress, validation, logs, model card,
hub, the web page) and the training recipe can both depend on it without depending on each other.
The recipe fills a :class:`RunContext`, then calls every :class:`TrainObserver` at the start, after
each step and at the end.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# The files of a run that observers and the web page refer to by name.
EMBEDDING_FILE = "learned_embeds.safetensors"
BEST_TAG = "-best"  # names the files of the lowest eval_loss's step: its word's and (pivotal tuning) its LoRA's
BEST_EMBEDDING_FILE = f"learned_embeds{BEST_TAG}.safetensors"  # the vectors of the lowest eval_loss (issue 20)
RUN_FILE = "run.json"


def best_embedding_file(concept: str = "") -> str:
    """The best step's word file: ``learned_embeds-best.safetensors``, or ``learned_embeds-<concept>-best...`` for
    one word of several (--concepts)."""
    return BEST_EMBEDDING_FILE if not concept else f"learned_embeds-{concept}{BEST_TAG}.safetensors"


@dataclass
class StepState:
    """One finished optimizer step, as the observers see it."""

    step: int
    max_steps: int
    loss: float
    lr: float
    step_seconds: float  # the step alone: observers' own time (validation rounds) is not in it
    eval_loss: Optional[float] = None  # set on the steps where the held-out loss was measured
    views_encoded: Optional[tuple[int, int]] = None  # (encoded, all) while the latent cache fills, else None


@dataclass
class TrainResult:
    output_dir: Path
    embedding_path: Path
    embedding: Any  # textinv.embeddings.Embedding
    steps: int
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    steps_this_process: Optional[int] = None  # fewer than ``steps`` after a resume
    stop_reason: str = "max_train_steps"
    summary: str = ""  # the run's one closing line: "learned <tok> in N steps (M this run, S s); wrote FILE"


@dataclass
class RunContext:
    """What observers may look at (and what the recipe shares with its helpers).

    Typed loosely on purpose: the concrete classes (TrainConfig, ModelParts, TrainableTextEncoders,
    accelerate's Accelerator, ExampleStream) live in modules this one must not import.
    """

    config: Any  # textinv.config.TrainConfig
    output_dir: Path
    parts: Any  # textinv.models.loading.ModelParts
    trainable: Any  # textinv.models.conditioning.TrainableTextEncoders (.vectors: the first encoder's)
    accelerator: Any
    stream: Any  # textinv.data.examples.ExampleStream
    max_steps: int  # the run's length; a run stopped by --stop_when_converged ends early: it becomes the stop step
    seed: int
    record: dict[str, Any]  # run.json's content
    stop_requested: Optional[int] = None  # a signal number, once asked to stop
    save_record: Callable[[], None] = lambda: None  # writes ``record`` to run.json (the recipe sets it)
    start_step: int = 0
    concept: str = ""  # with --concepts, a view of the run for one word: its name, in its files' names

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        self.stop_requested = signum


class TrainObserver:
    """Override what you need; every hook runs on every process (check ``run.is_main_process``)."""

    def on_start(self, run: RunContext) -> None:
        pass

    def on_step(self, run: RunContext, state: StepState) -> None:
        pass

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        pass


def add_outputs(run: RunContext, paths: Sequence[Path], persist: bool = False) -> None:
    """List files an observer wrote under run.json's "outputs" (written at the end of the run,
    or at once with ``persist``, for files written after it ended, such as the model card)."""
    if not run.is_main_process:
        return
    names = {
        str(Path(p).relative_to(run.output_dir)) if Path(p).is_relative_to(run.output_dir) else str(p) for p in paths
    }
    run.record["outputs"] = sorted({*run.record.get("outputs", []), *names})
    if persist:
        run.save_record()


def add_timing(run: RunContext, name: str, seconds: float) -> None:
    """Add an observer's own time (validation, evaluation) to run.json's "timings"."""
    timings = run.record.setdefault("timings", {})
    timings[name] = round(timings.get(name, 0.0) + seconds, 3)

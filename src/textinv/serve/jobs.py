"""One training run of the page, in a thread: what the form asks for (:class:`TrainRequest`), the run
(:class:`TrainingJob`, a :func:`textinv.training.train` call) and what the page shows of it (:class:`JobSnapshot`).

The job watches its run through a :class:`textinv.events.TrainObserver` passed to ``train`` beside the observers
the config asks for (validation images, logs, model card), so training here is exactly what the CLI runs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from textinv.config import TrainConfig, TrainingInterrupted
from textinv.events import EMBEDDING_FILE, RunContext, StepState, TrainObserver
from textinv.observers.progress import clock_text
from textinv.observers.validation import GRID_FILE, VALIDATION_DIR
from textinv.optimizer_options import OPTIMIZER_DEFAULTS
from textinv.serve.errors import render_error
from textinv.serve.words import Word

logger = logging.getLogger(__name__)

ACTIVE = ("starting", "running", "stopping")


@dataclass(frozen=True)
class TrainRequest:
    """What the training form sends; ``images`` are (file the web framework stored, name the browser gave),
    caption files (.txt, .caption) among them; ``captions`` is the captions box (textinv.serve.captions)."""

    images: Sequence[tuple[str, str]]
    placeholder_token: str
    initializer_token: str
    learnable_property: str = "object"
    model: str = ""  # empty: the server's default model
    max_train_steps: int = 200
    # textinv's recipe, as `textinv train` (docs/quality.md "How many steps"); the page puts the optimizer's default in the box.
    learning_rate: float = OPTIMIZER_DEFAULTS["adamw"].learning_rate
    validation_prompt: str = "a photo of {token}"  # empty: no validation images
    validation_steps: int = 0  # 0: five rounds per run
    num_validation_images: int = 2
    validation_num_inference_steps: int = 25
    seed: int = 0
    captions: str = ""  # one 'file name: caption' line per image; empty: caption files only, if any
    lora_rank: int = 0  # "also train a small LoRA" (pivotal tuning, issue 26): its rank; 0 = the word alone
    optimizer: str = "adamw"  # --optimizer (issue 27)
    preserve_embedding_norm: bool = False  # "keep the word's norm": --preserve_embedding_norm (issue 27)


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a job's progress, for the page to show."""

    job_id: str
    status: str
    step: int
    max_steps: int
    losses: tuple[float, ...]
    seconds_per_step: Optional[float]
    eta_seconds: Optional[float]
    message: str
    token: str
    grid: Optional[Path]
    grid_version: int
    embedding: Optional[Path]
    eval_losses: tuple[tuple[int, float], ...] = ()  # (step, eval_loss) of each held-out evaluation (issue 20)
    # Every word's file once usable (``embedding`` is the first): one for a one-word job, one per word otherwise.
    embeddings: tuple[Path, ...] = ()

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def progress_line(self) -> str:
        loss = f" · loss {self.losses[-1]:.4f}" if self.losses else ""
        loss += f" · eval_loss {self.eval_losses[-1][1]:.4f}" if self.eval_losses and self.losses else ""
        if self.status == "starting":
            return f"{self.job_id}: starting (loading the model, encoding the images)"
        if self.status in ("running", "stopping"):
            speed = f" · {self.seconds_per_step:.2f} s/step" if self.seconds_per_step else ""
            eta = f" · ETA {clock_text(self.eta_seconds)}" if self.eta_seconds is not None else ""
            doing = "stopping after this step" if self.status == "stopping" else "running"
            return f"{self.job_id}: {doing} · step {self.step}/{self.max_steps}{loss}{speed}{eta}"
        if self.status == "done":
            return f"{self.job_id}: done · step {self.step}/{self.max_steps}{loss} · {self.token} learned"
        if self.status == "stopped":
            return f"{self.job_id}: stopped at step {self.step}/{self.max_steps}{loss} · Resume continues from the checkpoint"
        return f"{self.job_id}: failed · {self.message}"


class TrainingJob:
    """One training run (and its resumes), executed by :func:`textinv.training.train` in a thread."""

    def __init__(
        self,
        job_id: str,
        config: TrainConfig,
        folder: Path,
        images: int = 0,
        captions: int = 0,
        words: Sequence[Word] = (),
        word_images: Sequence[int] = (),
    ) -> None:
        self.job_id = job_id
        self.config = config
        self.folder = folder
        self.num_images, self.num_captions = images, captions  # what was uploaded, for the page's message
        # A several-word job (config.concepts): its words and each one's number of images; () for one word.
        self.words, self.word_images = tuple(words), tuple(word_images)
        self.output_dir = Path(config.output_dir)
        self.word_files = tuple(self.output_dir / name for name in _word_file_names(self.words))
        self._lock = threading.Lock()  # the training thread writes, page requests read
        self.status = "starting"
        self.message = ""
        self.step = 0
        self.max_steps = int(config.max_train_steps or 0)
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self._run: Optional[RunContext] = None  # once training has started
        self._stop_requested = False
        self._session_started: Optional[float] = None
        self._session_first_step = 0
        self._thread: Optional[threading.Thread] = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def launch(self, resume: bool = False) -> None:
        """Start (or resume from the latest checkpoint) in a new thread. The caller holds the server's lock."""
        config = dataclasses.replace(self.config, resume_from_checkpoint="latest") if resume else self.config
        with self._lock:
            self.status, self.message = "starting", ""
            self._run, self._stop_requested, self._session_started = None, False, None
        self._thread = threading.Thread(target=self._work, args=(config,), name=f"textinv-{self.job_id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to stop after its current step; it then writes a resumable checkpoint."""
        with self._lock:
            self._stop_requested = True
            if self._run is not None:
                self._run.request_stop()
            if self.status == "running":
                self.status = "stopping"

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the thread; True once it has ended."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            now = time.perf_counter()
            per_step = eta = None
            if self._session_started is not None and self.step >= self._session_first_step:
                # Wall time per step (validation rounds included), as the CLI's progress line reports it.
                per_step = (now - self._session_started) / (self.step - self._session_first_step + 1)
                eta = per_step * (self.max_steps - self.step) if self.status in ACTIVE else None
            grid: Optional[Path] = self.output_dir / VALIDATION_DIR / GRID_FILE
            try:
                grid_version = grid.stat().st_mtime_ns if grid is not None else 0
            except OSError:
                grid, grid_version = None, 0
            usable = self.status not in ACTIVE and all(path.is_file() for path in self.word_files)
            return JobSnapshot(
                self.job_id,
                self.status,
                self.step,
                self.max_steps,
                tuple(self.losses),
                per_step,
                eta,
                self.message,
                self.tokens_text,
                grid,
                grid_version,
                self.word_files[0] if usable else None,
                tuple(self.eval_losses),
                self.word_files if usable else (),
            )

    @property
    def tokens_text(self) -> str:
        """The job's word, or its words (``<cat-toy>, <my-style>``)."""
        return ", ".join(word.token for word in self.words) if self.words else self.config.placeholder_token

    # --- called from the training thread --------------------------------------------------------
    def _attach(self, run: RunContext) -> None:
        with self._lock:
            self._run = run
            # The curve so far: the evaluation before the first step (and a resumed run's earlier ones).
            self.eval_losses = [
                (int(step), float(value)) for step, value in run.record.get("eval", {}).get("losses", [])
            ]
            self.max_steps = run.max_steps
            self.status = "stopping" if self._stop_requested else "running"
            if self._stop_requested:  # Stop was pressed while the model was loading
                run.request_stop()

    def _record_step(
        self, step: int, max_steps: int, loss: float, step_seconds: float, eval_loss: Optional[float] = None
    ) -> None:
        with self._lock:
            if self._session_started is None:
                self._session_started = time.perf_counter() - step_seconds
                self._session_first_step = step
            del self.losses[step - 1 :]  # a resumed run redoes the steps after its checkpoint
            self.losses.append(loss)
            self.eval_losses = [(s, v) for s, v in self.eval_losses if s < step] + (
                [(step, eval_loss)] if eval_loss is not None else []
            )
            self.step, self.max_steps = step, max_steps

    def _finish(self, status: str, message: str) -> None:
        with self._lock:
            self.status, self.message, self._run = status, message, None
        logger.info("%s %s: %s", self.job_id, status, message)

    def _work(self, config: TrainConfig) -> None:
        from textinv.observers import observers_from_config
        from textinv.training import train

        try:
            # The config's own observers (validation grid, logs, model card) without the progress bar, then the job's.
            observers = [*observers_from_config(config, show_progress=False), _JobObserver(self)]
            result = train(config, observers=observers)
        except TrainingInterrupted as stopped:
            self._finish("stopped", f"stopped after step {stopped.step} of {stopped.max_steps}; the checkpoint is kept")
        except Exception as error:  # UserError and faults alike become one line on the page
            self._finish("failed", render_error(error))
        else:
            why = " (eval_loss had converged: --stop_when_converged)" if result.stop_reason == "converged" else ""
            self._finish("done", f"learned {self.tokens_text} in {result.steps} steps{why}")


def _word_file_names(words: Sequence[Word]) -> list[str]:
    """The file of each word, as training names it: ``learned_embeds.safetensors`` for a one-word job,
    ``learned_embeds-<name>.safetensors`` per word otherwise (what the page downloads and generates with)."""
    if not words:
        return [EMBEDDING_FILE]
    from textinv.training.export import embedding_file_name

    return [embedding_file_name("diffusers", concept=word.name) for word in words]


class _JobObserver(TrainObserver):
    """Feeds a :class:`TrainingJob` from inside the training loop (main process: the page is single-process)."""

    def __init__(self, job: TrainingJob) -> None:
        self.job = job

    def on_start(self, run: RunContext) -> None:
        self.job._attach(run)

    def on_step(self, run: RunContext, state: StepState) -> None:
        self.job._record_step(state.step, state.max_steps, state.loss, state.step_seconds, state.eval_loss)

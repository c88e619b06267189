"""The progress display of a training run: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
from collections import deque
from collections.abc import Mapping
from typing import Any, Optional

from textinv.events import RunContext, StepState, TrainObserver, TrainResult

logger = logging.getLogger(__name__)


class Progress(TrainObserver):
    """A tqdm bar on a terminal; plain log lines (about 20 a run) otherwise. Main process only.

    The lines go to the logger ``textinv.observers.progress`` at INFO, so a program that configures logging
    decides where they go; when nothing is configured (no handler anywhere), they are written to stderr, so a
    script calling :func:`textinv.train` still shows them. ``enabled=False`` shows neither.

    Both show the step, loss, learning rate, seconds per step and the time left. Seconds per step is
    the median of the last :attr:`RECENT` steps' own time (``StepState.step_seconds``), so neither
    the slower first steps nor the observers' work (validation rounds) inflate it; the time left
    counts the training steps, and the validation time so far is shown apart. While the latent
    cache fills (the first epoch encodes each view when first drawn), the line says so.
    """

    LINES_PER_RUN = 20
    RECENT = 10

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.redirect: Any = None  # log lines go above the bar while it is on screen
        self.recent: deque[float] = deque(maxlen=self.RECENT)
        self.every = 1
        self.eval_loss: Optional[float] = None  # the latest held-out evaluation's (--eval_steps)

    def on_start(self, run: RunContext) -> None:
        self.enabled = self.enabled and run.is_main_process
        self.every = max(1, math.ceil(run.max_steps / self.LINES_PER_RUN))

    def on_step(self, run: RunContext, state: StepState) -> None:
        if not self.enabled:
            return
        if not self.recent and sys.stderr.isatty():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # initial=: a resumed run's bar starts where it stopped.
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.step - 1,
                desc="train",
                unit="step",
                **bar_size(),
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",  # tqdm puts ", " before the postfix
            )
            self.redirect = logging_redirect_tqdm()  # a checkpoint's or a warning's line, then the bar again
            self.redirect.__enter__()
        self.recent.append(state.step_seconds)
        self.eval_loss = state.eval_loss if state.eval_loss is not None else self.eval_loss
        text = progress_text(state, statistics.median(self.recent), time_apart(run), self.eval_loss)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif state.step % self.every == 0 or state.step == state.max_steps:
            line = f"step {state.step}/{state.max_steps} {text}"
            if logger.hasHandlers():
                logger.info("%s", line)
            else:  # logging is not configured (a script calling textinv.train): its lines would be dropped
                print(line, file=sys.stderr, flush=True)

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.redirect is not None:
            self.redirect.__exit__(None, None, None)
            self.redirect = None


def bar_size() -> dict[str, Any]:
    """tqdm's size arguments: the terminal's, followed as it is resized; a fixed 100x20 when the terminal says it has
    no size (a pseudo-terminal nobody sized, e.g. ``script`` or ``docker run -t`` in a pipeline), where tqdm would
    draw nothing at all."""
    try:
        columns, rows = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):  # a stream that says it is a terminal but has no file: tqdm's own choice
        return {"dynamic_ncols": True}
    if columns > 0 and rows > 0:
        return {"dynamic_ncols": True}
    return {"ncols": columns or 100, "nrows": rows or 20}


def progress_text(
    state: StepState, per_step: float, apart: Mapping[str, float], eval_loss: Optional[float] = None
) -> str:
    """``loss 0.1234 [eval_loss 0.1111 ]lr 1.00e-04 0.052 s/step ETA 0:00:10`` (eval_loss: the latest
    held-out evaluation's), then the time spent apart from the steps (``; validation 3.1 s, evaluation
    0.8 s so far``) and, while it fills, the latent cache."""
    eta = clock_text(per_step * (state.max_steps - state.step))
    held_out = f"eval_loss {eval_loss:.4f} " if eval_loss is not None else ""
    text = f"loss {state.loss:.4f} {held_out}lr {state.lr:.2e} {per_step:.3f} s/step ETA {eta}"
    if apart:
        text += "; " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in apart.items()) + " so far"
    if state.views_encoded is not None:
        text += (
            f" (the first epoch also fills the latent cache: {state.views_encoded[0]}/{state.views_encoded[1]} views)"
        )
    return text


# run.json's timings that are not the steps' own (observers and the held-out evaluation add them), as shown.
TIME_APART = (("validation_seconds", "validation"), ("eval_seconds", "evaluation"))


def time_apart(run: Any) -> dict[str, float]:
    """What validation rounds and held-out evaluations took so far, by the name the line gives them."""
    timings = getattr(run, "record", {}).get("timings", {})
    return {name: float(timings[key]) for key, name in TIME_APART if timings.get(key)}


def clock_text(seconds: float) -> str:
    """``h:mm:ss`` for a duration (the CLI's progress line and the web page's ETA)."""
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

"""The held-out evaluation's options (issue 20; textinv.training.held_out): how often eval_loss is measured, on how many
triples, and when --stop_when_converged ends the run.

A mixin of :class:`textinv.config.TrainConfig` (keyword-only fields, so TrainConfig keeps its positional order); like
config.py it must not import torch. Not in ppdiffusers: its script keeps evaluation off (train_textual_inversion.py
passes --eval_steps 0).

Spacing (issue 28): an evaluation costs ``--eval_samples`` forward passes; every 10 steps that was about 30 % of a
512 px run's time. The curve of textual inversion changes fast at first and slowly later, so the interval grows with
the run: every ``--eval_steps`` steps up to step ``eval_steps / eval_spacing``, then every ``eval_spacing`` x the
step (rounded down to a multiple of ``--eval_steps``). A default 5000-step run evaluates 57 times instead of 501.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textinv.errors import UserError, check_at_least
from textinv.fields import option


def _option(default: Any, help: str) -> Any:
    return option(default, help=help, kw_only=True)  # keyword-only: TrainConfig's order stays


@dataclass
class HeldOutOptions:
    eval_steps: int = _option(
        10,
        "every N steps (and at the end) measure eval_loss, the denoising loss on a fixed held-out set of "
        "(view, timestep, noise) triples, and keep the lowest-eval vectors in learned_embeds-best.safetensors; 0 = off; "
        "a run of at most N steps skips it (no point between its start and end)",
    )
    eval_spacing: float = _option(
        0.1,
        "past step --eval_steps / this, evaluate every this x the step (a multiple of --eval_steps), so the curve "
        "keeps its shape and costs a few percent of a long run; 0 = every --eval_steps throughout",
    )
    eval_samples: int = _option(
        32,
        "triples in the held-out set (timesteps spread over the range); each evaluation costs this many forward passes",
    )
    stop_when_converged: bool = _option(
        False,
        "end the run (writing everything a normal end writes) once eval_loss stops improving: see --convergence_margin "
        "and --convergence_patience",
    )
    convergence_margin: float = _option(
        0.05,
        "--stop_when_converged stops when the last --convergence_patience evaluations gained less than this share of "
        "the eval_loss gained before them",
    )
    convergence_patience: int = _option(2, "evaluations --stop_when_converged looks back over")

    def evaluation_interval(self, step: int) -> int:
        """Steps from an evaluation at ``step`` to the next one (see the module docstring)."""
        return self.eval_steps * max(1, int(self.eval_spacing * step / self.eval_steps))

    def validate_held_out_options(self) -> None:
        for name, value, minimum in (
            ("--eval_steps", self.eval_steps, 0),
            ("--eval_samples", self.eval_samples, 1),
            ("--convergence_patience", self.convergence_patience, 1),
        ):
            check_at_least(name, value, minimum)
        if not 0.0 <= self.eval_spacing < 1.0:
            raise UserError(f"--eval_spacing {self.eval_spacing} must be in [0, 1), e.g. 0.1 (0 = a fixed interval)")
        if not 0.0 <= self.convergence_margin < 1.0:
            raise UserError(f"--convergence_margin {self.convergence_margin} must be in [0, 1), e.g. 0.05")
        if self.stop_when_converged and not self.eval_steps:
            raise UserError(
                "--stop_when_converged watches eval_loss, which --eval_steps 0 turns off; give --eval_steps N, e.g. 10"
            )

"""The optimizer and the control of the vectors' size (issue 27): ``--optimizer``, ``--preserve_embedding_norm`` and
``--max_embedding_norm``, with each optimizer's defaults for textual inversion and where they come from.

A mixin of :class:`textinv.config.TrainConfig` (keyword-only fields, so TrainConfig keeps its positional order);
like config.py it must not import torch. The hyperparameters the optimizers share stay TrainConfig's fields
(``--learning_rate``, ``--adam_beta1/2``, ``--adam_weight_decay``, ``--adam_epsilon``): left out, they take the chosen
optimizer's default here, resolved in one place (:meth:`OptimizerOptions.optimizer_hyperparameters`).
textinv.training.optimizers builds the optimizer from them; textinv.training.norms applies the norm rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from textinv.errors import UserError
from textinv.fields import option

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "schedulefree_adamw", "lion")


@dataclass(frozen=True)
class OptimizerDefaults:
    """An optimizer's defaults for textual inversion, and the package (and textinv extra) it comes from."""

    learning_rate: float
    betas: tuple[float, float]
    weight_decay: float
    extra: dict[str, Any] = field(default_factory=dict)  # the library's own keyword arguments
    module: Optional[str] = None  # what is imported; None: torch's own
    package: str = ""  # on PyPI, pinned as pyproject.toml's extra pins it
    extra_name: str = ""  # pip install 'textinv[<extra_name>]'
    uses_epsilon: bool = True


# textinv's AdamW recipe (docs/quality.md "How many steps", issue 20): lr 1e-3; betas and decoupled weight decay are
# torch.optim.AdamW's and ppdiffusers' (0.9, 0.999, 1e-2). A default run builds exactly the AdamW it always did.
_ADAMW = OptimizerDefaults(1e-3, (0.9, 0.999), 1e-2)
OPTIMIZER_DEFAULTS: dict[str, OptimizerDefaults] = {
    "adamw": _ADAMW,
    # bitsandbytes' AdamW8bit is AdamW with 8-bit moments: AdamW's hyperparameters (its own defaults are the same;
    # OneTrainer's ADAMW_8BIT defaults too). Tensors under its min_8bit_size (4096 values, e.g. one 768-wide vector)
    # keep 32-bit moments; bigger ones (LoRA adapters, several vectors of a wide encoder) get 8-bit ones.
    "adamw8bit": OptimizerDefaults(
        1e-3, (0.9, 0.999), 1e-2, module="bitsandbytes", package="bitsandbytes==0.50.2", extra_name="adamw8bit"
    ),
    # prodigyopt's README: "We recommend using lr=1. (default) for all networks" (--learning_rate multiplies the step
    # size Prodigy estimates, d); to move faster or slower change d_coef (1.0 by default), not the rate. Its
    # "Diffusion models" section: safeguard_warmup=True, use_bias_correction=True and weight_decay=0.01 (the values
    # kohya-ss users pass as --optimizer_args); decouple=True (AdamW-style decay) is its default.
    "prodigy": OptimizerDefaults(
        1.0,
        (0.9, 0.999),
        1e-2,
        {"d_coef": 1.0, "safeguard_warmup": True, "use_bias_correction": True, "decouple": True},
        module="prodigyopt",
        package="prodigyopt==1.1.2",
        extra_name="prodigy",
    ),
    # schedulefree's README: for AdamW "learning rates in the range 1x-10x larger than with schedule-based approaches"
    # (2.5e-3 = 2.5x textinv's AdamW rate; also AdamWScheduleFree's own default), "there is no need to use a learning
    # rate scheduler" (the schedule is constant: --lr_scheduler does not apply), warm-up "is recommended" through its
    # warmup_steps (--lr_warmup_steps), beta1 0.9 "works on most problems"; weight decay 1e-2 as OneTrainer's
    # SCHEDULE_FREE_ADAMW. Evaluation and saved vectors use its x sequence (optimizer.eval(): textinv.training.optimizers).
    "schedulefree_adamw": OptimizerDefaults(
        2.5e-3, (0.9, 0.999), 1e-2, module="schedulefree", package="schedulefree==1.4.1", extra_name="schedulefree"
    ),
    # The Lion paper (Chen et al. 2023, sec. 5), quoted in lion-pytorch's README: "a suitable learning rate for Lion is
    # typically 3-10x smaller than that for AdamW", and weight decay "3-10x larger ... to maintain a similar strength"
    # (lr x weight decay); the README's runs: 3x smaller beat AdamW, 10x smaller was worst. So AdamW's 1e-3 / 3 and
    # 1e-2 x 3. Betas (0.9, 0.99): the paper's defaults for Lion. Lion has no epsilon.
    "lion": OptimizerDefaults(
        3e-4,
        (0.9, 0.99),
        3e-2,
        module="lion_pytorch",
        package="lion-pytorch==0.2.5",
        extra_name="lion",
        uses_epsilon=False,
    ),
}
# Prodigy estimates one step size for every parameter: its groups must share the rate (prodigyopt refuses others).
SHARED_RATE_OPTIMIZERS = ("prodigy",)
SCHEDULE_FREE_OPTIMIZERS = ("schedulefree_adamw",)


def _option(default: Any, help: str, choices: Optional[tuple[str, ...]] = None) -> Any:
    return option(default, help=help, choices=choices, kw_only=True)  # keyword-only: TrainConfig's order stays


def missing_package_text(name: str) -> str:
    """The one line for an --optimizer whose package is not installed."""
    spec = OPTIMIZER_DEFAULTS[name]
    return (
        f"--optimizer {name} needs the {spec.package.split('==')[0]} package, which is not installed: "
        f"pip install 'textinv[{spec.extra_name}]' (or every optimizer: 'textinv[optimizers]'), or use --optimizer adamw"
    )


@dataclass
class OptimizerOptions:
    optimizer: str = _option(
        "adamw",
        help="the optimizer: adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt; estimates its own step size), "
        "schedulefree_adamw (schedulefree; no learning-rate schedule), lion (lion-pytorch); all but adamw need a "
        "textinv extra (pip install 'textinv[optimizers]'), and each has its own default learning rate, betas and "
        "weight decay",
        choices=OPTIMIZERS,
    )
    # OneTrainer's rule for its embeddings (its "preserve embedding norm" option): after each step every vector is
    # rescaled to the median norm of its encoder's vocabulary rows (textinv.training.norms).
    preserve_embedding_norm: bool = _option(
        False,
        help="after each step rescale every learned vector to the median norm of its text encoder's vocabulary rows",
    )
    max_embedding_norm: Optional[float] = _option(
        None,
        help="after each step scale down any learned vector longer than this multiple of the median norm of its text "
        "encoder's vocabulary rows, e.g. 1.5",
    )

    def _given(self, name: str) -> Any:
        """A TrainConfig field shared by the optimizers (declared there, so the flags keep their order); None when
        left out."""
        return getattr(self, name, None)

    @property
    def optimizer_defaults(self) -> OptimizerDefaults:
        return OPTIMIZER_DEFAULTS.get(self.optimizer, _ADAMW)

    def optimizer_hyperparameters(self) -> dict[str, Any]:
        """The optimizer's keyword arguments: the options given, else the optimizer's defaults (before --scale_lr)."""
        defaults = self.optimizer_defaults
        beta1, beta2 = (self._given(f"adam_beta{i}") for i in (1, 2))
        chosen: dict[str, Any] = {
            "lr": _or(self._given("learning_rate"), defaults.learning_rate),
            "betas": (_or(beta1, defaults.betas[0]), _or(beta2, defaults.betas[1])),
            "weight_decay": _or(self._given("adam_weight_decay"), defaults.weight_decay),
        }
        if defaults.uses_epsilon:
            chosen["eps"] = self._given("adam_epsilon")
        if self.optimizer in SCHEDULE_FREE_OPTIMIZERS:
            chosen["warmup_steps"] = self._given("lr_warmup_steps") or 0
        return {**chosen, **defaults.extra}

    @property
    def resolved_learning_rate(self) -> float:
        """--learning_rate, else the optimizer's default (before --scale_lr)."""
        return float(self.optimizer_hyperparameters()["lr"])

    @property
    def optimizer_settings(self) -> dict[str, Any]:
        """For run.json and the model card: the optimizer, the arguments it was built with, its schedule."""
        schedule = "schedule-free" if self.optimizer in SCHEDULE_FREE_OPTIMIZERS else self._given("lr_scheduler")
        arguments = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in self.optimizer_hyperparameters().items()
        }
        return {"name": self.optimizer, **arguments, "lr_scheduler": schedule}

    @property
    def embedding_norm_settings(self) -> Optional[dict[str, Any]]:
        """The norm rule in force (run.json, the run identity, the model card), or None without one."""
        if self.preserve_embedding_norm:
            return {"rule": "preserve", "multiple": 1.0, "of": "median vocabulary-row norm"}
        if self.max_embedding_norm is not None:
            return {"rule": "max", "multiple": float(self.max_embedding_norm), "of": "median vocabulary-row norm"}
        return None

    def validate_optimizer_options(self) -> None:
        """One-line UserErrors: hyperparameters out of range, a missing package, contradictory norm options (choices
        are checked with every option's)."""
        learning_rate = self._given("learning_rate")
        if learning_rate is not None and not learning_rate > 0:
            raise UserError(f"--learning_rate {learning_rate} must be > 0, e.g. 5e-4")
        for name in ("adam_beta1", "adam_beta2"):
            value = self._given(name)
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"--{name} {value} must be in [0, 1), e.g. 0.9")
        epsilon = self._given("adam_epsilon")
        if epsilon is not None and not epsilon > 0:
            raise UserError(f"--adam_epsilon {epsilon} must be > 0, e.g. 1e-8")
        decay = self._given("adam_weight_decay")
        if decay is not None and not decay >= 0:
            raise UserError(f"--adam_weight_decay {decay} must be >= 0")
        if self.max_embedding_norm is not None and not (
            math.isfinite(self.max_embedding_norm) and self.max_embedding_norm > 0
        ):
            raise UserError(
                f"--max_embedding_norm {self.max_embedding_norm} must be a number > 0, a multiple of the vocabulary's "
                "median norm, e.g. 1.5"
            )
        if self.preserve_embedding_norm and self.max_embedding_norm is not None:
            raise UserError(
                "--preserve_embedding_norm holds every vector at the vocabulary's median norm and --max_embedding_norm "
                "only caps it: give one of them"
            )
        if self.optimizer in SHARED_RATE_OPTIMIZERS:
            for name in ("t5_learning_rate", "lora_learning_rate"):
                if self._given(name) is not None:
                    raise UserError(
                        f"--{name} does not apply to --optimizer {self.optimizer}, which estimates one step size "
                        f"for every parameter (times --learning_rate, 1.0 by default); drop --{name}"
                    )
        self.check_optimizer_package()

    def check_optimizer_package(self) -> None:
        """The optimizer's package is installed (found without importing it: no torch yet)."""
        import importlib.util

        module = self.optimizer_defaults.module
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(missing_package_text(self.optimizer))


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value

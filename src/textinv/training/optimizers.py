"""The optimizer ``--optimizer`` names (issue 27), built from the arguments textinv.optimizer_options resolves, and
what training does around its steps.

- ``adamw``: torch.optim.AdamW, exactly as before this module existed (a default run is bit for bit the same);
- ``adamw8bit``: bitsandbytes' AdamW8bit, after one probe step on the run's device: where this bitsandbytes has
  no 8-bit kernels for it, one line says so;
- ``prodigy``: prodigyopt's Prodigy; every parameter group takes the same rate (Prodigy refuses others);
- ``schedulefree_adamw``: schedulefree's AdamWScheduleFree. It takes gradients at one point (y) and its result is
  another (x): :func:`before_gradients` puts it in train mode (y) for the forward and backward passes, and
  :func:`after_step` back in eval mode (x) right after each step, so between steps (held-out evaluation, validation
  images, snapshots, checkpoints, the final files) the vectors and adapters are x. The switches happen at every
  step whatever else the run does, so a run learns the same vectors with or without evaluation, and a checkpoint
  (x with the optimizer in eval mode, as schedulefree's README asks) resumes exactly;
- ``lion``: lion-pytorch's Lion.

Each optimizer's state is its ``state_dict()``, which checkpoints keep (textinv.training.checkpoints).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from typing import Any

import torch

from textinv.config import TrainConfig, UserError, first_line
from textinv.optimizer_options import (
    OPTIMIZER_DEFAULTS,
    SCHEDULE_FREE_OPTIMIZERS,
    SHARED_RATE_OPTIMIZERS,
    missing_package_text,
)
from textinv.training.norms import apply_norm_rule

logger = logging.getLogger(__name__)

# diffusers' advanced scripts' LoRA rate (textinv.lora_options), an AdamW rate: without --lora_learning_rate it is
# scaled like the word's default rate (the optimizer's default / AdamW's), e.g. Lion's 3x smaller.
ADAMW_LORA_RATE = 1e-4


def make_optimizer(config: TrainConfig, parameters: Any, num_processes: int) -> torch.optim.Optimizer:
    """The --optimizer on the token vectors (and LoRA adapters), with textinv.optimizer_options' arguments;
    ``--scale_lr`` multiplies every rate by the examples per update."""
    scale = config.examples_per_update(num_processes) if config.scale_lr else 1
    arguments = config.optimizer_hyperparameters()
    arguments["lr"] = arguments["lr"] * scale
    parameters = list(parameters)
    if parameters and isinstance(parameters[0], dict):
        parameters = [_group_rate(config, group, scale) for group in parameters]
    return BUILDERS[config.optimizer](parameters, arguments)


def _group_rate(config: TrainConfig, group: dict[str, Any], scale: float) -> dict[str, Any]:
    """A parameter group's rate: its own (T5's, the LoRA's) times ``scale``; the optimizer's one rate for Prodigy."""
    if config.optimizer in SHARED_RATE_OPTIMIZERS:
        if "lr" in group:
            logger.info("--optimizer %s: the %s group takes the run's rate", config.optimizer, group.get("name", "?"))
        return {key: value for key, value in group.items() if key != "lr"}
    if group.get("name") == "lora" and config.lora_learning_rate is None:
        ratio = config.optimizer_defaults.learning_rate / OPTIMIZER_DEFAULTS["adamw"].learning_rate
        group = {**group, "lr": ADAMW_LORA_RATE * ratio}
    return {**group, "lr": group["lr"] * scale} if "lr" in group else group


def _adamw(parameters: Any, arguments: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameters,
        lr=arguments["lr"],
        betas=arguments["betas"],
        weight_decay=arguments["weight_decay"],
        eps=arguments["eps"],
    )


def _library(name: str) -> Any:
    """The optimizer's package, or the one line naming the extra that installs it."""
    module = OPTIMIZER_DEFAULTS[name].module
    assert module is not None
    quiet = logging.getLogger(module)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # bitsandbytes warns at import about 4-bit CPU kernels, which nothing here uses
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(missing_package_text(name)) from None
    except Exception as error:  # e.g. a bitsandbytes build that cannot load its library
        raise UserError(
            f"--optimizer {name}: {module} is installed but cannot be loaded ({first_line(error)}); "
            "use --optimizer adamw"
        ) from None
    finally:
        quiet.setLevel(level)


def _adamw8bit(parameters: Any, arguments: dict[str, Any]) -> torch.optim.Optimizer:
    bitsandbytes = _library("adamw8bit")
    device = _device_of(parameters)
    check_8bit_device(bitsandbytes, device)
    return bitsandbytes.optim.AdamW8bit(parameters, **arguments)


def check_8bit_device(bitsandbytes: Any, device: torch.device) -> None:
    """One AdamW8bit step on a tensor big enough for 8-bit moments, on ``device``: where bitsandbytes has no 8-bit
    kernels for it (its CPU and CUDA back-ends have them), one line."""
    probe = torch.zeros(4096, device=device, requires_grad=True)  # AdamW8bit's min_8bit_size
    probe.grad = torch.ones_like(probe)
    try:
        bitsandbytes.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as error:
        raise UserError(
            f"--optimizer adamw8bit needs bitsandbytes' 8-bit optimizer kernels for {device.type}, which bitsandbytes "
            f"{getattr(bitsandbytes, '__version__', '?')} does not have here ({first_line(error)}); use --optimizer adamw"
        ) from None


def _prodigy(parameters: Any, arguments: dict[str, Any]) -> torch.optim.Optimizer:
    prodigyopt = _library("prodigy")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on stdout
        return prodigyopt.Prodigy(parameters, **arguments)


def _schedule_free(parameters: Any, arguments: dict[str, Any]) -> torch.optim.Optimizer:
    return _library("schedulefree_adamw").AdamWScheduleFree(parameters, **arguments)


def _lion(parameters: Any, arguments: dict[str, Any]) -> torch.optim.Optimizer:
    return _library("lion").Lion(parameters, **arguments)


def _device_of(parameters: list[Any]) -> torch.device:
    first = parameters[0]
    return (first["params"][0] if isinstance(first, dict) else first).device


BUILDERS = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "prodigy": _prodigy,
    "schedulefree_adamw": _schedule_free,
    "lion": _lion,
}


def is_schedule_free(optimizer: Any) -> bool:
    """A schedule-free optimizer: its groups carry its train/eval mode."""
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0]


def schedule_for(config: TrainConfig) -> tuple[str, int]:
    """The LR schedule and its warm-up steps: the options', or none for a schedule-free optimizer (its warm-up is its
    own warmup_steps, from --lr_warmup_steps)."""
    if config.optimizer not in SCHEDULE_FREE_OPTIMIZERS:
        return config.lr_scheduler, config.lr_warmup_steps
    if config.lr_scheduler != "constant":
        logger.info(
            "--optimizer %s has no schedule: --lr_scheduler %s does not apply", config.optimizer, config.lr_scheduler
        )
    return "constant", 0


def before_gradients(optimizer: Any) -> None:
    """Before a step's forward and backward passes: a schedule-free optimizer's train mode (its gradient point y)."""
    if is_schedule_free(optimizer):
        optimizer.train()


def after_step(optimizer: Any, trainable: Any, config: TrainConfig) -> None:
    """After each optimizer step: a schedule-free optimizer's eval mode (the x the run evaluates and saves), then the
    norm rule (--preserve_embedding_norm, --max_embedding_norm) on the vectors as they will be saved."""
    if is_schedule_free(optimizer):
        optimizer.eval()
    apply_norm_rule(config.embedding_norm_settings, trainable)

"""Speed and memory settings for the frozen model: precision, attention, checkpointing, compilation.

The trainable state is the placeholder vectors alone (tokens.TrainableTokens), so nothing here
touches it: the vectors and the optimizer stay float32 whatever the frozen weights use.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from textinv.config import TrainConfig, UserError

logger = logging.getLogger(__name__)

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
def check_precision(config: TrainConfig, device: torch.device) -> None:
    """Refuse settings the device cannot run, before any model is loaded."""
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError(
            f"--mixed_precision fp16 needs a CUDA GPU, and this run is on {device.type}; "
            "use --mixed_precision no (or bf16 where the CPU supports it)"
        )


def accelerator_precision(config: TrainConfig, device: torch.device) -> str:
    """What accelerate should do about precision: only fp16 needs its loss scaler."""
    return "fp16" if config.mixed_precision == "fp16" and device.type == "cuda" else "no"


def frozen_dtype(config: TrainConfig) -> torch.dtype:
    return HALF_DTYPES.get(config.mixed_precision, torch.float32)


def apply_to_text_encoder(config: TrainConfig, text_encoder: Any) -> None:
    if config.mixed_precision != "no":
        text_encoder.to(dtype=frozen_dtype(config))


def apply_to_unet(config: TrainConfig, unet: Any, device: torch.device) -> Any:
    """Precision, attention, checkpointing and compilation for the frozen UNet; returns the UNet to call."""
    if config.mixed_precision != "no":
        unet.to(dtype=frozen_dtype(config))
    if config.allow_tf32 and device.type == "cuda":
        # A process-wide switch in torch; it only affects CUDA matmuls and convolutions.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.enable_xformers_memory_efficient_attention:
        if device.type == "cuda" and importlib.util.find_spec("xformers") is not None:
            unet.enable_xformers_memory_efficient_attention()
            logger.info("attention: xformers")
        else:
            why = "xformers is not installed" if device.type == "cuda" else f"xformers needs CUDA (this run is on {device.type})"
            logger.warning("%s; using PyTorch's scaled-dot-product attention, the default anyway", why)
    if config.gradient_checkpointing:
        # diffusers checkpoints whenever gradients are on, in eval mode too (the UNet stays frozen).
        unet.enable_gradient_checkpointing()
    if config.compile:
        logger.info("compiling the UNet with torch.compile (the first steps are slow)")
        return torch.compile(unet)
    return unet

"""The parts the recipe sets up before its first step: latents, starting vectors, optimizer, schedule."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import TrainConfig, UserError
from textinv.data.images import load_views
from textinv.data.latents import LatentsEachStep, LazyLatentCache
from textinv.embeddings import read_embeddings
from textinv.models.loading import ModelParts

logger = logging.getLogger(__name__)


def processes_share_cpu() -> bool:
    """True for a multi-process launch (torchrun / accelerate) on a machine without CUDA.

    accelerate only picks its CPU (gloo) back-end when asked to, and would otherwise run each
    process as a separate single-process job; GPUs keep accelerate's own choice (NCCL).
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    return launched_processes > 1 and not torch.cuda.is_available()


def load_latents(config: TrainConfig, parts: ModelParts, image_paths: Sequence[Path], device: torch.device) -> Any:
    """The latent cache, each view encoded when first drawn (or, with ``--no_cache_latents``, a source
    that encodes every step)."""
    views = load_views(
        image_paths,
        config.image_height,
        config.image_width,
        config.center_crop,
        config.interpolation,
        config.dataloader_num_workers,
    )
    parts.vae.to(device)
    if config.cache_latents:
        return LazyLatentCache(parts.vae, views, config.random_flip)  # lets the VAE go once full
    return LatentsEachStep(parts.vae, views, config.random_flip)  # keeps the VAE


# What a step costs on a CPU, per example and UNet parameter: fitted to an SD 1.5-sized UNet (860M parameters)
# on this project's 2-core CPU, 5.2 s a step at 256 px and 18.8 s at 512 px (batch 1, fp32; README "Speed and memory").
_CPU_SECONDS_PER_PARAMETER = 7.9e-10
_CPU_SECONDS_PER_PARAMETER_AND_LATENT_PIXEL = 5.15e-12
_CPU_THREADS_MEASURED = 2


def cpu_step_estimate(
    config: TrainConfig, parts: ModelParts, device: torch.device, num_processes: int = 1
) -> Optional[str]:
    """On a CPU, one line on what a step will cost (from the UNet's size, the image size and the batch);
    None on a GPU or when a step takes under a second."""
    if device.type != "cpu":
        return None
    parameters = sum(p.numel() for p in parts.unet.parameters())
    latent_pixels = (config.image_height // parts.vae_scale_factor) * (config.image_width // parts.vae_scale_factor)
    per_example = parameters * (
        _CPU_SECONDS_PER_PARAMETER + _CPU_SECONDS_PER_PARAMETER_AND_LATENT_PIXEL * latent_pixels
    )
    examples = config.train_batch_size * config.gradient_accumulation_steps  # per process
    seconds = examples * per_example * _CPU_THREADS_MEASURED / max(1, torch.get_num_threads() // max(1, num_processes))
    if seconds < 1.0:
        return None
    advice = f"; --train_batch_size 1 makes a step about {examples}x cheaper" if examples > 1 else ""
    return (
        f"on this CPU a step of {examples} example(s) at {config.image_width}x{config.image_height} px will take "
        f"about {_duration_text(seconds)} (estimated from the UNet's size){advice}"
    )


def _duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def schedule_length(config: TrainConfig, epoch_length: int, num_processes: int) -> int:
    """Optimizer steps of the run: ``--max_train_steps``, else ``--num_train_epochs`` worth of examples."""
    per_update = config.examples_per_update(num_processes)
    return config.max_train_steps or math.ceil(config.num_train_epochs * epoch_length / per_update)


def make_optimizer(config: TrainConfig, parameters: Any, num_processes: int) -> torch.optim.Optimizer:
    """AdamW on the token vectors; ``--scale_lr`` multiplies the rate by the examples per update."""
    learning_rate = config.learning_rate * (config.examples_per_update(num_processes) if config.scale_lr else 1)
    return torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    # Stepped once per optimizer update, so warm-up and length are in updates (the reference
    # scripts step per micro-batch and multiply both by the accumulation steps instead).
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def starting_vectors_by_encoder(path: str, placeholder_token: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """The ``[n, dim]`` vectors, by text encoder (SDXL files have two), of the token in an embedding file of any format
    (``--init_embeddings``).

    A file of several tokens must hold one named ``placeholder_token``. ``num_vectors`` other than
    1 (the default) must agree with the file; otherwise the file's count wins.
    """

    embeddings = read_embeddings(path)
    if len(embeddings) > 1:
        named = [embedding for embedding in embeddings if embedding.token == placeholder_token]
        if not named:
            tokens = ", ".join(embedding.token for embedding in embeddings)
            raise UserError(
                f"--init_embeddings {path!r} holds several tokens ({tokens}); name the one to start from "
                "with --placeholder_token, or convert it alone first (textinv convert --token)"
            )
        embeddings = named
    embedding = embeddings[0]
    vectors = next(iter(embedding.vectors.values()))  # every encoder has the same count (read_embeddings checks)
    if num_vectors not in (1, vectors.shape[0]):
        raise UserError(
            f"--init_embeddings {path!r} has {vectors.shape[0]} vectors but --num_vectors is {num_vectors}; "
            f"drop --num_vectors or set it to {vectors.shape[0]}"
        )
    logger.info("starting %s from %s (%s, %d vector(s))", placeholder_token, path, embedding.token, vectors.shape[0])
    return {name: tensor.detach().to(torch.float32).clone() for name, tensor in embedding.vectors.items()}

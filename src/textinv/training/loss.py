"""The denoising loss: noise a latent, predict, compare with the scheduler's target.

Each example's random draws (latent sample, noise, timestep) come from its own generator, so
they depend only on the example, never on the batch layout or the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from textinv.config import TrainConfig, UserError
from textinv.data.examples import Example
from textinv.data.latents import LatentCache
from textinv.data.masks import LossWeights
from textinv.models.conditioning import bucket_time_ids, predict
from textinv.models.loading import ModelParts


@dataclass(frozen=True)
class LossSettings:
    """How :func:`denoising_loss` draws timesteps and weights examples (TrainConfig, issue 8)."""

    timestep_sampling: str = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0  # issue 15

    @classmethod
    def from_config(cls, config: TrainConfig) -> LossSettings:
        return cls(
            config.timestep_sampling,
            config.timestep_logit_mean,
            config.timestep_logit_std,
            config.snr_gamma,
            config.noise_offset,
        )


def draw_timestep(generator: torch.Generator, num_train_timesteps: int, settings: LossSettings) -> torch.Tensor:
    """One timestep, shape [1], drawn from ``generator`` as ``settings`` say (one draw from it either way)."""
    if settings.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (1,), generator=generator)
    if settings.timestep_sampling == "logit_normal":
        logit = torch.randn((1,), generator=generator) * settings.timestep_logit_std + settings.timestep_logit_mean
        return (torch.sigmoid(logit) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    raise UserError(f"--timestep_sampling {settings.timestep_sampling!r} is not one of: uniform, logit_normal")


def offset_noise(noise: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """One latent's ``noise`` ``[c, h, w]`` plus an offset per channel, the same over the whole latent.

    Offset noise (Guttenberg 2023, https://www.crosslabs.org/blog/diffusion-with-offset-noise), as the
    ``--noise_offset`` of ppdiffusers' and diffusers' training examples applies it to a batch:
    ``noise += noise_offset * randn(b, c, 1, 1)``. Here per example: ``randn(c, 1, 1)`` from its generator.
    """
    offset = torch.randn((noise.shape[0],) + (1,) * (noise.dim() - 1), generator=generator, dtype=noise.dtype)
    return noise + noise_offset * offset


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example loss weights of min-SNR-gamma (Hang et al. 2023), for the scheduler's target.

    SNR(t) = alpha_bar / (1 - alpha_bar). The weight min(SNR, gamma) is for an x0 target; an epsilon
    target's error is the x0 error times SNR, a velocity target's times (SNR + 1), hence the division.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)[timesteps.long()]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1.0)
    else:  # "sample": the target is x0 itself
        weights = clipped
    return weights.float()


def loss_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, by the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise UserError(f"the model's scheduler has prediction_type {kind!r}, which textinv cannot train")


def example_draws(
    example: Example, latent_cache: LatentCache, num_train_timesteps: int, settings: LossSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example's latent sample, noise and timestep ([1]), drawn from its own generator in that order;
    then, when ``settings.noise_offset`` is not 0, the offset (after the others: 0 leaves every draw as it was)."""
    generator = torch.Generator().manual_seed(example.noise_seed)
    latent = latent_cache.sample(example.image_index, example.flipped, generator)
    noise = torch.randn(latent.shape, generator=generator)
    timestep = draw_timestep(generator, num_train_timesteps, settings)
    if settings.noise_offset:
        noise = offset_noise(noise, generator, settings.noise_offset)
    return latent, noise, timestep


def denoising_loss(
    model: Any,
    parts: ModelParts,
    tokenizer: Any,
    latent_cache: LatentCache,
    examples: Sequence[Example],
    device: torch.device,
    settings: LossSettings = LossSettings(),
    weights: Optional[LossWeights] = None,
) -> torch.Tensor:
    """Mean-squared error of the UNet's prediction for a batch of examples (min-SNR weighted if asked).

    Each example's random draws (latent sample, noise, timestep, then the noise offset when
    ``settings.noise_offset`` is not 0) come from its own generator, in that order, so they depend
    only on the example, not on batch layout or process count. With ``weights`` (masks), the error is
    weighted per latent pixel and divided by the batch's weight sum (issue 17): all-ones weights give
    the plain mean, and an example whose weights are all 0 adds exactly nothing, nor any gradient.
    """
    scheduler = parts.noise_scheduler
    steps = scheduler.config.num_train_timesteps
    draws = [example_draws(example, latent_cache, steps, settings) for example in examples]
    latents_t = torch.stack([latent for latent, _, _ in draws])
    noise_t = torch.stack([noise for _, noise, _ in draws])
    timesteps_t = torch.cat([timestep for _, _, timestep in draws])
    noisy = scheduler.add_noise(latents_t, noise_t, timesteps_t)
    target = loss_target(scheduler, latents_t, noise_t, timesteps_t)
    # Text conditioning and the UNet call, as the model family's pipeline does it (textinv.models.conditioning).
    sizes = [example.original_size for example in examples]  # with aspect-ratio buckets: SDXL's time ids
    time_ids = bucket_time_ids(sizes, noisy, parts.vae_scale_factor) if any(sizes) else None
    captions = [example.caption for example in examples]
    prediction = predict(model, parts, captions, noisy, timesteps_t, device, tokenizer, time_ids)
    per_pixel_weights = _batch_weights(weights, examples, noisy)
    if per_pixel_weights is not None:
        squared = F.mse_loss(prediction.float(), target.to(device).float(), reduction="none")
        weight = per_pixel_weights.to(device).expand_as(squared)
        per_example = (squared * weight).flatten(1).sum(1)
        if settings.snr_gamma is not None:
            per_example = per_example * min_snr_weights(scheduler, timesteps_t, settings.snr_gamma).to(device)
        return per_example.sum() / weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
    if settings.snr_gamma is None:
        return F.mse_loss(prediction.float(), target.to(device).float())
    per_example = F.mse_loss(prediction.float(), target.to(device).float(), reduction="none").flatten(1).mean(1)
    return (per_example * min_snr_weights(scheduler, timesteps_t, settings.snr_gamma).to(device)).mean()


def _batch_weights(
    weights: Optional[LossWeights], examples: Sequence[Example], latents: torch.Tensor
) -> Optional[torch.Tensor]:
    """``[batch, 1, h, w]`` loss weights of the examples' views, or None when none of them has a mask."""
    if weights is None:
        return None
    each = [weights.for_example(example.image_index, example.flipped) for example in examples]
    if all(weight is None for weight in each):
        return None
    ones = torch.ones((1, *latents.shape[-2:]))
    return torch.stack([ones if weight is None else weight for weight in each])

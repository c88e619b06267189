"""The denoising loss: noise a latent, predict, compare with the objective's target (textinv.models.objectives:
the scheduler's epsilon / velocity, or flow matching's noise - x0).

Each example's random draws (latent sample, noise, timestep) come from its own generator, so
they depend only on the example, never on the batch layout or the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from textinv.config import TrainConfig
from textinv.data.examples import Example
from textinv.data.latents import LatentCache
from textinv.data.masks import LossWeights
from textinv.models.conditioning import predict
from textinv.models.loading import ModelParts
from textinv.models.objectives import DenoisingDiffusion, Objective, ObjectiveSettings, make_objective


@dataclass(frozen=True)
class LossSettings(ObjectiveSettings):
    """How :func:`denoising_loss` draws timesteps and weights examples: the objective's settings (issues 8, 25)
    and the offset noise (issue 15)."""

    noise_offset: float = 0.0

    @classmethod
    def from_config(cls, config: TrainConfig) -> LossSettings:
        return cls(
            timestep_sampling=config.timestep_sampling,
            timestep_logit_mean=config.timestep_logit_mean,
            timestep_logit_std=config.timestep_logit_std,
            snr_gamma=config.snr_gamma,
            weighting_scheme=config.weighting_scheme,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            flow_shift=config.flow_shift,
            noise_offset=config.noise_offset,
        )


class ObjectiveFor:
    """The family's objective for latents of a given shape (Flux's noise shift depends on the image size), made once
    per shape. ``objective_for(latent_shape)``."""

    def __init__(self, parts: Any, settings: ObjectiveSettings) -> None:
        self.scheduler, self.settings = parts.noise_scheduler, settings
        self._by_patches: dict[int, Objective] = {}

    def __call__(self, latent_shape: Sequence[int]) -> Objective:
        # Packed 2x2 latent patches: Flux's image sequence length (the DDPM objectives ignore it).
        patches = (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)
        if patches not in self._by_patches:
            self._by_patches[patches] = make_objective(self.scheduler, self.settings, patches)
        return self._by_patches[patches]


def offset_noise(noise: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """One latent's ``noise`` ``[c, h, w]`` plus an offset per channel, the same over the whole latent.

    Offset noise (Guttenberg 2023, https://www.crosslabs.org/blog/diffusion-with-offset-noise), as the
    ``--noise_offset`` of ppdiffusers' and diffusers' training examples applies it to a batch:
    ``noise += noise_offset * randn(b, c, 1, 1)``. Here per example: ``randn(c, 1, 1)`` from its generator.
    """
    offset = torch.randn((noise.shape[0],) + (1,) * (noise.dim() - 1), generator=generator, dtype=noise.dtype)
    return noise + noise_offset * offset


def loss_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What a DDPM-trained UNet predicts, by the scheduler's ``prediction_type`` (the benches' planted teacher)."""
    return DenoisingDiffusion(scheduler).target(latents, noise, timesteps)


def example_draws(
    example: Example,
    latent_cache: LatentCache,
    objective_for: Callable[[Sequence[int]], Objective],
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example's latent sample, noise and timestep ([1]), drawn from its own generator in that order;
    then, when ``settings.noise_offset`` is not 0, the offset (after the others: 0 leaves every draw as it was)."""
    generator = torch.Generator().manual_seed(example.noise_seed)
    latent = latent_cache.sample(example.image_index, example.flipped, generator)
    noise = torch.randn(latent.shape, generator=generator)
    timestep = objective_for(latent.shape).draw_timestep(generator, settings)
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
    objective_for: Optional[ObjectiveFor] = None,
) -> torch.Tensor:
    """Mean-squared error of the denoiser's prediction for a batch of examples, weighted as the objective says
    (min-SNR-gamma; SD3's and Flux's weighting schemes). ``objective_for`` (:class:`ObjectiveFor`) is made here when
    not given; the recipe keeps one for the run.

    Each example's random draws (latent sample, noise, timestep, then the noise offset when
    ``settings.noise_offset`` is not 0) come from its own generator, in that order, so they depend
    only on the example, not on batch layout or process count. With ``weights`` (masks), the error is
    weighted per latent pixel and divided by the batch's weight sum (issue 17): all-ones weights give
    the plain mean, and an example whose weights are all 0 adds exactly nothing, nor any gradient.
    """
    objective_for = objective_for or ObjectiveFor(parts, settings)
    draws = [example_draws(example, latent_cache, objective_for, settings) for example in examples]
    latents_t = torch.stack([latent for latent, _, _ in draws])
    noise_t = torch.stack([noise for _, noise, _ in draws])
    timesteps_t = torch.cat([timestep for _, _, timestep in draws])
    objective = objective_for(latents_t.shape)  # a batch is one bucket: one shape
    noisy = objective.noisy(latents_t, noise_t, timesteps_t)
    target = objective.target(latents_t, noise_t, timesteps_t)
    # Text conditioning and the denoiser call, as the model family's pipeline does it (textinv.models.families).
    sizes = [example.original_size for example in examples]  # with aspect-ratio buckets: SDXL's time ids
    captions = [example.caption for example in examples]
    model_timesteps = objective.model_timesteps(timesteps_t)
    prediction = predict(
        model, parts, captions, noisy, model_timesteps, device, tokenizer, sizes if any(sizes) else None
    )
    example_weights = objective.loss_weights(timesteps_t, settings)  # min-SNR-gamma, SD3's cosmap...: or None
    per_pixel_weights = _batch_weights(weights, examples, noisy)
    if per_pixel_weights is not None:
        squared = F.mse_loss(prediction.float(), target.to(device).float(), reduction="none")
        weight = per_pixel_weights.to(device).expand_as(squared)
        per_example = (squared * weight).flatten(1).sum(1)
        if example_weights is not None:
            per_example = per_example * example_weights.to(device)
        return per_example.sum() / weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
    if example_weights is None:
        return F.mse_loss(prediction.float(), target.to(device).float())
    per_example = F.mse_loss(prediction.float(), target.to(device).float(), reduction="none").flatten(1).mean(1)
    return (per_example * example_weights.to(device)).mean()


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

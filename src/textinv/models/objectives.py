"""Training objectives: what a model family is trained to predict, behind one interface.

The loss code draws a timestep, noises the latents, builds the target and weights the examples by
asking an :class:`Objective`, never by branching on the model family. Two objectives:

* :class:`DenoisingDiffusion` — DDPM-style (SD 1.x/2.x, SDXL): integer timesteps, ``scheduler.add_noise``,
  a target by ``prediction_type``, optional min-SNR-gamma weights.
* :class:`FlowMatching` — rectified flow (SD3/3.5, Flux.1; Esser et al. 2024, https://arxiv.org/abs/2403.03206):
  ``noisy = (1 - sigma) * x0 + sigma * noise``, target ``noise - x0``, model timestep ``sigma * T``.

The "timestep" tensor handed between an objective's methods is its own: a long tensor of timesteps for
DenoisingDiffusion, a float32 tensor of sigmas in (0, 1] for FlowMatching; shape [batch] either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

from textinv.errors import UserError

# diffusers' names (training_utils.compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3).
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class ObjectiveSettings:
    """How an objective draws timesteps and weights examples (the DDPM fields are today's LossSettings')."""

    timestep_sampling: str = "uniform"  # DDPM only: uniform | logit_normal
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    snr_gamma: Optional[float] = None  # DDPM only: min-SNR-gamma
    # Flow matching. Default 'none' (u uniform, unweighted) as train_dreambooth_lora_flux.py's --weighting_scheme,
    # whose help reads 'We default to the "none" weighting scheme for uniform sampling and uniform loss';
    # train_dreambooth_lora_sd3.py defaults to 'logit_normal' instead (and has no 'none').
    weighting_scheme: str = "none"
    logit_mean: float = 0.0  # > 0 favours LESS noise: u indexes a descending grid, as in diffusers' scripts
    logit_std: float = 1.0
    mode_scale: float = 1.29  # the scripts' --mode_scale default
    flow_shift: Optional[float] = None  # None: the scheduler's shift (see FlowMatching)

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(
                f"weighting scheme {self.weighting_scheme!r} is unknown: use one of {', '.join(WEIGHTING_SCHEMES)}"
            )
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise UserError(f"flow shift {self.flow_shift} must be > 0 (SD3 uses 3.0); leave it out for the model's")


class Objective(Protocol):
    """What the loss and the held-out evaluation ask of a training objective."""

    num_train_timesteps: int

    def draw_timestep(self, generator: torch.Generator, settings: ObjectiveSettings) -> torch.Tensor: ...
    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...
    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor: ...
    def loss_weights(self, timesteps: torch.Tensor, settings: ObjectiveSettings) -> Optional[torch.Tensor]: ...
    def stratified_timesteps(self, fractions: torch.Tensor) -> torch.Tensor: ...
    def describe(self) -> str: ...


class DenoisingDiffusion:
    """DDPM-style training with a diffusers noise scheduler (DDPMScheduler): textinv's loss as it was.

    Timesteps are long tensors in [0, T). Draws, noisy latents and targets are bit-identical to
    textinv.training.loss's functions; min-SNR weights agree to float32 rounding (see loss_weights).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def draw_timestep(self, generator: torch.Generator, settings: ObjectiveSettings) -> torch.Tensor:
        """One timestep, shape [1] (long), one draw from ``generator``."""
        steps = self.num_train_timesteps
        if settings.timestep_sampling == "uniform":
            return torch.randint(0, steps, (1,), generator=generator)
        if settings.timestep_sampling == "logit_normal":
            # diffusers' draw (torch.normal(mean, std)) differs from the former randn * std + mean in the last float32
            # bit for some draws, never in the timestep (tests/test_objectives.py compares 3 settings x 2000 seeds).
            u = compute_density_for_timestep_sampling(
                "logit_normal",
                1,
                logit_mean=settings.timestep_logit_mean,
                logit_std=settings.timestep_logit_std,
                generator=generator,
            )
            return (u * steps).long().clamp_(0, steps - 1)
        raise UserError(f"--timestep_sampling {settings.timestep_sampling!r} is not one of: uniform, logit_normal")

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict, by the scheduler's ``prediction_type``."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise UserError(f"the model's scheduler has prediction_type {kind!r}, which textinv cannot train")

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps

    def loss_weights(self, timesteps: torch.Tensor, settings: ObjectiveSettings) -> Optional[torch.Tensor]:
        """Min-SNR-gamma weights (Hang et al. 2023) [batch], or None without ``settings.snr_gamma``.

        min(SNR, gamma) weighs an x0 error; an epsilon error is the x0 error times SNR, a velocity error
        times (SNR + 1), hence the division. diffusers' compute_snr (float32, via square roots) agrees with
        textinv's former float64 alpha_bar / (1 - alpha_bar) to ~4e-7 relative, so the weights may differ
        from loss.min_snr_weights in the last float32 bits, never more.
        """
        if settings.snr_gamma is None:
            return None
        snr = compute_snr(self.scheduler, timesteps.long()).to(torch.float64)
        clipped = snr.clamp(max=settings.snr_gamma)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (clipped / snr).float()
        if kind == "v_prediction":
            return (clipped / (snr + 1.0)).float()
        return clipped.float()  # "sample": the target is x0 itself

    def stratified_timesteps(self, fractions: torch.Tensor) -> torch.Tensor:
        """``min(T - 1, int(u * T))`` for each fraction u in [0, 1) (float64 arithmetic, as Python floats)."""
        steps = self.num_train_timesteps
        return (fractions.to(torch.float64) * steps).floor().long().clamp(0, steps - 1)

    def describe(self) -> str:
        return str(self.scheduler.config.prediction_type)


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, Mapping) else dict(vars(config))


class FlowMatching:
    """Rectified-flow training for a FlowMatchEulerDiscreteScheduler config (SD3/3.5, Flux.1).

    The timesteps carried between methods are sigmas (float32, [batch]); the denoiser gets ``sigma * T``.
    Sigmas lie on a fixed grid of T values: the unshifted grid ``(T, T-1, ..., 1) / T`` (the scheduler's
    construction grid, descending), shifted once. Which shift applies:

    1. ``settings.flow_shift`` if given: ``s' = shift * s / (1 + (shift - 1) * s)``, whatever the scheduler says;
    2. else, when the scheduler has ``use_dynamic_shifting`` (Flux.1-dev): the shift Flux's pipeline uses at
       generation for this resolution, ``mu = calculate_shift(image_seq_len, base_image_seq_len,
       max_image_seq_len, base_shift, max_shift)`` and ``s' = scheduler.time_shift(mu, 1.0, s)``, i.e.
       ``exp(mu) / (exp(mu) + 1/s - 1)`` (the static formula with shift ``exp(mu)``). ``image_seq_len`` is the
       number of packed latent patches, (h/2)*(w/2) of the latent; None means ``base_image_seq_len``
       (mu = base_shift). (diffusers' train_dreambooth_lora_flux.py trains such configs unshifted.)
    3. else the scheduler's static ``shift`` (SD3: 3.0; Flux.1-schnell: 1.0), applied to the unshifted grid
       exactly as the scheduler's constructor does, so the grid equals the scheduler's own ``sigmas``.
    """

    def __init__(self, scheduler: Any, settings: ObjectiveSettings, image_seq_len: Optional[int] = None) -> None:
        if settings.snr_gamma is not None:
            raise UserError("--snr_gamma is for DDPM models; a flow-matching model weights by --weighting_scheme")
        if settings.timestep_sampling != "uniform":
            raise UserError(
                f"--timestep_sampling {settings.timestep_sampling!r} is for DDPM models; "
                "a flow-matching model draws by --weighting_scheme"
            )
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):  # a stand-in holding only a config
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(_config_dict(scheduler.config))
        config = scheduler.config
        self.scheduler, self.settings = scheduler, settings
        self.num_train_timesteps = steps = int(config.num_train_timesteps)
        # The scheduler's construction grid, before its shift (float32, as it builds it).
        grid = torch.from_numpy(np.linspace(1, steps, steps, dtype=np.float32)[::-1].copy()) / steps
        self.image_seq_len: Optional[int] = None
        if settings.flow_shift is None and config.use_dynamic_shifting:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # heavy import; only for Flux.1

            self.image_seq_len = int(image_seq_len or config.base_image_seq_len)
            seq = (self.image_seq_len, config.base_image_seq_len, config.max_image_seq_len)
            mu = calculate_shift(*seq, config.base_shift, config.max_shift)
            # Both time_shift types are the static formula with this shift: exp(mu) ("exponential") or mu ("linear").
            self.shift = math.exp(mu) if config.time_shift_type == "exponential" else mu
            sigmas = scheduler.time_shift(mu, 1.0, grid)
        else:
            self.shift = float(config.shift if settings.flow_shift is None else settings.flow_shift)
            sigmas = self.shift * grid / (1 + (self.shift - 1) * grid)
        if not self.shift > 0:
            raise UserError(f"flow shift {self.shift:g} must be > 0: pass a positive --flow_shift")
        self.sigmas = sigmas

    def _on_grid(self, fractions: torch.Tensor) -> torch.Tensor:
        """The grid's sigmas at index ``int(u * T)``: u near 0 is the noisiest end (the grid descends)."""
        index = (fractions * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.sigmas[index]

    def draw_timestep(self, generator: torch.Generator, settings: ObjectiveSettings) -> torch.Tensor:
        """One sigma, shape [1] (float32): u by ``settings.weighting_scheme`` (one draw from ``generator``),
        mapped to the grid as diffusers' SD3/Flux training scripts map it to ``scheduler.timesteps``."""
        u = compute_density_for_timestep_sampling(
            settings.weighting_scheme,
            1,
            logit_mean=settings.logit_mean,
            logit_std=settings.logit_std,
            mode_scale=settings.mode_scale,
            generator=generator,
        )
        return self._on_grid(u)

    def _per_example(self, sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigmas.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._per_example(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity d(noisy)/d(sigma)."""
        return noise - latents

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``sigma * T`` (float), what SD3's transformer takes; Flux's caller divides by T again."""
        return timesteps.float() * self.num_train_timesteps

    def loss_weights(self, timesteps: torch.Tensor, settings: ObjectiveSettings) -> Optional[torch.Tensor]:
        """diffusers' SD3 loss weighting [batch]: cosmap and sigma_sqrt weigh; the others are all ones (None)."""
        if settings.weighting_scheme not in ("cosmap", "sigma_sqrt"):
            return None
        return compute_loss_weighting_for_sd3(settings.weighting_scheme, timesteps.float())

    def stratified_timesteps(self, fractions: torch.Tensor) -> torch.Tensor:
        """The grid's sigmas for fractions u in [0, 1): u = 0 gives the largest sigma, u -> 1 the smallest."""
        return self._on_grid(fractions.to(torch.float64))

    def describe(self) -> str:
        where = f", dynamic for {self.image_seq_len} patches" if self.image_seq_len is not None else ""
        return f"flow matching ({self.settings.weighting_scheme}, shift {round(self.shift, 3)}{where})"


def make_objective(scheduler: Any, settings: ObjectiveSettings, image_seq_len: Optional[int] = None) -> Objective:
    """FlowMatching for a FlowMatchEulerDiscreteScheduler (instance, or a config naming it), else DenoisingDiffusion."""
    name = _config_dict(scheduler.config).get("_class_name", type(scheduler).__name__)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or name == FLOW_SCHEDULER:
        return FlowMatching(scheduler, settings, image_seq_len)
    return DenoisingDiffusion(scheduler)

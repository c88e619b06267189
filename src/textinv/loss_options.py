"""The loss options (issues 8, 15, 25): how training draws timesteps and weights examples, offset noise, and the
flow-matching settings of SD3/3.5 and Flux.1.

A mixin of :class:`textinv.config.TrainConfig` (keyword-only fields, so TrainConfig keeps its positional order);
like config.py it must not import torch. textinv.training.loss turns them into the objective's settings
(textinv.models.objectives), which the model family's objective uses: the DDPM options for SD 1.x/2.x/XL, the
flow-matching ones for SD3 and Flux.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from textinv.errors import UserError
from textinv.fields import option

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")  # issue 8
# diffusers' --weighting_scheme choices (train_dreambooth_lora_sd3.py / _flux.py; issue 25).
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")


def _option(default: Any, help: str, choices: Optional[tuple[str, ...]] = None) -> Any:
    return option(default, help=help, choices=choices, kw_only=True)  # keyword-only: TrainConfig's order stays


@dataclass
class LossOptions:
    # --- Loss weighting and timestep sampling (issue 8) -------------------------------------------
    # Not in ppdiffusers, which draws t uniformly and weights every example alike (what "uniform"
    # and snr_gamma=None give). bench/learning.py measures them; docs/quality.md "How well it learns".
    # logit_normal: t = sigmoid(N(mean, std)) * num_train_timesteps (SD3's rectified-flow sampler,
    # Esser et al. 2024, sec. 3.1), which draws the middle timesteps more often than the ends.
    timestep_sampling: str = _option(
        "uniform",
        help="how training draws timesteps: uniform (ppdiffusers) or logit_normal (middle steps more often)",
        choices=TIMESTEP_SAMPLINGS,
    )
    timestep_logit_mean: float = _option(0.0, help="mean of the logit-normal timestep draw (0 = centred)")
    timestep_logit_std: float = _option(1.0, help="spread of the logit-normal timestep draw")
    # Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    # Strategy"): each example's loss x min(SNR(t), gamma) / SNR(t) (epsilon; / (SNR(t) + 1) for
    # v_prediction). None = unweighted MSE; 5.0 is the paper's value.
    snr_gamma: Optional[float] = _option(None, help="min-SNR-gamma loss weighting, e.g. 5.0; leave out for plain MSE")
    # ppdiffusers' flag (issue 15): offset noise (Guttenberg 2023), noise += offset * randn(b, c, 1, 1).
    noise_offset: float = _option(
        0.0, help="offset noise strength, e.g. 0.1 (0 = plain noise, as ppdiffusers defaults)"
    )

    # --- Flow matching: SD3/3.5 and Flux.1 (issue 25; textinv.models.objectives) ------------------------------------
    # diffusers' train_dreambooth_lora_sd3.py / _flux.py flags and defaults: --weighting_scheme "none" (uniform draws,
    # unweighted), --logit_mean 0.0, --logit_std 1.0, --mode_scale 1.29 (SD3 paper, Esser et al. 2024, sec. 3.1).
    weighting_scheme: str = _option(
        "none",
        help="flow-matching timestep draw and loss weight (SD3, Flux): none (uniform), logit_normal, mode, cosmap, "
        "sigma_sqrt",
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = _option(0.0, help="mean of --weighting_scheme logit_normal")
    logit_std: float = _option(1.0, help="spread of --weighting_scheme logit_normal")
    mode_scale: float = _option(1.29, help="scale of --weighting_scheme mode")
    # The shift of the noise levels, sigma' = s * sigma / (1 + (s - 1) * sigma). Default: the model's own rule, as
    # its pipeline samples: SD3's static shift (3.0), Flux's resolution-dependent one.
    flow_shift: Optional[float] = _option(
        None, help="flow-matching noise shift (SD3: 3.0; Flux: by resolution); default: the model scheduler's rule"
    )

    def validate_loss_options(self) -> None:
        """One-line UserErrors for values no objective can use (choices are checked with every option's)."""
        if not self.timestep_logit_std > 0:
            raise UserError(f"--timestep_logit_std {self.timestep_logit_std} must be > 0, e.g. 1.0")
        if not -10.0 <= self.timestep_logit_mean <= 10.0:
            raise UserError(f"--timestep_logit_mean {self.timestep_logit_mean} must be in [-10, 10], e.g. 0.0")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(
                f"--snr_gamma {self.snr_gamma} must be > 0 (5.0 is the min-SNR paper's value); leave it out for plain MSE"
            )
        if not 0.0 <= self.noise_offset < float("inf"):
            raise UserError(f"--noise_offset {self.noise_offset} must be >= 0, e.g. 0.1 (0 turns it off)")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise UserError(f"--flow_shift {self.flow_shift} must be > 0, e.g. 3.0 (1.0 = no shift)")
        if not self.logit_std > 0:
            raise UserError(f"--logit_std {self.logit_std} must be > 0, e.g. 1.0")

"""Training objectives (textinv.models.objectives): DDPM exactly as textinv.training.loss was, flow matching by formula."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from textinv.errors import UserError
from textinv.models.objectives import (
    WEIGHTING_SCHEMES,
    DenoisingDiffusion,
    FlowMatching,
    ObjectiveSettings,
    make_objective,
)

T = 1000
SD3 = dict(num_train_timesteps=T, shift=3.0)  # SD3 / SD3.5 scheduler_config.json
FLUX_DEV = dict(
    num_train_timesteps=T,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _ddpm(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )


def _unshifted() -> torch.Tensor:
    """(T, T-1, ..., 1) / T in float64: the flow grid before any shift, index 0 the noisiest."""
    return torch.arange(T, 0, -1, dtype=torch.float64) / T


# --- DenoisingDiffusion is loss.py's former code ---------------------------------------------------
# The references below are textinv.training.loss's draw_timestep, loss_target and min_snr_weights as they
# were before loss.py switched to this module, written out here so the comparison outlives them.


def _former_draw(generator: torch.Generator, sampling: str, mean: float, std: float) -> torch.Tensor:
    if sampling == "uniform":
        return torch.randint(0, T, (1,), generator=generator)
    logit = torch.randn((1,), generator=generator) * std + mean
    return (torch.sigmoid(logit) * T).long().clamp_(0, T - 1)


def _former_min_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)[timesteps.long()]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    weights = clipped / snr if kind == "epsilon" else clipped / (snr + 1.0) if kind == "v_prediction" else clipped
    return weights.float()


@pytest.mark.parametrize(
    "sampling, mean, std",
    [("uniform", 0.0, 1.0), ("logit_normal", 0.0, 1.0), ("logit_normal", 0.3, 1.2), ("logit_normal", -1.2, 0.7)],
)
def test_ddpm_draws_are_the_former_draws(sampling: str, mean: float, std: float) -> None:
    # logit_normal now draws through diffusers' compute_density_for_timestep_sampling: the same timesteps as the
    # former hand-written draw (_former_draw), and the generator left in the same state.
    settings = ObjectiveSettings(timestep_sampling=sampling, timestep_logit_mean=mean, timestep_logit_std=std)
    objective = DenoisingDiffusion(_ddpm())
    drawn = []
    for seed in range(2000):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = _former_draw(a, sampling, mean, std)
        got = objective.draw_timestep(b, settings)
        assert torch.equal(got, expected) and got.dtype == expected.dtype == torch.long
        assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))  # same state after
        drawn.append(int(got))
    assert len(set(drawn)) > 100 and 0 <= min(drawn) and max(drawn) < T


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_ddpm_noisy_target_and_weights_are_the_former(kind: str) -> None:
    scheduler = _ddpm(kind)
    objective = DenoisingDiffusion(scheduler)
    generator = torch.Generator().manual_seed(7)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 1, 500, 999])
    assert torch.equal(objective.noisy(latents, noise, timesteps), scheduler.add_noise(latents, noise, timesteps))
    expected = {"epsilon": noise, "sample": latents}.get(kind)
    if expected is None:  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
        alpha_bar = scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        torch.testing.assert_close(objective.target(latents, noise, timesteps), expected)
        assert torch.equal(
            objective.target(latents, noise, timesteps), scheduler.get_velocity(latents, noise, timesteps)
        )
    else:
        assert torch.equal(objective.target(latents, noise, timesteps), expected)
    assert objective.model_timesteps(timesteps) is timesteps
    assert objective.loss_weights(timesteps, ObjectiveSettings()) is None
    for gamma in (1.0, 5.0):
        weights = objective.loss_weights(timesteps, ObjectiveSettings(snr_gamma=gamma))
        assert weights is not None and weights.shape == (4,) and weights.dtype == torch.float32
        torch.testing.assert_close(weights, _former_min_snr(scheduler, timesteps, gamma), rtol=1e-6, atol=0)
    assert objective.describe() == kind


def test_ddpm_stratified_timesteps_are_held_outs() -> None:
    objective = DenoisingDiffusion(_ddpm())
    count, rng = 37, torch.Generator().manual_seed(0)
    strata, offsets = torch.randperm(count, generator=rng).tolist(), torch.rand(count, dtype=torch.float64).tolist()
    expected = [min(T - 1, int((s + r) * T / count)) for s, r in zip(strata, offsets)]  # held_out.py's expression
    fractions = torch.tensor([(s + r) / count for s, r in zip(strata, offsets)], dtype=torch.float64)
    assert objective.stratified_timesteps(fractions).tolist() == expected
    assert objective.stratified_timesteps(torch.tensor([0.0, 0.5, 0.9999999999])).tolist() == [0, 500, 999]


def test_ddpm_unknown_sampling_is_a_user_error() -> None:
    with pytest.raises(UserError, match="'cosine'"):
        DenoisingDiffusion(_ddpm()).draw_timestep(torch.Generator(), ObjectiveSettings(timestep_sampling="cosine"))


# --- FlowMatching ----------------------------------------------------------------------------------


def test_flow_noisy_target_and_model_timestep_at_known_sigmas() -> None:
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**SD3), ObjectiveSettings())
    latents, noise = torch.full((2, 3, 2, 2), 2.0), torch.full((2, 3, 2, 2), -1.0)
    sigmas = torch.tensor([0.25, 1.0])
    noisy = objective.noisy(latents, noise, sigmas)
    assert torch.allclose(noisy[0], torch.full((3, 2, 2), 0.75 * 2.0 + 0.25 * -1.0))  # per example
    assert torch.allclose(noisy[1], noise[1])  # sigma 1 is pure noise
    assert torch.equal(objective.target(latents, noise, sigmas), torch.full((2, 3, 2, 2), -3.0))
    assert objective.model_timesteps(sigmas).tolist() == [250.0, 1000.0]


def test_flow_draws_land_on_the_schedulers_grid() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3)
    objective = FlowMatching(scheduler, ObjectiveSettings(weighting_scheme="logit_normal"))
    for seed in range(100):
        sigma = objective.draw_timestep(torch.Generator().manual_seed(seed), objective.settings)
        assert sigma.shape == (1,) and sigma.dtype == torch.float32
        index = int((scheduler.sigmas[:T] == sigma).nonzero()[0])  # raises if off the grid
        assert math.isclose(float(scheduler.timesteps[index]) / T, float(sigma), rel_tol=1e-6)


def test_static_shift_is_applied_once() -> None:
    grid = _unshifted()
    sd3 = FlowMatching(FlowMatchEulerDiscreteScheduler(**SD3), ObjectiveSettings())
    torch.testing.assert_close(sd3.sigmas.double(), 3.0 * grid / (1 + 2.0 * grid), rtol=1e-6, atol=0)
    assert torch.equal(sd3.sigmas, FlowMatchEulerDiscreteScheduler(**SD3).sigmas)  # exactly the scheduler's grid
    # --flow_shift replaces the scheduler's 3.0 (it is not applied on top of it).
    two = FlowMatching(FlowMatchEulerDiscreteScheduler(**SD3), ObjectiveSettings(flow_shift=2.0))
    torch.testing.assert_close(two.sigmas.double(), 2.0 * grid / (1 + grid), rtol=1e-6, atol=0)
    assert sd3.describe() == "flow matching (none, shift 3.0)"


def test_dynamic_shift_follows_the_resolution() -> None:
    grid = _unshifted()
    for seq_len, mu in ((None, 0.5), (256, 0.5), (4096, 1.15), (2176, (0.5 + 1.15) / 2)):
        objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**FLUX_DEV), ObjectiveSettings(), seq_len)
        expected = math.exp(mu) / (math.exp(mu) + 1 / grid - 1)
        torch.testing.assert_close(objective.sigmas.double(), expected, rtol=1e-6, atol=0)
        assert objective.shift == pytest.approx(math.exp(mu))
    fixed = FlowMatching(FlowMatchEulerDiscreteScheduler(**FLUX_DEV), ObjectiveSettings(flow_shift=1.0), 4096)
    torch.testing.assert_close(fixed.sigmas.double(), grid, rtol=1e-6, atol=0)  # --flow_shift wins over dynamic


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_flow_draw_is_one_draw_from_the_examples_generator(scheme: str) -> None:
    settings = ObjectiveSettings(weighting_scheme=scheme)
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**SD3), settings)
    grid = FlowMatchEulerDiscreteScheduler(**SD3).sigmas
    for seed in range(20):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        sigma = objective.draw_timestep(a, settings)
        u = compute_density_for_timestep_sampling(scheme, 1, 0.0, 1.0, 1.29, generator=b)
        assert torch.equal(sigma, grid[[min(T - 1, int(float(u) * T))]])
        assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))


def test_logit_normal_draws_repeat_by_seed_and_differ_across_seeds() -> None:
    settings = ObjectiveSettings(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8)
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**SD3), settings)

    def draw(seed: int) -> float:
        return float(objective.draw_timestep(torch.Generator().manual_seed(seed), settings))

    assert [draw(seed) for seed in range(30)] == [draw(seed) for seed in range(30)]
    assert len({draw(seed) for seed in range(30)}) > 20
    assert all(0.0 < draw(seed) <= 1.0 for seed in range(30))


def test_flow_loss_weights_match_the_sd3_formulas() -> None:
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**SD3), ObjectiveSettings())
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    cosmap = objective.loss_weights(sigmas, ObjectiveSettings(weighting_scheme="cosmap"))
    expected = torch.tensor([2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.1, 0.5, 0.9)])
    assert cosmap is not None and torch.allclose(cosmap, expected)
    sqrt = objective.loss_weights(sigmas, ObjectiveSettings(weighting_scheme="sigma_sqrt"))
    assert sqrt is not None and torch.allclose(sqrt, torch.tensor([100.0, 4.0, 1 / 0.81]))
    for scheme in ("none", "logit_normal", "mode"):
        assert objective.loss_weights(sigmas, ObjectiveSettings(weighting_scheme=scheme)) is None


@pytest.mark.parametrize("config", [SD3, FLUX_DEV])
def test_flow_stratified_timesteps_cover_the_range(config: dict) -> None:
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**config), ObjectiveSettings(), 1024)
    fractions = (torch.arange(64, dtype=torch.float64) + 0.5) / 64
    sigmas = objective.stratified_timesteps(torch.cat([torch.zeros(1, dtype=torch.float64), fractions]))
    assert bool((sigmas[1:] <= sigmas[:-1]).all())  # more noise for smaller u, as the grid descends
    assert float(sigmas[0]) == 1.0 and 0.0 < float(sigmas.min()) < 0.05
    assert float(objective.stratified_timesteps(torch.tensor([0.9999999]))) == float(objective.sigmas[-1])


def test_make_objective_picks_by_scheduler() -> None:
    assert isinstance(make_objective(_ddpm(), ObjectiveSettings()), DenoisingDiffusion)
    assert isinstance(make_objective(FlowMatchEulerDiscreteScheduler(**SD3), ObjectiveSettings()), FlowMatching)
    stand_in = SimpleNamespace(config={"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3})
    objective = make_objective(stand_in, ObjectiveSettings())
    assert isinstance(objective, FlowMatching) and objective.shift == 3.0


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="'lognorm'"):
        ObjectiveSettings(weighting_scheme="lognorm")
    with pytest.raises(UserError, match="flow shift 0"):
        ObjectiveSettings(flow_shift=0.0)
    with pytest.raises(UserError, match="must be > 0"):
        FlowMatching(FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=-1.0), ObjectiveSettings())
    with pytest.raises(UserError, match="--snr_gamma"):
        FlowMatching(FlowMatchEulerDiscreteScheduler(**SD3), ObjectiveSettings(snr_gamma=5.0))

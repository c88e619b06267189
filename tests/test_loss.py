"""The loss target follows the scheduler's prediction_type, and gradients reach only the vectors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from textinv.data import Example, LatentCache
from textinv.training import denoising_loss


class _ZeroUNet(torch.nn.Module):
    """Predicts zeros, so the loss equals the mean square of the target."""

    dtype = torch.float32

    def forward(self, sample, timestep, encoder_hidden_states):
        self.seen = (sample.clone(), timestep.clone())
        return SimpleNamespace(sample=torch.zeros_like(sample) + 0 * encoder_hidden_states.sum())


class _Tokenizer:
    model_max_length = 4

    def __call__(self, captions, **kwargs):
        return SimpleNamespace(input_ids=torch.zeros(len(captions), 4, dtype=torch.long))


def _loss(prediction_type: str):
    scheduler = DDPMScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet = _ZeroUNet()
    parts = SimpleNamespace(noise_scheduler=scheduler, unet=unet)
    cache = LatentCache(mean=torch.randn(1, 1, 4, 2, 2), std=torch.rand(1, 1, 4, 2, 2), scaling_factor=0.5)
    vector = torch.zeros(1, requires_grad=True)
    model = lambda ids: torch.zeros(ids.shape[0], 4, 8) + vector  # noqa: E731
    example = Example(index=0, image_index=0, flipped=False, caption="x", noise_seed=123)
    loss = denoising_loss(model, parts, _Tokenizer(), cache, [example], torch.device("cpu"))
    # Redraw what the example's generator gives, in the documented order.
    generator = torch.Generator().manual_seed(123)
    latent = cache.sample(0, False, generator).unsqueeze(0)
    noise = torch.randn(latent.shape[1:], generator=generator).unsqueeze(0)
    timestep = torch.randint(0, 1000, (1,), generator=generator)
    return loss, scheduler, latent, noise, timestep, unet


def test_epsilon_target_is_the_noise() -> None:
    loss, scheduler, latent, noise, timestep, unet = _loss("epsilon")
    assert torch.equal(unet.seen[1], timestep)
    assert torch.allclose(unet.seen[0], scheduler.add_noise(latent, noise, timestep))
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_v_prediction_target_is_the_velocity() -> None:
    loss, scheduler, latent, noise, timestep, _ = _loss("v_prediction")
    velocity = scheduler.get_velocity(latent, noise, timestep)
    assert loss.item() == pytest.approx(velocity.pow(2).mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(noise.pow(2).mean().item(), rel=1e-3)


def test_cached_latent_sample_matches_vae_sampling() -> None:
    cache = LatentCache(mean=torch.randn(2, 2, 4, 3, 3), std=torch.rand(2, 2, 4, 3, 3), scaling_factor=0.18215)
    generator = torch.Generator().manual_seed(0)
    drawn = cache.sample(1, True, generator)
    eps = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(drawn, (cache.mean[1, 1] + cache.std[1, 1] * eps) * 0.18215)

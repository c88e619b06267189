"""The loss target follows the scheduler's prediction_type, and gradients reach only the vectors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from textinv.data.examples import Example
from textinv.data.latents import LatentCache, LatentsEachStep, encode_latent_cache
from textinv.models.families import get_family
from textinv.training.loss import denoising_loss


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
    scheduler = DDPMScheduler(
        prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    unet = _ZeroUNet()
    parts = SimpleNamespace(noise_scheduler=scheduler, denoiser=unet, family=get_family("sd1"), vae_scale_factor=8)
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


def _tiny_vae(scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


@pytest.mark.parametrize("scaling_factor,shift_factor", [(0.18215, None), (1.5305, 0.0609)])  # SD1, SD3
def test_cached_latent_sample_matches_vae_sampling(scaling_factor: float, shift_factor: float | None) -> None:
    """Both latent sources draw what diffusers' ``vae.encode(x).latent_dist.sample(generator)`` gives,
    shifted and scaled as the reference training scripts do, from the same generator state."""
    vae = _tiny_vae(scaling_factor, shift_factor)
    views = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cache = encode_latent_cache(vae, views, random_flip=True)
    each_step = LatentsEachStep(vae, views, random_flip=True)
    for image_index, flipped in ((0, False), (1, True), (1, False)):
        pixels = views[image_index].flip(-1) if flipped else views[image_index]
        with torch.no_grad():
            drawn = vae.encode(pixels.unsqueeze(0)).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        expected = ((drawn - (shift_factor or 0.0)) * scaling_factor)[0]
        for source in (cache, each_step):
            got = source.sample(image_index, flipped, torch.Generator().manual_seed(7))
            assert got.shape == expected.shape == (4, 8, 8)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        # A different generator state gives a different draw: the noise is really drawn, not the mean.
        other = cache.sample(image_index, flipped, torch.Generator().manual_seed(8))
        assert (other - expected).abs().max() > 1e-3
    assert not torch.equal(cache.mean[1, 0], cache.mean[1, 1])  # the mirror view is encoded on its own

"""The latent cache: each training view's VAE latent distribution, encoded once.

Training steps then draw latents from the cached distribution ``mean + std * eps`` exactly as
``latent_dist.sample()`` would, or take its mean (``--latent_sampling deterministic``, A1111's name; the
draw of ``eps`` still happens, so the noise and timestep draws that follow stay the same).
With aspect-ratio buckets the views are a list of tensors of their buckets' sizes, and each view's
latents have their bucket's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class LatentCache:
    """VAE latent distributions of every view: ``[num_images, num_flips, C, h, w]``."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float = 0.0
    deterministic: bool = False

    @property
    def num_images(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_flips(self) -> int:
        return int(self.mean.shape[1])

    def sample(self, image_index: int, flipped: bool, generator: torch.Generator) -> torch.Tensor:
        """One scaled latent drawn from a view's distribution (what latent_dist.sample() gives)."""
        flip = 1 if flipped and self.num_flips > 1 else 0
        mean, std = self.mean[image_index, flip], self.std[image_index, flip]
        return _scaled_sample(mean, std, generator, self.shift_factor, self.scaling_factor, self.deterministic)


def _scaled_sample(
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator,
    shift: float,
    scale: float,
    deterministic: bool = False,
) -> torch.Tensor:
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    if deterministic:
        return (mean - shift) * scale
    return (mean + std * eps - shift) * scale


def vae_scaling(vae: Any) -> tuple[float, float]:
    """The VAE's ``(scaling_factor, shift_factor)``: latents the UNet sees are ``(z - shift) * scale``.

    0.18215 is SD 1.x/2.x's factor, for configs written before diffusers recorded it.
    """
    config = vae.config
    return float(getattr(config, "scaling_factor", 0.18215)), float(getattr(config, "shift_factor", None) or 0.0)


class LatentsEachStep:
    """No cache: every example's view goes through the VAE again, as the reference scripts do.

    Same interface and the same draws as :class:`LatentCache` (``--no_cache_latents``); it exists to
    show the cache changes nothing but the time, and for memory-rich runs that want it.
    """

    def __init__(self, vae: Any, views: Sequence[torch.Tensor], random_flip: bool, deterministic: bool = False) -> None:
        self.vae, self.views, self.random_flip = vae, views, random_flip
        self.scaling_factor, self.shift_factor = vae_scaling(vae)
        self.deterministic = deterministic

    @property
    def num_images(self) -> int:
        return len(self.views)

    @property
    def num_flips(self) -> int:
        return 2 if self.random_flip else 1

    @torch.no_grad()
    def sample(self, image_index: int, flipped: bool, generator: torch.Generator) -> torch.Tensor:
        view = self.views[image_index]
        pixels = view.flip(-1) if flipped and self.random_flip else view
        parameter = next(self.vae.parameters())
        dist = self.vae.encode(pixels.unsqueeze(0).to(parameter.device, parameter.dtype)).latent_dist
        return _scaled_sample(
            dist.mean[0].float().cpu(),
            dist.std[0].float().cpu(),
            generator,
            self.shift_factor,
            self.scaling_factor,
            self.deterministic,
        )


class LazyLatentCache:
    """The latent cache, filled as training draws: a view goes through the VAE when an example first uses it.

    Each view is encoded alone, as :func:`encode_latent_cache` does, so the latents, the draws and the
    run are the same (tested bit for bit); only the time moves: the first step comes as soon as the
    models are loaded, and the first epoch's steps also fill the cache. Once every view is in, the
    VAE and the pixels are let go.
    """

    def __init__(self, vae: Any, views: Sequence[torch.Tensor], random_flip: bool, deterministic: bool = False) -> None:
        self.vae: Any = vae
        self.views: Optional[Sequence[torch.Tensor]] = views
        self._num_images, self._num_flips = len(views), 2 if random_flip else 1
        self.scaling_factor, self.shift_factor = vae_scaling(vae)
        self.deterministic = deterministic
        self.encoded: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_images(self) -> int:
        return self._num_images

    @property
    def num_flips(self) -> int:
        return self._num_flips

    @property
    def views_encoded(self) -> Optional[tuple[int, int]]:
        """(encoded, all) views while the cache fills; None once it is full."""
        total = self._num_images * self._num_flips
        return None if len(self.encoded) == total else (len(self.encoded), total)

    def sample(self, image_index: int, flipped: bool, generator: torch.Generator) -> torch.Tensor:
        flip = 1 if flipped and self._num_flips > 1 else 0
        if (image_index, flip) not in self.encoded:
            assert self.views is not None
            self.encoded[image_index, flip] = _encode_view(self.vae, self.views[image_index], bool(flip))
            if self.views_encoded is None:
                self.vae = self.views = None  # every view is in: the VAE leaves memory
        mean, std = self.encoded[image_index, flip]
        return _scaled_sample(mean, std, generator, self.shift_factor, self.scaling_factor, self.deterministic)


@torch.no_grad()
def _encode_view(vae: Any, view: torch.Tensor, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One view's latent distribution (mean, std), float32 on the CPU."""
    parameter = next(vae.parameters())
    pixels = view.flip(-1) if flipped else view
    dist = vae.encode(pixels.unsqueeze(0).to(parameter.device, parameter.dtype)).latent_dist
    return dist.mean[0].float().cpu(), dist.std[0].float().cpu()


def encode_latent_cache(vae: Any, views: torch.Tensor, random_flip: bool) -> LatentCache:
    """Encode each view (and its mirror when flipping) once, up front."""
    flips = [False, True] if random_flip else [False]
    means, stds = [], []
    for view in views:
        encoded = [_encode_view(vae, view, flipped) for flipped in flips]
        means.append(torch.stack([mean for mean, _ in encoded]))
        stds.append(torch.stack([std for _, std in encoded]))
    scaling_factor, shift_factor = vae_scaling(vae)
    return LatentCache(
        mean=torch.stack(means), std=torch.stack(stds), scaling_factor=scaling_factor, shift_factor=shift_factor
    )

"""The example stream: which view, caption and noise seed each training example has.

The order of examples is a pure function of ``(seed, example index)``: which image, whether
flipped, which template, and the seed of its noise. So a run can resume at any example, and N
processes reading every N-th example see what one process would.

With aspect-ratio buckets (``bucket_of``), an epoch is a shuffled sequence of whole batches, each of one
bucket's images: a bucket's slots are shuffled and cut into batches of ``batch_size``, the last one filled
up with other slots of the same bucket drawn at random, and the batches shuffled. Micro-batches start at
multiples of ``batch_size``, so every micro-batch is one bucket's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from textinv.data.captions import Captioner


@dataclass(frozen=True)
class Example:
    """One training example: which view, which caption, and the seed of its random draws."""

    index: int
    image_index: int
    flipped: bool
    caption: str
    noise_seed: int
    # With buckets: the image's size before resizing, (height, width), for SDXL's time ids.
    original_size: Optional[tuple[int, int]] = None


class ExampleStream:
    """The endless, reproducible sequence of training examples.

    Examples ``[k*L, (k+1)*L)`` form epoch ``k`` (``L = num_images * repeats``): a shuffled pass over
    every image ``repeats`` times, as the reference scripts' shuffled, repeated dataset gives.
    """

    def __init__(
        self,
        num_images: int,
        repeats: int,
        templates: Sequence[str],
        placeholder_text: str,
        random_flip: bool,
        seed: int,
        captioner: Optional[Captioner] = None,
        bucket_of: Optional[Sequence[int]] = None,
        batch_size: int = 1,
        original_sizes: Optional[Sequence[tuple[int, int]]] = None,
    ) -> None:
        self.num_images, self.repeats = num_images, repeats
        self.captioner = captioner or Captioner(templates, placeholder_text)
        self.templates, self.placeholder_text = self.captioner.templates, placeholder_text
        self.random_flip, self.seed = random_flip, seed
        self.bucket_of, self.batch_size = (list(bucket_of) if bucket_of is not None else None), batch_size
        self.original_sizes = list(original_sizes) if original_sizes is not None else None
        self.epoch_length = num_images * repeats
        if self.bucket_of is not None:  # each bucket's slots round up to whole batches
            per_bucket = np.bincount(self.bucket_of) * repeats
            self.epoch_length = int(sum(-(-count // batch_size) * batch_size for count in per_bucket if count))

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0, epoch])))
        if self.bucket_of is None:
            return rng.permutation(self.epoch_length)
        slots = np.arange(self.num_images * self.repeats)
        buckets = np.asarray(self.bucket_of)[slots % self.num_images]
        batches: list[np.ndarray] = []
        for bucket in np.unique(buckets):
            mine = rng.permutation(slots[buckets == bucket])
            short = -len(mine) % self.batch_size
            if short:
                mine = np.concatenate([mine, rng.choice(mine, size=short)])
            batches.extend(mine.reshape(-1, self.batch_size))
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def __getitem__(self, index: int) -> Example:
        epoch, position = divmod(index, self.epoch_length)
        slot = int(self._order(epoch)[position])
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 1, index])))
        flipped = bool(self.random_flip and rng.random() < 0.5)
        template_index = int(rng.integers(len(self.templates)))
        noise_seed = int(rng.integers(2**62))
        image_index = slot % self.num_images
        # The caption's own draws (tag shuffle and dropout), when it has any, use a stream of their own (the
        # held-out set uses 2).
        caption_rng = (
            np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 3, index])))
            if self.captioner.rules.active
            else None
        )
        return Example(
            index=index,
            image_index=image_index,
            flipped=flipped,
            caption=self.captioner.caption(image_index, template_index, caption_rng),
            noise_seed=noise_seed,
            original_size=self.original_sizes[image_index] if self.original_sizes is not None else None,
        )

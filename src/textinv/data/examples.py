"""The example stream: which view, caption and noise seed each training example has.

The order of examples is a pure function of ``(seed, example index)``: which image, whether
flipped, which template, and the seed of its noise. So a run can resume at any example, and N
processes reading every N-th example see what one process would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Example:
    """One training example: which view, which caption, and the seed of its random draws."""

    index: int
    image_index: int
    flipped: bool
    caption: str
    noise_seed: int


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
    ) -> None:
        self.num_images, self.repeats = num_images, repeats
        self.templates, self.placeholder_text = tuple(templates), placeholder_text
        self.random_flip, self.seed = random_flip, seed

    @property
    def epoch_length(self) -> int:
        return self.num_images * self.repeats

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0, epoch])))
        return rng.permutation(self.epoch_length)

    def __getitem__(self, index: int) -> Example:
        epoch, position = divmod(index, self.epoch_length)
        slot = int(self._order(epoch)[position])
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 1, index])))
        flipped = bool(self.random_flip and rng.random() < 0.5)
        template = self.templates[int(rng.integers(len(self.templates)))]
        return Example(
            index=index,
            image_index=slot % self.num_images,
            flipped=flipped,
            caption=template.format(self.placeholder_text),
            noise_seed=int(rng.integers(2**62)),
        )

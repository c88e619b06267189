"""Masks as loss weights (``--alpha_mask``, ``--mask_dir``; issue 17).

A mask (a PNG's alpha channel, as A1111's "use PNG alpha channel as loss weight" and kohya's
``--alpha_mask``; or a grey image of the same name in ``--mask_dir``, white = 1) goes through the same
resize, crop and flip as its image, then down to the latent's size by area averaging: each latent pixel's
weight is the share of its pixels the mask keeps. :func:`textinv.training.loss.denoising_loss` divides the
weighted squared error by the weights' sum, so a mask leaves the learning rate's meaning as it was and a
fully masked-out image gives no gradient at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textinv.data.images import check_image, has_alpha, image_suffixes, make_view, open_upright, upright_size
from textinv.errors import UserError, first_line

logger = logging.getLogger(__name__)


def mask_path(image_path: Path, mask_dir: Path) -> Optional[Path]:
    """The mask of an image in ``mask_dir``: the same file name, else the same stem with any image extension."""
    same = mask_dir / image_path.name
    if same.is_file():
        return same
    suffixes = image_suffixes()
    matches = sorted(p for p in mask_dir.glob(f"{image_path.stem}.*") if p.suffix.lower() in suffixes)
    return matches[0] if matches else None


def load_masks(image_paths: Sequence[Path], mask_dir: Optional[str], alpha_mask: bool) -> list[Optional[Image.Image]]:
    """Each image's mask as a greyscale image of the image's (upright) size, or None (weight 1 everywhere)."""
    if mask_dir is None and not alpha_mask:
        return [None] * len(image_paths)
    masks: list[Optional[Image.Image]] = []
    if alpha_mask:
        for path in image_paths:
            image = open_upright(path)
            masks.append(image.convert("RGBA").getchannel("A") if has_alpha(image) else None)
        opaque = [path.name for path, mask in zip(image_paths, masks) if mask is None]
        if opaque:
            logger.warning(
                "--alpha_mask: %d image(s) have no alpha channel and are trained everywhere: %s",
                len(opaque),
                ", ".join(opaque[:5]),
            )
        return masks
    folder = Path(mask_dir).expanduser()  # type: ignore[arg-type]  # not None here
    for path in image_paths:
        found = mask_path(path, folder)
        if found is None:
            raise UserError(
                f"--mask_dir {mask_dir!r} has no mask for {path.name}; add {path.stem}.png (white = trained, black = ignored)"
            )
        problem = check_image(found)  # the training images' checks: pixel limit before decoding, a full decode
        if problem is not None:
            raise UserError(f"mask {str(found)!r} {problem}; replace it")
        try:
            mask = open_upright(found)
        except (OSError, ValueError, SyntaxError, EOFError) as error:  # Pillow's SyntaxError: a broken PNG (fuzzing)
            raise UserError(f"mask {str(found)!r} is not a readable image ({first_line(error)}); replace it") from None
        image_height, image_width = upright_size(path)
        if mask.size != (image_width, image_height):
            raise UserError(
                f"mask {found.name} is {mask.size[0]}x{mask.size[1]} but its image {path.name} is "
                f"{image_width}x{image_height}; make the mask the image's size"
            )
        masks.append(mask.convert("L"))
    return masks


class LossWeights:
    """Each image's latent-size weight ``[1, h, w]`` in [0, 1] (None: 1 everywhere), flipped with its view."""

    def __init__(self, weights: Sequence[Optional[torch.Tensor]]) -> None:
        self.weights = list(weights)

    def for_example(self, image_index: int, flipped: bool) -> Optional[torch.Tensor]:
        weight = self.weights[image_index]
        return weight.flip(-1) if weight is not None and flipped else weight


def latent_weights(
    masks: Sequence[Optional[Image.Image]],
    sizes: Sequence[tuple[int, int]],
    center_crop: bool,
    interpolation: str,
    vae_scale_factor: int,
) -> Optional[LossWeights]:
    """The masks as latent-size loss weights; None when no image has a mask."""
    if all(mask is None for mask in masks):
        return None
    weights: list[Optional[torch.Tensor]] = []
    for mask, (height, width) in zip(masks, sizes):
        if mask is None:
            weights.append(None)
            continue
        view = make_view(mask, height, width, center_crop, interpolation)
        pixels = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0)[None, None]
        latent_size = (height // vae_scale_factor, width // vae_scale_factor)
        weights.append(F.interpolate(pixels, size=latent_size, mode="area")[0])
    return LossWeights(weights)

"""Training images: finding and checking them, loading them, and their views.

A *view* is one training image after resize/crop, flipped or not. Views are deterministic, so
each goes through the VAE once (textinv.data.latents).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from textinv.config import UserError, first_line

logger = logging.getLogger(__name__)

# Pillow can decompress a small file into a gigantic bitmap; refuse past this many pixels.
MAX_IMAGE_PIXELS = 8192 * 8192
MIN_IMAGE_SIDE = 8

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,  # PIL's "linear" is bilinear, as ppdiffusers maps it
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def image_suffixes() -> set[str]:
    return {suffix.lower() for suffix in Image.registered_extensions()}


def discover_images(train_data_dir: str | Path) -> list[Path]:
    """The readable images in ``train_data_dir`` (not recursive), sorted by name.

    Unreadable image files are reported in one warning and skipped; none readable is an error.
    """
    folder = Path(train_data_dir).expanduser()
    if not folder.exists():
        raise UserError(f"--train_data_dir {str(folder)!r} does not exist; give the folder holding your 3-5 images")
    if not folder.is_dir():
        raise UserError(f"--train_data_dir {str(folder)!r} is a file; give the folder that holds the images")
    suffixes = image_suffixes()
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in entries if p.suffix.lower() in suffixes]
    if not candidates:
        listed = ", ".join(p.name for p in entries[:5]) or "nothing"
        raise UserError(
            f"--train_data_dir {str(folder)!r} has no image files (found: {listed}); put .jpg/.png/.webp images in it"
        )
    readable, problems = [], []
    for path in candidates:
        problem = check_image(path)
        if problem is None:
            readable.append(path)
        else:
            problems.append(f"{path.name} {problem}")
    if not readable:
        raise UserError(
            f"--train_data_dir {str(folder)!r} has no readable image: {'; '.join(problems)}; "
            "replace these with valid images"
        )
    if problems:
        logger.warning("skipping %d unreadable image(s): %s", len(problems), "; ".join(problems))
    return readable


def check_image(
    source: Path | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = MIN_IMAGE_SIDE
) -> str | None:
    """None if ``source`` (a path or an open binary file) decodes as a usable image, else why not,
    worded to follow its name ("is not an image ..."). The size is checked from the header, before
    any pixel is decoded; ``verify()`` then checks the structure and a fresh open decodes it all.
    Shared by the CLI's folder and the web page's uploads, so both accept the same images."""
    try:
        with warnings.catch_warnings():
            # Pillow warns past 89M pixels; the limit below refuses in one line (fuzzing: the warning reached the user).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened as image:
            width, height = image.size
            if width * height > max_pixels:
                return f"is {width}x{height} pixels, more than the limit of {max_pixels} pixels; shrink it"
            if min(width, height) < min_side:
                return f"is {width}x{height}; images need at least {min_side} pixels a side"
            image.verify()
        if not isinstance(source, Path):
            source.seek(0)
        with Image.open(source) as image:
            image.load()
    except UnidentifiedImageError:
        return "is not an image (Pillow cannot read its content)"
    except Image.DecompressionBombError as error:
        # Pillow refuses to open it at all ("Image size (N pixels) exceeds limit of M pixels, ...").
        return f"claims a size far beyond the limit of {max_pixels} pixels ({str(error).split(',')[0]}); shrink it"
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        return f"is a damaged image: {first_line(error)}"
    return None


def open_upright(path: Path) -> Image.Image:
    """An image, loaded, with its EXIF orientation applied."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_rgb(path: Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB; transparency goes on white."""
    image = open_upright(path)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def make_view(image: Image.Image, height: int, width: int, center_crop: bool, interpolation: str) -> Image.Image:
    """Resize to ``width x height``; with ``center_crop``, first crop the centre to that aspect ratio."""
    # Not PIL.ImageOps.fit: it crops with a fractional box inside resize(box=...), and gave other pixels in 124 of
    # 175 cases (7 source sizes x 5 targets x 5 filters, up to 8 levels; 2026-12-02): every cached latent would move.
    if center_crop:
        src_w, src_h = image.size
        target_ratio = width / height
        if src_w / src_h > target_ratio:
            crop_w, crop_h = round(src_h * target_ratio), src_h
        else:
            crop_w, crop_h = src_w, round(src_w / target_ratio)
        left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return image.resize((width, height), resample=_RESAMPLE[interpolation])


def upright_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as :func:`load_rgb` turns it upright (EXIF orientations 5-8 swap the sides)."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class _ViewDataset(torch.utils.data.Dataset):
    def __init__(
        self, paths: Sequence[Path], sizes: Sequence[tuple[int, int]], center_crop: bool, interpolation: str
    ) -> None:
        self.paths, self.sizes = list(paths), list(sizes)
        self.center_crop, self.interpolation = center_crop, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        height, width = self.sizes[index]
        view = make_view(load_rgb(self.paths[index]), height, width, self.center_crop, self.interpolation)
        return to_tensor(view)


def load_views(
    paths: Sequence[Path],
    height: int,
    width: int,
    center_crop: bool,
    interpolation: str,
    num_workers: int = 0,
) -> torch.Tensor:
    """All images as unflipped views, ``[num_images, 3, H, W]``, decoded by ``num_workers`` workers."""
    return torch.stack(load_sized_views(paths, [(height, width)] * len(paths), center_crop, interpolation, num_workers))


def load_sized_views(
    paths: Sequence[Path],
    sizes: Sequence[tuple[int, int]],
    center_crop: bool,
    interpolation: str,
    num_workers: int = 0,
) -> list[torch.Tensor]:
    """Each image as an unflipped view ``[3, H, W]`` of its own (height, width) (aspect-ratio buckets)."""
    loader = torch.utils.data.DataLoader(
        _ViewDataset(paths, sizes, center_crop, interpolation),
        batch_size=None,  # one view at a time, unbatched: the sizes may differ
        num_workers=num_workers,
    )
    return list(loader)

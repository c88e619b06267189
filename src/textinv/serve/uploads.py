"""Files a browser sends to ``textinv serve``: checked, then copied into a folder the server owns.

A browser's file name is a form value like any other, so it never becomes a path: every upload is
stored under a name made here (``00-cat.png``), from a sanitised stem and the format Pillow found
in the bytes. Images are decoded under a pixel limit before anything is kept (a few KB of PNG can
unpack into gigabytes); embedding files go through :func:`textinv.embeddings.read_embeddings`,
which reads pickles without running code.
"""

from __future__ import annotations

import io
import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from textinv.config import UserError, first_line
from textinv.data.images import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, check_image
from textinv.embeddings import MAX_FILE_BYTES
from textinv.errors import printable

logger = logging.getLogger(__name__)

# Formats a training image may have, by Pillow's name for them, and the suffix it is stored with.
IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".pdparams", ".png")
MAX_STEM_CHARS = 40


@dataclass(frozen=True)
class UploadLimits:
    """What one request may send. The pixel limit is the CLI's (textinv.data), so both accept the same images."""

    max_images: int = 20
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS
    min_image_side: int = MIN_IMAGE_SIDE
    max_embedding_bytes: int = MAX_FILE_BYTES  # what textinv reads from any embedding file
    max_caption_bytes: int = 4096  # a caption file, or one line of the captions box (CLIP reads 77 tokens)

    @property
    def max_request_bytes(self) -> int:
        """The largest single file a browser may send (the web framework refuses bigger ones early)."""
        return max(self.max_image_bytes, self.max_embedding_bytes)


@dataclass(frozen=True)
class StoredImage:
    path: Path  # inside the server's folder, under a generated name
    original_name: str  # as the browser sent it (shown to the person only)
    width: int
    height: int
    format: str


def safe_stem(original_name: str, fallback: str = "file") -> str:
    """A harmless file-name stem from whatever a browser sent: no folders, dots or odd characters.

    ``../../etc/passwd.png`` -> ``passwd``; ``C:\\x\\my photo.JPG`` -> ``my-photo``.
    """
    # Not werkzeug.utils.secure_filename: it keeps the folders in the name ('etc_passwd.png', 'Cxmy_photo.JPG'),
    # keeps '---.png' and 'a..b.c.png' whole, and returns the extension, which the stored name makes itself.
    name = unicodedata.normalize("NFKC", str(original_name or ""))
    name = re.split(r"[\\/]", name)[-1]  # the last part of a path in either spelling
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:MAX_STEM_CHARS].strip("-_")
    return stem or fallback


def inside_folder(folder: Path, name: str) -> Path:
    """``folder/name``, checked to stay inside ``folder`` (names are generated, so this is a last guard)."""
    target = (folder / name).resolve()
    if target.parent != folder.resolve():
        raise UserError(f"refusing the file name {name!r}")
    return target


def read_limited(
    source: Path, limit: int, what: str, shown: str, unit: str = "MiB", allow_empty: bool = False
) -> bytes:
    """The bytes of an uploaded file, refusing it past ``limit`` without reading more than that."""
    scale = 2**20 if unit == "MiB" else 1
    try:
        size = source.stat().st_size
        if not source.is_file():
            raise UserError(f"{what} {shown!r} is not a file")
        if size > limit:
            given = f"{size / scale:.1f}" if scale > 1 else str(size)
            raise UserError(f"{what} {shown!r} is {given} {unit}; the limit is {limit / scale:.0f} {unit}")
        with open(source, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise UserError(f"could not read the uploaded {what} {shown!r}: {first_line(error)}") from None
    if len(data) > limit:  # it grew after stat(); still refuse
        raise UserError(f"{what} {shown!r} is larger than the {limit / scale:.0f} {unit} limit")
    if not data and not allow_empty:
        raise UserError(f"{what} {shown!r} is empty (0 bytes)")
    return data


def check_image_bytes(data: bytes, shown: str, limits: UploadLimits) -> tuple[str, int, int]:
    """(format, width, height) of an image, after the CLI's checks (textinv.data.check_image: pixel
    limit from the header before decoding, structure, full decode) and a format it may have."""
    from PIL import Image

    problem = check_image(io.BytesIO(data), limits.max_image_pixels, limits.min_image_side)
    if problem is not None:
        raise UserError(f"{shown!r} {problem}")
    with Image.open(io.BytesIO(data)) as image:  # the header only: it decoded above
        kind, (width, height) = image.format, image.size
    if kind not in IMAGE_SUFFIXES:
        raise UserError(f"{shown!r} is a {kind} image; upload {', '.join(IMAGE_SUFFIXES)} images")
    return kind, width, height


def check_image_count(count: int, limits: UploadLimits) -> None:
    """Some images, and not more than a request may send (several words: all of theirs together)."""
    if not count:
        raise UserError("no images: drop 3-5 pictures of your object or style")
    if count > limits.max_images:
        raise UserError(f"{count} images is too many; give at most {limits.max_images} (3-5 is typical)")


@dataclass(frozen=True)
class CheckedImage:
    """An uploaded image that passed every check, held in memory until it is written."""

    data: bytes
    original_name: str
    format: str
    width: int
    height: int


def check_images(
    uploads: Sequence[tuple[str | os.PathLike[str], str]], limits: UploadLimits = UploadLimits()
) -> list[CheckedImage]:
    """Read and check every uploaded image; the first bad one is refused before anything is written."""
    check_image_count(len(uploads), limits)
    checked = []
    for source, original_name in uploads:
        shown = shown_name(original_name)
        data = read_limited(Path(source), limits.max_image_bytes, "image", shown)
        kind, width, height = check_image_bytes(data, shown, limits)
        checked.append(CheckedImage(data, str(original_name), kind, width, height))
    return checked


def write_images(checked: Sequence[CheckedImage], folder: Path) -> list[StoredImage]:
    """Checked images copied into ``folder`` (which must be empty or new) under generated names."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise UserError(f"the image folder {str(folder)!r} is not empty")  # a server bug, not the person's
    stored = []
    for index, image in enumerate(checked):
        # Index first: names stay unique and keep the upload order (training reads them sorted).
        name = f"{index:02d}-{safe_stem(image.original_name, 'image')}{IMAGE_SUFFIXES[image.format]}"
        target = inside_folder(folder, name)
        target.write_bytes(image.data)  # the original bytes: EXIF orientation is applied when training reads them
        stored.append(StoredImage(target, image.original_name, image.width, image.height, image.format))
    logger.info("stored %d uploaded image(s) in %s", len(stored), folder)
    return stored


def store_images(
    uploads: Sequence[tuple[str | os.PathLike[str], str]],
    folder: Path,
    limits: UploadLimits = UploadLimits(),
) -> list[StoredImage]:
    """Check every uploaded image, then copy all of them into ``folder`` (which must be empty or new).

    ``uploads`` are (where the web framework put the file, the name the browser gave it). Nothing
    is written unless every image passes, so a bad file never leaves half a training set behind.
    """
    return write_images(check_images(uploads, limits), folder)


def store_embedding_file(
    source: str | os.PathLike[str],
    original_name: str,
    folder: Path,
    limits: UploadLimits = UploadLimits(),
    name: Optional[str] = None,
) -> Path:
    """Copy an uploaded embedding file into ``folder`` under a generated name and check that it reads.

    The format is judged by content when reading; the suffix is kept only if it is one textinv knows.
    """
    from textinv.embeddings import read_embeddings

    shown = shown_name(original_name)
    data = read_limited(Path(source), limits.max_embedding_bytes, "embedding file", shown)
    suffix = Path(safe_stem_with_suffix(original_name)).suffix.lower()
    suffix = suffix if suffix in EMBEDDING_SUFFIXES else ".bin"
    folder.mkdir(parents=True, exist_ok=True)
    target = inside_folder(folder, f"{name or safe_stem(original_name, 'embedding')}{suffix}")
    target.write_bytes(data)
    try:
        read_embeddings(target)
    except UserError as error:
        target.unlink(missing_ok=True)
        # Name the file as the person knows it, not by the server's copy.
        raise UserError(str(error).replace(str(target), shown)) from None
    return target


def shown_name(original_name: str) -> str:
    """A browser's file name as a message shows it: the last path part, 80 characters, control characters as '?'
    (fuzzing found a name of one newline breaking the one-line error)."""
    return printable(safe_stem_with_suffix(original_name)[:80]) or "upload"


def safe_stem_with_suffix(original_name: str) -> str:
    """The last path part of a browser's file name, for reading its suffix only."""
    return re.split(r"[\\/]", str(original_name or ""))[-1]

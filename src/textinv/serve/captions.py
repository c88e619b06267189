"""Captions for the uploaded training images (issue 17): caption files sent with the images, and the page's box.

A caption file (``.txt`` or ``.caption``) belongs to the uploaded image of the same stem (``cat.txt`` ->
``cat.png``; ``cat.png.txt`` works too). The captions box holds one line per image, ``file name: caption``,
the name with or without its extension; a box line wins over a caption file for the same image, and an
empty one (``cat.png:``) leaves that image without a caption. Every caption is stored beside its stored
image as ``NN-stem.txt`` (the name :func:`textinv.serve.uploads.store_images` made), so training reads it
with ``caption_extension=".txt"`` as ``textinv train`` would. What a caption means (``[name]``, ``{}``, a
template otherwise) is textinv.data.captions' rule.

Browser file names only ever select an image; they never become paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from textinv.config import UserError
from textinv.data.captions import caption_text
from textinv.files import atomic_write_text
from textinv.serve.uploads import (
    StoredImage,
    UploadLimits,
    inside_folder,
    read_limited,
    safe_stem_with_suffix,
    shown_name,
)

CAPTION_SUFFIXES = (".txt", ".caption")
STORED_SUFFIX = ".txt"  # what training is told: TrainConfig(caption_extension=".txt")
BOX_FORMAT = "write one line per image as 'file name: caption'"

Upload = tuple[str | os.PathLike[str], str]


def is_caption_name(original_name: str) -> bool:
    return Path(safe_stem_with_suffix(original_name)).suffix.lower() in CAPTION_SUFFIXES


def split_uploads(uploads: Sequence[Upload]) -> tuple[list[Upload], list[Upload]]:
    """(images, caption files) of one upload, told apart by the name's suffix (images are checked by content)."""
    images = [upload for upload in uploads if not is_caption_name(upload[1])]
    captions = [upload for upload in uploads if is_caption_name(upload[1])]
    return images, captions


def _shown(original_name: str) -> str:
    return shown_name(original_name)


def _keys(image_name: str) -> tuple[str, str]:
    """The names an image answers to: its file name and its stem (the last path part only)."""
    name = safe_stem_with_suffix(image_name)
    return name, name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _matches(key: str, image_names: Sequence[str]) -> list[int]:
    return [index for index, name in enumerate(image_names) if key and key in _keys(name)]


def _check_text(text: str, where: str, limits: UploadLimits) -> str:
    """A caption as stored: outer whitespace gone, under the size limit, encodable as UTF-8."""
    text = text.strip()
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise UserError(f"{where} holds characters that are not valid text; type it again") from None
    if size > limits.max_caption_bytes:
        raise UserError(f"{where} is {size} bytes long; the limit is {limits.max_caption_bytes} bytes")
    return text


def caption_files(files: Sequence[Upload], image_names: Sequence[str], limits: UploadLimits) -> dict[int, str]:
    """Each image's caption from the caption files (image index -> text): all matched before any is read."""
    if len(files) > limits.max_images:
        raise UserError(f"{len(files)} caption files is too many; give at most one per image ({limits.max_images})")
    owner: dict[int, str] = {}  # image index -> the caption file naming it
    chosen: list[tuple[Upload, list[int]]] = []
    for source, original_name in files:
        shown = _shown(original_name)
        indexes = _matches(safe_stem_with_suffix(original_name).rsplit(".", 1)[0], image_names)
        if not indexes:
            raise UserError(
                f"caption file {shown!r} matches no uploaded image; name it like its image (cat.png -> cat.txt)"
            )
        for index in indexes:
            if index in owner:
                raise UserError(
                    f"two caption files for {_shown(image_names[index])!r}: {owner[index]!r} and {shown!r}; keep one"
                )
            owner[index] = shown
        chosen.append(((source, original_name), indexes))
    captions: dict[int, str] = {}
    for (source, original_name), indexes in chosen:
        shown = _shown(original_name)
        data = read_limited(Path(source), limits.max_caption_bytes, "caption file", shown, "bytes", True)
        text = caption_text(data, shown)  # as training reads caption files
        for index in indexes:
            captions[index] = text
    return captions


def caption_box(text: str, image_names: Sequence[str], limits: UploadLimits) -> dict[int, str]:
    """The captions box: one ``file name: caption`` line per image (image index -> text; blank lines skipped)."""
    if len(text) > limits.max_images * (limits.max_caption_bytes + 100):
        raise UserError(f"the captions box is too long; {BOX_FORMAT}, at most {limits.max_caption_bytes} bytes each")
    captions: dict[int, str] = {}
    named_on: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"captions box line {number}"
        name, colon, caption = line.partition(":")
        name = name.strip()
        if not colon or not name:
            raise UserError(f"{where} {line.strip()[:60]!r} names no image; {BOX_FORMAT}")
        indexes = _matches(name, image_names)
        if not indexes:
            uploaded = ", ".join(_shown(n) for n in image_names[:6]) or "none"
            raise UserError(f"{where}: {name[:60]!r} is not an uploaded image (uploaded: {uploaded})")
        caption = _check_text(caption, where, limits)
        for index in indexes:
            if index in named_on:
                raise UserError(
                    f"captions box lines {named_on[index]} and {number} both caption {_shown(image_names[index])!r}"
                )
            named_on[index] = number
            captions[index] = caption
    return captions


def gather_captions(
    files: Sequence[Upload], box: str, image_names: Sequence[str], limits: UploadLimits = UploadLimits()
) -> dict[int, str]:
    """The caption of each image that has one (image index -> text): caption files, then the box over them."""
    captions = caption_files(files, image_names, limits)
    captions.update(caption_box(box or "", image_names, limits))
    return {index: text for index, text in captions.items() if text}  # empty: that image trains on templates


def write_captions(stored: Sequence[StoredImage], captions: Mapping[int, str]) -> list[Path]:
    """Each caption beside its stored image, as ``NN-stem.txt`` inside the same folder."""
    written = []
    for index, text in sorted(captions.items()):
        image = stored[index].path
        target = inside_folder(image.parent, image.with_suffix(STORED_SUFFIX).name)
        atomic_write_text(target, text + "\n")
        written.append(target)
    return written

"""Several words in one training from the page (``--concepts``, issue 27): the form's words, whose image is whose,
and the job folder that ``textinv train --concepts`` would read.

The placeholder field holds one word, or several separated by spaces or commas (``<cat-toy> <my-style>``); the
initializer field then holds one word per placeholder word, in the same order, or one word for all. One placeholder
word is the page as it always was: :func:`parse_words` returns no words and nothing here is used.

With several, an uploaded image belongs to the word whose name (the token without its angle brackets,
:func:`textinv.data.concepts.concept_name`) its file name starts with, compared case-insensitively: ``cat-toy-1.jpg``
and ``Cat-Toy_2.png`` are ``<cat-toy>``'s. When two names both fit (``cat`` and ``cat-toy``), the longer wins. A
caption file follows its image (it is matched to the image by name, textinv.serve.captions). The job folder::

    concepts.toml                one [[concept]] table per word, paths relative to this folder
    images/<name>/NN-stem.jpg    each word's images, and their NN-stem.txt captions beside them

so the run is exactly ``textinv train --concepts concepts.toml``, and every mistake is refused, in one line, before
anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from textinv.config import UserError
from textinv.data.concepts import concept_name
from textinv.files import atomic_write_text
from textinv.serve.captions import STORED_SUFFIX
from textinv.serve.uploads import (
    StoredImage,
    UploadLimits,
    check_image_count,
    check_images,
    inside_folder,
    safe_stem_with_suffix,
    write_images,
)

logger = logging.getLogger(__name__)

CONCEPTS_FILE = "concepts.toml"
IMAGES_DIR = "images"
_SEPARATORS = re.compile(r"[\s,]+")

Upload = tuple[str | os.PathLike[str], str]


@dataclass(frozen=True)
class Word:
    """One word of a several-word job."""

    token: str  # as typed, e.g. <cat-toy>
    initializer: str
    name: str  # concept_name(token): its files' learned_embeds-<name>.*, its image folder, its images' prefix


def split_words(text: str) -> list[str]:
    """The words of a form field: separated by white space or commas, empty ones dropped."""
    return [word for word in _SEPARATORS.split(text or "") if word]


def parse_words(placeholder: str, initializer: str) -> list[Word]:
    """The words of a several-word form, checked; ``[]`` when the placeholder field holds fewer than two words,
    which the page trains exactly as before (its text untouched, so its messages stay the same too)."""
    tokens = split_words(placeholder)
    if len(tokens) < 2:
        return []
    starts = split_words(initializer)
    if len(starts) not in (1, len(tokens)):
        raise UserError(
            f"{len(tokens)} placeholder words ({' '.join(tokens)}) but {len(starts)} initializer words "
            f"({' '.join(starts)}); give one initializer word per placeholder word, in the same order, or one for all"
        )
    starts = starts * len(tokens) if len(starts) == 1 else starts
    for start in starts:
        try:
            start.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("the initializer field holds characters that are not valid text; type it again") from None
    words: list[Word] = []
    for token, start in zip(tokens, starts):
        name = concept_name(token)  # its one-line UserError says what to type instead
        for earlier in words:
            if earlier.token == token:
                raise UserError(f"{token} is in the placeholder field twice; give each word once")
            if _folded(earlier.name) == _folded(name):
                raise UserError(
                    f"{earlier.token} and {token} would both write learned_embeds-{name}.* (words that differ only "
                    "in angle brackets or case give one file name); give them different words"
                )
        words.append(Word(token, start, name))
    return words


def _folded(text: str) -> str:
    """``text`` as names are compared: Unicode-normalised, case-insensitive."""
    return unicodedata.normalize("NFKC", text).casefold()


def _either(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def assign_images(uploads: Sequence[Upload], words: Sequence[Word], limits: UploadLimits) -> list[int]:
    """The word (its index in ``words``) of each uploaded image, from the file name the browser gave; refused in one
    line when an image fits no word or a word has no image."""
    check_image_count(len(uploads), limits)  # none at all says so, rather than naming the first word
    names = [word.name for word in words]
    owners = []
    for _, original_name in uploads:
        file_name = _folded(safe_stem_with_suffix(original_name))
        fitting = [index for index, word in enumerate(words) if file_name.startswith(_folded(word.name))]
        if not fitting:
            shown = safe_stem_with_suffix(original_name)[:80] or "upload"
            raise UserError(
                f"image {shown!r} belongs to no word: start its file name with {_either(names)} (e.g. {names[0]}-1.jpg)"
            )
        owners.append(max(fitting, key=lambda index: len(words[index].name)))
    for index, word in enumerate(words):
        if index not in owners:
            raise UserError(
                f"no image for {word.token}: upload images whose file names start with {word.name} "
                f"(e.g. {word.name}-1.jpg)"
            )
    return owners


def store_word_images(
    uploads: Sequence[Upload], owners: Sequence[int], words: Sequence[Word], folder: Path, limits: UploadLimits
) -> list[StoredImage]:
    """Every image checked, then each written into its word's folder ``folder/<name>``; returned in upload order (as
    the captions index them), so a caption lands beside its image whatever word that is."""
    checked = check_images(uploads, limits)
    stored: dict[int, StoredImage] = {}
    for number, word in enumerate(words):
        mine = [index for index, owner in enumerate(owners) if owner == number]
        written = write_images([checked[index] for index in mine], inside_folder(folder, word.name))
        stored.update(zip(mine, written))
    return [stored[index] for index in range(len(uploads))]


def write_concepts_file(
    folder: Path, words: Sequence[Word], owners: Sequence[int], captions: Mapping[int, str], job_id: str
) -> Path:
    """``folder/concepts.toml``: one [[concept]] table per word, its images in ``images/<name>`` (relative: read
    from the file's folder), ``caption_extension = ".txt"`` for a word with a caption (training refuses it for a
    folder without any)."""
    captioned = {owners[index] for index in captions}
    lines = [
        f"# The words of textinv serve's {job_id}, one [[concept]] table each (textinv.data.concepts reads it;",
        "# its paths are relative to this file's folder).",
    ]
    for number, word in enumerate(words):
        lines += [
            "",
            "[[concept]]",
            f"placeholder_token = {_toml_string(word.token)}",
            f"initializer_token = {_toml_string(word.initializer)}",
            f"train_data_dir = {_toml_string(f'{IMAGES_DIR}/{word.name}')}",
        ]
        if number in captioned:
            lines.append(f"caption_extension = {_toml_string(STORED_SUFFIX)}")
    return atomic_write_text(inside_folder(folder, CONCEPTS_FILE), "\n".join(lines) + "\n")


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string: JSON's escapes are TOML's, and TOML wants DEL escaped as well."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def validation_prompts(prompt: str, words: Sequence[Word]) -> list[str]:
    """The validation prompts of a several-word job: with ``{token}``, one per word (so the grid shows each word's
    progress); without, the prompt as typed; none for an empty one."""
    prompt = prompt.strip()
    if not prompt:
        return []
    return [prompt.replace("{token}", word.token) for word in words] if "{token}" in prompt else [prompt]


def words_text(words: Sequence[Word], images: Sequence[int]) -> str:
    """``<cat-toy> (3 images), <my-style> (2 images)``: what the page says it started."""
    return ", ".join(f"{word.token} ({count} image{'s' if count != 1 else ''})" for word, count in zip(words, images))

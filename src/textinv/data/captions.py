"""Captions: per-image caption files, A1111 template files, and tag shuffling and dropout (issue 17).

Where the placeholder goes (docs/training-data.md):

- no caption source: a template of the concept (``a photo of a {}``) with the placeholder, as before;
- ``--caption_extension``: an image's caption file that writes ``[name]`` (A1111), ``{}`` or the token itself
  gets the placeholder there; any other caption follows a template as its context:
  ``a photo of a <tok>, CAPTION``; an image without a caption file gets the template alone;
- ``--template_file``: A1111's rule, ``[name]`` = the placeholder and ``[filewords]`` = the image's caption:
  its caption file (``--caption_extension``, else ``.txt`` when one is there, as A1111 reads them), else its
  file name without leading numbers and dashes (A1111's ``re_numbers_at_start``,
  modules/textual_inversion/dataset.py).

Tag handling (kohya-ss sd-scripts' semantics) works on an image's caption text, split at commas: the
first ``--keep_tokens`` tags stay in place, the others are shuffled (``--shuffle_caption``) and each dropped
with ``--caption_tag_dropout_rate``; ``--caption_dropout_rate`` empties the caption of a share of examples.
The placeholder is never dropped: a tag that holds it is kept, and an emptied caption leaves the template
with the placeholder, since an example without the placeholder would teach the vectors nothing.

Every draw comes from the example's own generator, so the captions fed are a function of (seed, example).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from textinv.data.options import FILEWORDS_MARK, NAME_MARK, read_template_file
from textinv.errors import UserError, first_line

logger = logging.getLogger(__name__)

_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # A1111's re_numbers_at_start
_TAG_SPLIT = re.compile(r"[,，]")  # ASCII and full-width commas (Chinese captions)
_CJK = re.compile(r"[\u3000-\u9fff]")


@dataclass(frozen=True)
class TagRules:
    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout_rate: float = 0.0
    caption_dropout_rate: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.tag_dropout_rate > 0 or self.caption_dropout_rate > 0


def caption_text(data: bytes, shown: str) -> str:
    """A caption file's content as its caption: UTF-8 (a BOM allowed), lines joined by spaces, outer spaces
    stripped. ``shown`` names the file in the error (the web page's uploads use it too)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(
            f"caption file {shown!r} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def read_caption_file(path: Path) -> str:
    """One caption file's caption (:func:`caption_text`)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"caption file {str(path)!r} cannot be read: {first_line(error)}") from None
    return caption_text(data, str(path))


def _captions_beside(paths: Sequence[Path], extension: str) -> list[Optional[str]]:
    """Each image's ``IMAGE<extension>`` caption, or None where there is none."""
    return [read_caption_file(p.with_suffix(extension)) if p.with_suffix(extension).is_file() else None for p in paths]


def filewords_from_name(path: Path) -> str:
    """A1111's caption from a file name: the stem without leading numbers and dashes ("01-red car" -> "red car")."""
    return _LEADING_NUMBERS.sub("", path.stem)


def image_captions(paths: Sequence[Path], extension: Optional[str]) -> list[Optional[str]]:
    """Each image's caption file text (``IMAGE<extension>`` beside it), or None where there is none."""
    if extension is None:
        return [None] * len(paths)
    captions = _captions_beside(paths, extension)
    missing = [path.name for path, caption in zip(paths, captions) if caption is None]
    if len(missing) == len(paths):
        raise UserError(
            f"--caption_extension {extension}: none of the {len(paths)} images has a caption file beside it "
            f"(e.g. {paths[0].with_suffix(extension).name}); write them, or check the extension"
        )
    if missing:
        logger.warning(
            "%d image(s) have no %s caption file and train with the templates alone: %s",
            len(missing),
            extension,
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )
    return captions


class Captioner:
    """The caption of each example: a template (drawn by the example stream) and the image's caption, with
    the tag rules applied. Without any caption feature it is exactly ``template.format(placeholder)``."""

    def __init__(
        self,
        templates: Sequence[str],
        placeholder_text: str,
        placeholder_token: str = "",
        captions: Optional[Sequence[Optional[str]]] = None,
        template_file: bool = False,
        rules: TagRules = TagRules(),
        source: str = "templates",
    ) -> None:
        self.templates, self.placeholder_text = tuple(templates), placeholder_text
        self.placeholder_token = placeholder_token or placeholder_text
        self.captions = list(captions) if captions is not None else None
        self.template_file, self.rules, self.source = template_file, rules, source

    def using_templates(self, templates: Sequence[str]) -> Captioner:
        """This captioner with the concept's templates (a template file's own templates stay)."""
        if self.template_file:
            return self
        return Captioner(
            templates,
            self.placeholder_text,
            self.placeholder_token,
            self.captions,
            False,
            self.rules,
            self.source,
        )

    def caption(self, image_index: int, template_index: int, rng: Optional[np.random.Generator] = None) -> str:
        """The caption fed for one example; ``rng`` draws its tag shuffling and dropout (None: the caption as written)."""
        template = self.templates[template_index]
        words = self.captions[image_index] if self.captions is not None else None
        if words is not None and rng is not None and self.rules.active:
            words = self._apply_rules(words, rng)
        if self.template_file:
            filled = template.replace(NAME_MARK, self.placeholder_text).replace(FILEWORDS_MARK, words or "")
            return _tidy(filled)
        base = template.format(self.placeholder_text)
        if not words:
            return base
        if self._holds_placeholder(words):
            return self._place(words)
        return base + ("，" if _CJK.search(template) else ", ") + words

    def _holds_placeholder(self, text: str) -> bool:
        return NAME_MARK in text or "{}" in text or self.placeholder_token in text

    def _place(self, text: str) -> str:
        text = text.replace(NAME_MARK, self.placeholder_text).replace("{}", self.placeholder_text)
        if self.placeholder_text != self.placeholder_token:  # several vectors: "<tok>" -> "<tok> <tok>_1 ..."
            text = re.sub(re.escape(self.placeholder_token) + r"(?!_\d)", self.placeholder_text, text)
        return text

    def _apply_rules(self, words: str, rng: np.random.Generator) -> str:
        rules = self.rules
        if rules.caption_dropout_rate > 0 and rng.random() < rules.caption_dropout_rate:
            return ""
        tags = [tag.strip() for tag in _TAG_SPLIT.split(words) if tag.strip()]
        fixed, rest = tags[: rules.keep_tokens], tags[rules.keep_tokens :]
        if rules.shuffle and len(rest) > 1:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        if rules.tag_dropout_rate > 0:
            rest = [tag for tag in rest if self._holds_placeholder(tag) or rng.random() >= rules.tag_dropout_rate]
        # Chinese captions written with full-width commas keep them.
        return ("，" if "，" in words and "," not in words else ", ").join(fixed + rest)

    def record(self) -> dict[str, Any]:
        """What run.json says of the captions: their source, and a digest of everything that makes them."""
        found = sum(caption is not None for caption in self.captions) if self.captions is not None else 0
        digest = hashlib.sha256(
            json.dumps([self.templates, self.captions, self.template_file, list(vars(self.rules).values())]).encode()
        ).hexdigest()
        return {
            "source": self.source,
            "images_with_caption": found,
            "sha256": digest,
        }


def _tidy(caption: str) -> str:
    """A template whose [filewords] was empty: no doubled or trailing commas."""
    caption = re.sub(r"\s*,(\s*,)+", ",", caption)
    return re.sub(r"\s+", " ", caption).strip().strip(",").strip()


def build_captioner(
    image_paths: Sequence[Path],
    placeholder_text: str,
    placeholder_token: str,
    caption_extension: Optional[str],
    template_file: Optional[str],
    rules: TagRules,
) -> Captioner:
    """The captioner for a run's images and options (textinv.data.options holds the flags); without a
    template file its templates are set later (:meth:`Captioner.using_templates`: they depend on the model)."""
    if template_file is not None:
        file_templates = read_template_file(template_file)
        extension = caption_extension
        if extension is None and any(path.with_suffix(".txt").is_file() for path in image_paths):
            extension = ".txt"  # A1111 reads IMAGE.txt when there is one
        captions = _captions_or_names(image_paths, extension)
        source = f"template file {Path(template_file).name}" + (
            f" with {extension} captions" if extension else " with file names"
        )
        return Captioner(file_templates, placeholder_text, placeholder_token, captions, True, rules, source)
    if caption_extension is not None:
        captions = image_captions(image_paths, caption_extension)
        return Captioner(
            (), placeholder_text, placeholder_token, captions, False, rules, f"{caption_extension} caption files"
        )
    return Captioner((), placeholder_text, placeholder_token)


def _captions_or_names(image_paths: Sequence[Path], extension: Optional[str]) -> list[Optional[str]]:
    found = _captions_beside(image_paths, extension) if extension is not None else [None] * len(image_paths)
    return [caption if caption is not None else filewords_from_name(path) for path, caption in zip(image_paths, found)]

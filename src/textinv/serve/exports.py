"""The embedding formats the page writes for download, and the writing itself: each trained word's file (one for a
one-word job, one per word of a several-word job) in the layout another tool reads. The codecs are
:mod:`textinv.embeddings`'; this module only chooses names and refuses a format that cannot hold the vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textinv.config import UserError
from textinv.serve.uploads import safe_stem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportFormat:
    key: str
    writer_format: str  # textinv.embeddings.write_embedding's format name
    suffix: str
    label: str
    two_encoders: bool = False  # a multi-encoder layout (SDXL, SD3, Flux); the others hold one text encoder's vectors


EXPORT_FORMATS: dict[str, ExportFormat] = {
    f.key: f
    for f in (
        ExportFormat("diffusers", "diffusers", ".safetensors", "diffusers .safetensors"),
        ExportFormat("diffusers-bin", "diffusers", ".bin", "diffusers .bin (torch file)"),
        ExportFormat("a1111", "a1111", ".pt", "AUTOMATIC1111 .pt"),
        ExportFormat("a1111-safetensors", "a1111", ".safetensors", "AUTOMATIC1111 .safetensors"),
        ExportFormat("sdxl", "sdxl", ".safetensors", "SDXL .safetensors (clip_l + clip_g)", two_encoders=True),
        # SD3 / Flux (issue 25): ComfyUI's keys, and OneTrainer's / diffusers' advanced scripts' (T5 as "t5").
        ExportFormat("comfyui", "comfyui", ".safetensors", "ComfyUI .safetensors (clip_l, clip_g, t5xxl)", True),
        ExportFormat("onetrainer", "onetrainer", ".safetensors", "OneTrainer .safetensors (clip_l, clip_g, t5)", True),
        ExportFormat("pdparams", "pdparams", ".pdparams", "ppdiffusers .pdparams"),
    )
}


def token_slug(token: str) -> str:
    """A file-name stem for a token: ``<cat-toy>`` -> ``cat-toy`` (the web UI names the word by the file)."""
    return safe_stem(token.replace(".", "-"), "embedding")


def export_formats_for(embedding: Any) -> list[ExportFormat]:
    """The formats that can hold this embedding: the multi-encoder layouts for role-keyed vectors (SDXL's only for
    exactly clip_l + clip_g), the others for one text encoder's."""
    roles = set(embedding.vectors)
    if roles == {"text_encoder"}:
        return [f for f in EXPORT_FORMATS.values() if not f.two_encoders]
    return [f for f in EXPORT_FORMATS.values() if f.two_encoders and (f.key != "sdxl" or roles == {"clip_l", "clip_g"})]


def export_format(format_key: str) -> ExportFormat:
    chosen = EXPORT_FORMATS.get(format_key)
    if chosen is None:
        raise UserError(f"unknown format {format_key!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    return chosen


def export_words(sources: Sequence[Path], chosen: ExportFormat, folder: Path) -> list[Path]:
    """Each word file of ``sources`` written as ``chosen`` into ``folder/<format>/``, named after its word; every
    word is checked to fit the format before any file is written."""
    from textinv.embeddings import read_embeddings, write_embedding

    embeddings = [read_embeddings(source)[0] for source in sources]
    for embedding in embeddings:
        fitting = export_formats_for(embedding)
        if chosen not in fitting:
            raise UserError(
                f"{chosen.label} does not fit this {embedding.family} embedding "
                f"({len(embedding.vectors)} text encoder(s)); choose {' or '.join(f.label for f in fitting)}"
            )
    written: list[Path] = []
    taken: set[str] = set()
    for embedding in embeddings:
        # One folder per format: the same token name with different suffixes or layouts never collide. Two words
        # whose names make one stem (v1.5 and v1-5) must not overwrite each other: the second gets a number.
        stem = base = token_slug(embedding.token)
        number = 1
        while stem.casefold() in taken:
            number += 1
            stem = f"{base}-{number}"
        taken.add(stem.casefold())
        path = write_embedding(embedding, folder / chosen.key / f"{stem}{chosen.suffix}", chosen.writer_format)
        logger.info("exported %s as %s: %s", embedding.token, chosen.key, path)
        written.append(path)
    return written

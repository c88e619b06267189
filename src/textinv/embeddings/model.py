"""The in-memory :class:`Embedding` type, the format names and size limits, and the checks every
embedding passes (shapes, finite values, matching rows) before it is used or written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from textinv.config import UserError

# The text encoder a set of vectors belongs to, by the pipeline attribute that holds it.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
DIFFUSERS_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
FOLDER_FILE_NAMES = DIFFUSERS_FILE_NAMES + ("learned_embeds.pdparams",)

WRITE_FORMATS = ("diffusers", "a1111", "sdxl", "pdparams")
READ_FORMATS = ("diffusers", "a1111", "a1111-emb_params", "sdxl", "pdparams", "a1111-png")
SUFFIX_FORMATS = {".safetensors": "diffusers", ".bin": "diffusers", ".pt": "a1111", ".pdparams": "pdparams"}

MAX_FILE_BYTES = 64 * 1024 * 1024  # embeddings are kilobytes; anything this big is something else
MAX_UNPACKED_BYTES = 256 * 1024 * 1024  # sum of a torch zip's members, checked before unpacking
MAX_VECTORS = 1000  # real tokens have tens of vectors; a [49408, 768] matrix is a model, not a token
MAX_DIM = 8192

# Model family by the dims of its text encoder(s).
FAMILIES = {
    ((TEXT_ENCODER, 768),): "sd1",
    ((TEXT_ENCODER, 1024),): "sd2",
    ((TEXT_ENCODER, 768), (TEXT_ENCODER_2, 1280)): "sdxl",
}

# The web UI writes string_to_token {'*': 265}: 265 is the id of '*' in the CLIP vocabulary.
A1111_STAR_TOKEN_ID = 265
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_KEY = b"sd-ti-embedding"
PADDLE_NAME_TABLE = "StructuredToParameterName@@"


@dataclass
class Embedding:
    """A learned token: its name and ``[num_vectors, dim]`` vectors for each text encoder."""

    token: str
    vectors: dict[str, torch.Tensor]
    step: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def dims(self) -> dict[str, int]:
        return {name: int(tensor.shape[1]) for name, tensor in self.vectors.items()}

    @property
    def family(self) -> str:
        """``sd1``, ``sd2``, ``sdxl``, or ``unknown`` (judged by the vectors' dims)."""
        return family_of(self.dims())


def family_of(dims: dict[str, int]) -> str:
    """The model family whose text encoder(s) have these dims, or ``unknown``."""
    return FAMILIES.get(tuple(sorted(dims.items())), "unknown")


def _dims_text(dims: dict[str, int]) -> str:
    text = "+".join(str(dims[name]) for name in sorted(dims))
    family = family_of(dims)
    return f"{text} ({family})" if family != "unknown" else text


def _check_shape(vectors: torch.Tensor, where: str) -> None:
    """``where`` names the file and tensor, e.g. ``'a.pt': clip_l``."""
    rows, dim = vectors.shape
    if rows < 1 or dim < 1:
        raise UserError(f"{where} has shape {list(vectors.shape)}: no vectors")
    if rows > MAX_VECTORS:
        raise UserError(
            f"{where} has {rows} vectors (at most {MAX_VECTORS}); it looks like a whole embedding matrix, not a token"
        )
    if dim > MAX_DIM:
        raise UserError(f"{where} has dim {dim}; no text encoder is that wide (at most {MAX_DIM})")


def _check_values(embedding: Embedding, where: str) -> None:
    """Refuse an embedding whose vectors could not be used (bad shape, NaN, mismatched rows)."""
    if not isinstance(embedding.token, str) or not embedding.token.strip():
        raise UserError(f"{where}: the token name is empty")
    if not embedding.vectors:
        raise UserError(f"{where}: it has no vectors")
    counts = set()
    for name, tensor in embedding.vectors.items():
        if name not in (TEXT_ENCODER, TEXT_ENCODER_2):
            raise UserError(f"{where}: unknown text encoder {name!r} (expected {TEXT_ENCODER!r} or {TEXT_ENCODER_2!r})")
        if tensor.dim() != 2:
            raise UserError(f"{where}: {name} vectors have shape {list(tensor.shape)}, not [num_vectors, dim]")
        _check_shape(tensor, f"{where}: {name}")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{where} holds NaN or infinite values; it is unusable (the training diverged?)")
        counts.add(int(tensor.shape[0]))
    if len(counts) != 1:
        raise UserError(f"{where}: the text encoders have different numbers of vectors ({sorted(counts)})")

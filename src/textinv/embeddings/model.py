"""The in-memory :class:`Embedding` type, the format names and size limits, and the checks every
embedding passes (shapes, finite values, matching rows) before it is used or written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from textinv.errors import UserError
from textinv.models.families.base import CLIP_G, CLIP_L, SINGLE, T5XXL

# The text encoder a set of vectors belongs to, by its *role* (textinv.models.families.base): the only encoder of
# a single-encoder family, or CLIP-L / CLIP-G / T5-XXL of SDXL, SD3 and Flux (the keys of ComfyUI's files).
TEXT_ENCODER = SINGLE
MULTI_ROLES = (CLIP_L, CLIP_G, T5XXL)
ROLES = (TEXT_ENCODER, *MULTI_ROLES)  # also the order vectors are kept and shown in
# Roles whose vectors must be as many: SDXL's files hold one token in both CLIP encoders and the web UI reads
# them row by row. T5 may have more (or fewer) vectors than the CLIP encoders.
SAME_COUNT_ROLES = (CLIP_L, CLIP_G)

DIFFUSERS_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
FOLDER_FILE_NAMES = DIFFUSERS_FILE_NAMES + ("learned_embeds.pdparams",)

# Formats whose files hold several encoders' vectors (layouts.py has their keys); all are safetensors files.
MULTI_ENCODER_FORMATS = ("sdxl", "comfyui", "onetrainer", "diffusers-advanced")
WRITE_FORMATS = ("diffusers", "a1111", *MULTI_ENCODER_FORMATS, "pdparams")
# Reading cannot tell diffusers-advanced from onetrainer (same keys): such files are named "onetrainer".
READ_FORMATS = (
    "diffusers",
    "a1111",
    "a1111-emb_params",
    "sdxl",
    "comfyui",
    "onetrainer",
    "pdparams",
    "a1111-png",
    "lora-bundle",  # a LoRA with bundled words (issue 26): read for its words
)
SUFFIX_FORMATS = {".safetensors": "diffusers", ".bin": "diffusers", ".pt": "a1111", ".pdparams": "pdparams"}

MAX_FILE_BYTES = 64 * 1024 * 1024  # embeddings are kilobytes; anything this big is something else
MAX_UNPACKED_BYTES = 256 * 1024 * 1024  # sum of a torch zip's members, checked before unpacking
MAX_VECTORS = 1000  # real tokens have tens of vectors; a [49408, 768] matrix is a model, not a token
MAX_DIM = 8192

# The web UI writes string_to_token {'*': 265}: 265 is the id of '*' in the CLIP vocabulary.
A1111_STAR_TOKEN_ID = 265
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_KEY = b"sd-ti-embedding"
PADDLE_NAME_TABLE = "StructuredToParameterName@@"


@dataclass
class Embedding:
    """A learned token: its name and ``[num_vectors, dim]`` vectors for each text encoder, keyed by role
    (``text_encoder``, or some of ``clip_l``, ``clip_g``, ``t5xxl``)."""

    token: str
    vectors: dict[str, torch.Tensor]
    step: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The string keys a safetensors file's header carries (its ``__metadata__``): the ModelSpec and ``textinv_`` keys
    # training sets (textinv.embeddings.modelspec), or what a read file held. Every safetensors writer writes them
    # (beside ``format``, ``name`` and ``step``, which it makes itself); .pt, .bin and .pdparams files cannot hold them.
    file_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        """The vector count of the first role present (in :data:`ROLES` order); :meth:`counts` has them all."""
        return next(iter(self.counts().values()))

    def counts(self) -> dict[str, int]:
        """Vectors per role, in :data:`ROLES` order (T5's count may differ from the CLIP encoders')."""
        return {role: int(self.vectors[role].shape[0]) for role in ordered_roles(self.vectors)}

    def dims(self) -> dict[str, int]:
        """Width per role, in :data:`ROLES` order."""
        return {role: int(self.vectors[role].shape[1]) for role in ordered_roles(self.vectors)}

    @property
    def multi_encoder(self) -> bool:
        """Its vectors are keyed by multi-encoder roles (SDXL, SD3, Flux), even if it holds only one of them."""
        return any(role in MULTI_ROLES for role in self.vectors)

    @property
    def family(self) -> str:
        """``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``, ``sd3/flux`` (a subset fitting both)... or ``unknown``."""
        return family_of(self.dims())


def ordered_roles(roles: Any) -> list[str]:
    """``roles`` in :data:`ROLES` order, unknown names last (as given)."""
    known = [role for role in ROLES if role in roles]
    return known + [role for role in roles if role not in ROLES]


def family_of(dims: dict[str, int]) -> str:
    """The model family whose text encoders have these roles and widths (see
    :func:`textinv.models.families.family_of_roles`), or ``unknown``."""
    from textinv.models.families import family_of_roles  # lazily: the families import torch-heavy builders

    return family_of_roles(dims)


def _dims_text(dims: dict[str, int]) -> str:
    """``768+1280 (sdxl)``; multi-encoder dims name their roles: ``clip_l 768+t5xxl 4096 (flux)``."""
    roles = ordered_roles(dims)
    if any(role in MULTI_ROLES for role in roles):
        text = "+".join(f"{role} {dims[role]}" for role in roles)
    else:
        text = "+".join(str(dims[role]) for role in roles)
    family = family_of(dims)
    return f"{text} ({family})" if family != "unknown" else text


def roles_text(roles: Any) -> str:
    """``clip_l + t5xxl``: the roles of an embedding, for messages."""
    return " + ".join(ordered_roles(roles))


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
    """Refuse an embedding whose vectors could not be used (bad shape, NaN, mismatched rows, unknown roles)."""
    if not isinstance(embedding.token, str) or not embedding.token.strip():
        raise UserError(f"{where}: the token name is empty")
    if not embedding.vectors:
        raise UserError(f"{where}: it has no vectors")
    for name, tensor in embedding.vectors.items():
        if name not in ROLES:
            raise UserError(f"{where}: unknown text encoder role {name!r} (expected one of {', '.join(ROLES)})")
        if tensor.dim() != 2:
            raise UserError(f"{where}: {name} vectors have shape {list(tensor.shape)}, not [num_vectors, dim]")
        _check_shape(tensor, f"{where}: {name}")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{where} holds NaN or infinite values; it is unusable (the training diverged?)")
    if TEXT_ENCODER in embedding.vectors and len(embedding.vectors) > 1:
        raise UserError(
            f"{where} mixes {TEXT_ENCODER!r} with {roles_text(set(embedding.vectors) - {TEXT_ENCODER})}; "
            f"a single-encoder embedding has {TEXT_ENCODER!r} alone"
        )
    counts = {role: count for role, count in embedding.counts().items() if role in SAME_COUNT_ROLES}
    if len(set(counts.values())) > 1:
        shown = " but ".join(f"{role} has {count}" for role, count in counts.items())
        raise UserError(f"{where}: {shown} vectors; the CLIP encoders' counts must match (SDXL files need it)")

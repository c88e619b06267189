"""Multi-encoder embedding files (SDXL, SD3, Flux): which key holds which encoder's vectors in each tool's files.

All are safetensors files of ``{key: [num_vectors, dim]}``, one token per file:

``comfyui`` (and ``sdxl``, the same layout)
    ``clip_l`` (CLIP ViT-L, 768), ``clip_g`` (OpenCLIP bigG, 1280), ``t5xxl`` (T5-XXL, 4096), as present: the keys
    ComfyUI reads for every multi-encoder model; the A1111 web UI and Forge read ``clip_l``/``clip_g`` for SDXL.
    textinv adds the metadata ``name`` (the token) and ``step``.
``onetrainer``
    ``clip_l``, ``clip_g`` and ``t5`` (T5 under ``t5``, not ``t5xxl``: OneTrainer#514); sometimes also
    ``clip_l_out``, ``clip_g_out``, ``t5_out``, its "output embeddings", which textinv does not support.
``diffusers-advanced``
    diffusers' examples/advanced_diffusion_training with ``--train_text_encoder_ti``: ``<output_name>_emb.safetensors``
    holding ``clip_l`` and ``t5`` (Flux) or ``clip_l``/``clip_g`` (SDXL), with no metadata. Its keys are
    OneTrainer's, so a file read is named ``onetrainer``; its token is the file name without ``_emb``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textinv.embeddings.model import ordered_roles
from textinv.errors import UserError
from textinv.models.families.base import CLIP_G, CLIP_L, T5XXL

logger = logging.getLogger(__name__)

# role -> key, per layout written.
COMFYUI_KEYS = {CLIP_L: "clip_l", CLIP_G: "clip_g", T5XXL: "t5xxl"}
ONETRAINER_KEYS = {CLIP_L: "clip_l", CLIP_G: "clip_g", T5XXL: "t5"}
LAYOUT_KEYS: dict[str, dict[str, str]] = {
    "sdxl": COMFYUI_KEYS,
    "comfyui": COMFYUI_KEYS,
    "onetrainer": ONETRAINER_KEYS,
    "diffusers-advanced": ONETRAINER_KEYS,
}
# key -> role, for reading any of the layouts.
READ_KEYS = {"clip_l": CLIP_L, "clip_g": CLIP_G, "t5xxl": T5XXL, "t5": T5XXL}
# OneTrainer's output embeddings (t5xxl_out too, should a tool spell T5 ComfyUI's way).
OUTPUT_KEYS = ("clip_l_out", "clip_g_out", "t5_out", "t5xxl_out")
# diffusers' advanced scripts name the file <output_name>_emb.safetensors.
DIFFUSERS_ADVANCED_SUFFIX = "_emb"


def is_multi_encoder(state: dict[Any, Any]) -> bool:
    """Whether a loaded file's keys are a multi-encoder layout's (any encoder key, or an output-embedding key)."""
    return any(key in READ_KEYS or key in OUTPUT_KEYS for key in state if isinstance(key, str))


def classify_keys(keys: Iterable[Any], path: Path) -> tuple[str, dict[str, str]]:
    """(format, {key: role}) of a multi-encoder file's keys; other keys are logged and ignored.

    OneTrainer's output embeddings (``*_out``) replace the encoder's *output* at the token's positions, which no
    other tool (nor textinv's loader) does. A file that also holds the plain keys is read from those, the usual
    input embeddings, with a warning that the ``*_out`` keys are ignored; a file of ``*_out`` keys alone is refused.
    """
    keys = list(keys)
    where = repr(str(path))
    outputs = [key for key in OUTPUT_KEYS if key in keys]
    plain = {key: READ_KEYS[key] for key in READ_KEYS if key in keys}
    if not plain:
        raise UserError(
            f"{where} holds only {outputs[0]!r}: textinv does not support OneTrainer's output embeddings (*_out); "
            "save the embedding without them"
        )
    if "t5" in plain and "t5xxl" in plain:
        raise UserError(f"{where} holds both 't5' and 't5xxl' (T5's vectors twice); keep one of them")
    if outputs:
        logger.warning(
            "%s: ignoring %s: textinv does not support OneTrainer's output embeddings (*_out); reading %s",
            path,
            ", ".join(outputs),
            ", ".join(plain),
        )
    extra = sorted(str(key) for key in keys if key not in plain and key not in outputs)
    if extra:
        logger.warning("%s: ignoring keys %s beside %s", path, ", ".join(extra), "/".join(plain))
    return _format_of(plain, bool(outputs)), plain


def _format_of(plain: dict[str, str], has_outputs: bool) -> str:
    if "t5" in plain or has_outputs:
        return "onetrainer"  # or diffusers-advanced: the same keys
    if set(plain) == {"clip_l", "clip_g"}:
        return "sdxl"
    return "comfyui"


def token_from_file_name(path: Path) -> str:
    """The token of a file that names none: its name without suffix, and without diffusers-advanced's ``_emb``."""
    stem = path.stem
    if stem.endswith(DIFFUSERS_ADVANCED_SUFFIX) and len(stem) > len(DIFFUSERS_ADVANCED_SUFFIX):
        return stem[: -len(DIFFUSERS_ADVANCED_SUFFIX)]
    return stem


def layout_keys(roles: Iterable[str], format: str) -> dict[str, str]:
    """{role: key} for writing these roles as ``format`` (one of :data:`~textinv.embeddings.model.MULTI_ENCODER_FORMATS`), in role order."""
    table = LAYOUT_KEYS[format]
    return {role: table[role] for role in ordered_roles(list(roles))}

"""Writing an :class:`Embedding` atomically in any of :data:`WRITE_FORMATS`."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.embeddings.layouts import layout_keys
from textinv.embeddings.model import (
    A1111_STAR_TOKEN_ID,
    MULTI_ENCODER_FORMATS,
    MULTI_ROLES,
    SUFFIX_FORMATS,
    TEXT_ENCODER,
    WRITE_FORMATS,
    Embedding,
    _check_values,
    _dims_text,
    roles_text,
)
from textinv.embeddings.modelspec import carried
from textinv.errors import UserError
from textinv.files import atomic_write
from textinv.models.families.base import CLIP_G, CLIP_L

logger = logging.getLogger(__name__)


def write_embedding(embedding: Embedding, path: str | Path, format: Optional[str] = None) -> Path:
    """Write ``embedding`` atomically in ``format`` (one of :data:`WRITE_FORMATS`), else by suffix.

    Suffixes: ``.safetensors`` diffusers (comfyui for a multi-encoder embedding, which is sdxl's layout for
    clip_l + clip_g), ``.bin`` diffusers (torch file), ``.pt`` a1111, ``.pdparams`` pdparams.
    """
    path = Path(path).expanduser()
    chosen = _choose_format(embedding, path, format)
    _check_values(embedding, f"embedding {embedding.token!r}")
    _check_fits_format(embedding, path, chosen)
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder; give a file name to write the embedding to")
    written = _WRITERS[chosen](embedding, path)
    logger.debug("wrote %s (%s, %s vector(s)) to %s", embedding.token, chosen, embedding.counts(), written)
    return written


def fitting_formats(embedding: Embedding) -> tuple[str, ...]:
    """The formats of :data:`WRITE_FORMATS` that can hold ``embedding``."""
    if not embedding.multi_encoder:
        return tuple(fmt for fmt in WRITE_FORMATS if fmt not in MULTI_ENCODER_FORMATS)
    # The web UI and Forge read an SDXL file only with both CLIP encoders in it.
    sdxl = set(embedding.vectors) == {CLIP_L, CLIP_G}
    return tuple(fmt for fmt in MULTI_ENCODER_FORMATS if fmt != "sdxl" or sdxl)


def _check_fits_format(embedding: Embedding, path: Path, chosen: str) -> None:
    what = f"cannot write {embedding.token!r} as {chosen} to {str(path)!r}"
    dims = _dims_text(embedding.dims())
    if chosen not in fitting_formats(embedding):
        if chosen == "sdxl":
            raise UserError(
                f"{what}: the sdxl format needs vectors for both clip_l and clip_g, it has dim {dims} only; "
                f"write it as {_one_of(fitting_formats(embedding))}"
            )
        if embedding.multi_encoder:
            raise UserError(
                f"{what}: it holds {roles_text(embedding.vectors)} vectors (dim {dims}) and {chosen} files hold one "
                f"encoder's; write it as comfyui or onetrainer to a .safetensors file"
            )
        raise UserError(
            f"{what}: it is a single-encoder embedding (dim {dims}) and {chosen} files hold "
            f"{'/'.join(MULTI_ROLES)} vectors; write it as diffusers or a1111"
        )
    if chosen in MULTI_ENCODER_FORMATS and path.suffix != ".safetensors":
        suffix = path.suffix or "no suffix"
        raise UserError(f"{chosen} embeddings are written as .safetensors, not {suffix} ({str(path)!r})")


def _one_of(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _choose_format(embedding: Embedding, path: Path, format: Optional[str]) -> str:
    if format is not None:
        if format not in WRITE_FORMATS:
            raise UserError(f"cannot write format {format!r}; choose one of: {', '.join(WRITE_FORMATS)}")
        return format
    chosen = SUFFIX_FORMATS.get(path.suffix.lower())
    if chosen is None:
        raise UserError(
            f"cannot tell the format to write from {str(path)!r}: use a .safetensors, .bin, .pt or .pdparams "
            f"name, or give the format ({', '.join(WRITE_FORMATS)})"
        )
    if chosen == "diffusers" and path.suffix.lower() == ".safetensors" and embedding.multi_encoder:
        return fitting_formats(embedding)[0]  # sdxl for clip_l + clip_g, else comfyui: the same keys
    return chosen


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # clone(): torch.save writes a view's whole storage (e.g. a slice of an embedding matrix).
    return tensor.detach().to("cpu", torch.float32).clone().contiguous()


def _safetensors_metadata(embedding: Embedding, name: bool) -> dict[str, str]:
    """The header metadata of every safetensors file written: the embedding's ``file_metadata`` (ModelSpec keys...),
    then the writer's own keys (``format``, ``name``, ``step``)."""
    metadata = carried(embedding.file_metadata)
    metadata["format"] = "pt"  # what transformers/diffusers write
    if name:
        metadata["name"] = embedding.token
    if embedding.step is not None:
        metadata["step"] = str(int(embedding.step))
    return metadata


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _write_torch(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def _write_diffusers(embedding: Embedding, path: Path) -> Path:
    tensor = _cpu_copy(embedding.vectors[TEXT_ENCODER])
    if path.suffix.lower() == ".safetensors":
        return _write_safetensors(path, {embedding.token: tensor}, _safetensors_metadata(embedding, name=False))
    return _write_torch(path, {embedding.token: tensor})


def _write_a1111(embedding: Embedding, path: Path) -> Path:
    tensor = _cpu_copy(embedding.vectors[TEXT_ENCODER])
    if path.suffix.lower() == ".safetensors":
        # The web UI reads a one-key safetensors file; emb_params is the key other trainers use.
        return _write_safetensors(path, {"emb_params": tensor}, _safetensors_metadata(embedding, name=True))
    data = {
        "string_to_token": {"*": A1111_STAR_TOKEN_ID},
        "string_to_param": {"*": tensor},
        "name": embedding.token,
        "step": embedding.step,
        "sd_checkpoint": embedding.metadata.get("sd_checkpoint"),
        "sd_checkpoint_name": embedding.metadata.get("sd_checkpoint_name"),
    }
    return _write_torch(path, data)


def _multi_encoder_writer(format: str) -> Callable[[Embedding, Path], Path]:
    """The writer of a multi-encoder layout: each role's vectors under that layout's key (layouts.py)."""

    def write(embedding: Embedding, path: Path) -> Path:
        keys = layout_keys(embedding.vectors, format)
        tensors = {key: _cpu_copy(embedding.vectors[role]) for role, key in keys.items()}
        # name and step too: tools that read these files ignore metadata, and the token name survives a round trip.
        return _write_safetensors(path, tensors, _safetensors_metadata(embedding, name=True))

    return write


def _write_pdparams(embedding: Embedding, path: Path) -> Path:
    import numpy as np

    array = np.ascontiguousarray(_cpu_copy(embedding.vectors[TEXT_ENCODER]).numpy(), dtype=np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            pickle.dump({embedding.token: array}, handle, protocol=4)  # paddle.save's default protocol

    return atomic_write(path, write)


_WRITERS: dict[str, Callable[[Embedding, Path], Path]] = {
    "diffusers": _write_diffusers,
    "a1111": _write_a1111,
    **{fmt: _multi_encoder_writer(fmt) for fmt in MULTI_ENCODER_FORMATS},
    "pdparams": _write_pdparams,
}


def save_diffusers(embedding: Embedding, path: str | Path) -> Path:
    """Write ``{token: [n, dim]}`` as safetensors (or a weights-only torch file for ``.bin``).

    A multi-encoder embedding is written in ComfyUI's layout instead, ``{clip_l, clip_g, t5xxl}`` as present
    (:data:`~textinv.embeddings.layouts.COMFYUI_KEYS`): the keys SDXL tools read, and that diffusers'
    ``load_textual_inversion`` is given one key at a time.
    """
    if embedding.multi_encoder:
        return write_embedding(embedding, path, "comfyui")
    return _write_diffusers(embedding, Path(path))

"""Writing an :class:`Embedding` atomically in any of :data:`WRITE_FORMATS`."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import UserError
from textinv.embeddings.model import (
    A1111_STAR_TOKEN_ID,
    SUFFIX_FORMATS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    WRITE_FORMATS,
    Embedding,
    _check_values,
    _dims_text,
)
from textinv.files import atomic_write

logger = logging.getLogger(__name__)


def write_embedding(embedding: Embedding, path: str | Path, format: Optional[str] = None) -> Path:
    """Write ``embedding`` atomically in ``format`` (one of :data:`WRITE_FORMATS`), else by suffix.

    Suffixes: ``.safetensors`` diffusers (sdxl for a two-encoder embedding), ``.bin`` diffusers
    (torch file), ``.pt`` a1111, ``.pdparams`` pdparams.
    """
    path = Path(path).expanduser()
    chosen = _choose_format(embedding, path, format)
    _check_values(embedding, f"embedding {embedding.token!r}")
    two_encoders = TEXT_ENCODER_2 in embedding.vectors
    if chosen == "sdxl":
        if set(embedding.vectors) != {TEXT_ENCODER, TEXT_ENCODER_2}:
            raise UserError(
                f"cannot write {embedding.token!r} as sdxl to {str(path)!r}: the sdxl format needs vectors for both "
                f"text encoders, it has dim {_dims_text(embedding.dims())} only"
            )
        if path.suffix != ".safetensors":
            suffix = path.suffix or "no suffix"
            raise UserError(f"sdxl embeddings are written as .safetensors, not {suffix} ({str(path)!r})")
    elif two_encoders or TEXT_ENCODER not in embedding.vectors:
        raise UserError(
            f"cannot write {embedding.token!r} as {chosen} to {str(path)!r}: it is a two-encoder (SDXL) embedding "
            f"(dims {_dims_text(embedding.dims())}) and {chosen} files hold one encoder's vectors; "
            "write it as sdxl to a .safetensors file"
        )
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder; give a file name to write the embedding to")
    written = _WRITERS[chosen](embedding, path)
    logger.debug("wrote %s (%s, %d vector(s)) to %s", embedding.token, chosen, embedding.num_vectors, written)
    return written


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
    if chosen == "diffusers" and path.suffix.lower() == ".safetensors" and TEXT_ENCODER_2 in embedding.vectors:
        return "sdxl"
    return chosen


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # clone(): torch.save writes a view's whole storage (e.g. a slice of an embedding matrix).
    return tensor.detach().to("cpu", torch.float32).clone().contiguous()


def _safetensors_metadata(embedding: Embedding, name: bool) -> dict[str, str]:
    metadata = {"format": "pt"}  # what transformers/diffusers write
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


def _write_sdxl(embedding: Embedding, path: Path) -> Path:
    tensors = {
        "clip_l": _cpu_copy(embedding.vectors[TEXT_ENCODER]),
        "clip_g": _cpu_copy(embedding.vectors[TEXT_ENCODER_2]),
    }
    return _write_safetensors(path, tensors, _safetensors_metadata(embedding, name=True))


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
    "sdxl": _write_sdxl,
    "pdparams": _write_pdparams,
}


def save_diffusers(embedding: Embedding, path: str | Path) -> Path:
    """Write ``{token: [n, dim]}`` as safetensors (or a weights-only torch file for ``.bin``).

    A two-encoder (SDXL) embedding is written as ``{clip_l, clip_g}`` safetensors instead: the
    layout SDXL tools read (diffusers loads each key with ``load_textual_inversion``).
    """
    if TEXT_ENCODER_2 in embedding.vectors:
        return write_embedding(embedding, path, "sdxl")
    return _write_diffusers(embedding, Path(path))

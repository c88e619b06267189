"""Reading an embedding file of any format (told by its content) into :class:`Embedding` objects."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.embeddings.bundle import bundled_words, is_bundle
from textinv.embeddings.layouts import classify_keys, is_multi_encoder, token_from_file_name
from textinv.embeddings.model import (
    FOLDER_FILE_NAMES,
    MAX_FILE_BYTES,
    PADDLE_NAME_TABLE,
    PNG_SIGNATURE,
    TEXT_ENCODER,
    Embedding,
    _check_shape,
    _check_values,
    ordered_roles,
)
from textinv.embeddings.modelspec import carried
from textinv.embeddings.png import _load_png
from textinv.embeddings.unpickle import _load_raw_pickle, _load_torch_zip
from textinv.errors import UserError, first_line

logger = logging.getLogger(__name__)


def read_embeddings(path: str | Path) -> list[Embedding]:
    """Every token in an embedding file (any format) or a folder holding ``learned_embeds.*``.

    Raises UserError naming the file and the problem for anything that is not a sound embedding.
    """
    path = _resolve_input(path)
    _, embeddings = _parse(path)
    for embedding in embeddings:
        _check_values(embedding, f"embedding {embedding.token!r} in {str(path)!r}")
    return embeddings


def detect_format(path: str | Path) -> str:
    """The format of an embedding file, judged by its content: one of :data:`READ_FORMATS`."""
    return _parse(_resolve_input(path))[0]


def _resolve_input(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        for name in FOLDER_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise UserError(f"embedding folder {str(path)!r} has no {' or '.join(FOLDER_FILE_NAMES)}; give the file itself")
    if not path.is_file():
        raise UserError(f"embedding file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"embedding file {str(path)!r} is empty (0 bytes); it was not written completely")
    if size > MAX_FILE_BYTES:
        raise UserError(
            f"{str(path)!r} is {size / 2**20:.0f} MiB; embeddings are a few KiB, so it is not one "
            f"(refusing files over {MAX_FILE_BYTES // 2**20} MiB)"
        )
    return path


def _parse(path: Path) -> tuple[str, list[Embedding]]:
    """(format, embeddings) of a file, with shapes checked but values not yet."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        return _classify(_load_torch_zip(path), path, "torch")
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        state, origin = _load_raw_pickle(path)
        return _classify(state, path, origin)
    if head.startswith(PNG_SIGNATURE):
        return _classify(_load_png(path), path, "png")
    if len(head) >= 9 and head[8:9] == b"{":
        header_size = int.from_bytes(head[:8], "little")
        if header_size + 8 > size:
            raise UserError(
                f"{str(path)!r} is a truncated safetensors file (its header needs {header_size + 8} bytes, "
                f"the file has {size})"
            )
        state, metadata = _load_safetensors(path)
        return _classify(state, path, "safetensors", metadata)
    raise UserError(f"{str(path)!r} is {_what_is(head)}, not an embedding file")


def _what_is(head: bytes) -> str:
    """A guess at what a non-embedding file is, for the error message."""
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith((b"GIF87a", b"GIF89a")) or head[8:12] == b"WEBP":
        return "an image"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (fetch the real file with `git lfs pull`)"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype", b"<html")):
        return "an HTML page (a failed download?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "of an unknown type"
    return "a text file"


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as error:
        raise UserError(
            f"{str(path)!r} is truncated or corrupt ({type(error).__name__}: {first_line(error)})"
        ) from None


# --- from a loaded dictionary to Embeddings -------------------------------------------------------
def _classify(
    state: Any, path: Path, origin: str, metadata: Optional[dict[str, str]] = None
) -> tuple[str, list[Embedding]]:
    where = str(path)
    metadata = metadata or {}
    if isinstance(state, torch.Tensor):
        raise UserError(f"{where!r} holds a bare tensor with no token name; it is not an embedding file")
    if not isinstance(state, dict):
        raise UserError(f"{where!r} holds a {type(state).__name__}, not a dictionary of tensors")
    if origin == "numpy-pickle":
        state = {k: v for k, v in state.items() if not (k == PADDLE_NAME_TABLE and isinstance(v, dict))}
    if not state:
        raise UserError(f"{where!r} holds no embedding (an empty dictionary)")
    if is_bundle(state):  # a LoRA with the word inside (issue 26): the words are its embeddings
        return "lora-bundle", _from_bundle(state, path)
    if "string_to_param" in state:
        return ("a1111-png" if origin == "png" else "a1111"), [_from_a1111(state, path)]
    if set(state) == {"emb_params"}:
        embedding = _a1111_named(path, metadata.get("name"), state["emb_params"], "emb_params")
        embedding.step = _int_or_none(metadata.get("step"))
        embedding.file_metadata = carried(metadata)
        return "a1111-emb_params", [embedding]
    if is_multi_encoder(state):
        return _from_multi_encoder(state, path, metadata)
    if origin == "png":
        raise UserError(f"{where!r}: its 'sd-ti-embedding' data has no string_to_param")
    embeddings = _from_token_dict(state, path)
    if origin == "safetensors" and len(embeddings) == 1:  # a file of several tokens: whose would its keys be?
        embeddings[0].step = _int_or_none(metadata.get("step"))
        embeddings[0].file_metadata = carried(metadata)
    return ("pdparams" if origin == "numpy-pickle" else "diffusers"), embeddings


def _from_bundle(state: dict[str, Any], path: Path) -> list[Embedding]:
    embeddings = []
    for word, by_role in bundled_words(state).items():
        vectors, dtypes = {}, {}
        for role, value in by_role.items():
            vectors[role], dtypes[role] = _as_vectors(value, path, f"bundle_emb.{word}.{role}")
        embeddings.append(Embedding(token=word, vectors=vectors, metadata={"dtype": dtypes}))
    return embeddings


def _from_a1111(state: dict[str, Any], path: Path) -> Embedding:
    params = state["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1:
        count = len(params) if isinstance(params, dict) else type(params).__name__
        raise UserError(f"{str(path)!r}: string_to_param should hold one entry ('*'), it holds {count}")
    value = next(iter(params.values()))
    if isinstance(value, dict) and set(value) == {"TORCHTENSOR"}:  # the PNG's JSON spelling
        value = _tensor_from_list(value["TORCHTENSOR"], path)
    embedding = _a1111_named(path, state.get("name"), value, "string_to_param['*']")
    embedding.step = _int_or_none(state.get("step"))
    for key in ("sd_checkpoint", "sd_checkpoint_name"):
        if isinstance(state.get(key), str):
            embedding.metadata[key] = state[key]
    return embedding


def _a1111_named(path: Path, name: Any, value: Any, what: str) -> Embedding:
    # The token is the file's name field, else (as in the web UI) the file name without suffix.
    token = name if isinstance(name, str) and name.strip() else path.stem
    vectors, dtype = _as_vectors(value, path, what)
    return Embedding(token=token, vectors={TEXT_ENCODER: vectors}, metadata={"dtype": {TEXT_ENCODER: dtype}})


def _from_multi_encoder(state: dict[Any, Any], path: Path, metadata: dict[str, str]) -> tuple[str, list[Embedding]]:
    """A ComfyUI / OneTrainer / diffusers-advanced file (layouts.py): vectors by role, counts checked later."""
    fmt, roles = classify_keys(state, path)
    vectors, dtypes = {}, {}
    for key, role in roles.items():
        vectors[role], dtypes[role] = _as_vectors(state[key], path, key)
    order = ordered_roles(vectors)
    name = metadata.get("name")
    embedding = Embedding(
        token=name if name and name.strip() else token_from_file_name(path),
        vectors={role: vectors[role] for role in order},
        step=_int_or_none(metadata.get("step")),
        metadata={"dtype": {role: dtypes[role] for role in order}},
        file_metadata=carried(metadata),
    )
    return fmt, [embedding]


def _from_token_dict(state: dict[Any, Any], path: Path) -> list[Embedding]:
    """``{token: [n, dim] or [dim]}`` (diffusers, ppdiffusers), grouping ``tok``, ``tok_1``... keys."""
    tensors: dict[str, Any] = {}
    for key, value in state.items():
        # Paddle's generic pickling stores a tensor as (name, ndarray).
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            value = value[1]
        if not isinstance(key, str):
            raise UserError(f"{str(path)!r} has a key {key!r} that is not a token name; it is not an embedding")
        tensors[key] = value
    grouped: dict[str, list[tuple[int, str]]] = {}
    for key in tensors:
        match = re.fullmatch(r"(.+)_(\d+)", key)
        base = match.group(1) if match and match.group(1) in tensors else key
        position = int(match.group(2)) if match and base != key else 0
        grouped.setdefault(base, []).append((position, key))
    embeddings = []
    for token, parts in grouped.items():
        rows, dtypes = [], []
        for _, key in sorted(parts):
            vectors, dtype = _as_vectors(tensors[key], path, repr(key))
            rows.append(vectors)
            dtypes.append(dtype)
        if len({r.shape[1] for r in rows}) != 1:
            raise UserError(f"{str(path)!r}: the vectors of {token!r} have different dims")
        vectors = torch.cat(rows) if len(rows) > 1 else rows[0]
        _check_shape(vectors, f"{str(path)!r}: {token!r}")
        embeddings.append(
            Embedding(token=token, vectors={TEXT_ENCODER: vectors}, metadata={"dtype": {TEXT_ENCODER: dtypes[0]}})
        )
    return embeddings


def _as_vectors(value: Any, path: Path, what: str) -> tuple[torch.Tensor, str]:
    """``value`` as a float32 ``[n, dim]`` tensor, and the dtype it had in the file."""
    if not isinstance(value, torch.Tensor):
        import numpy as np

        if not isinstance(value, np.ndarray):
            raise UserError(f"{str(path)!r}: {what} is a {type(value).__name__}, not a tensor; not an embedding")
        if value.dtype.kind != "f":
            raise UserError(f"{str(path)!r}: {what} holds {value.dtype} values, not floating-point vectors")
        value = torch.from_numpy(np.ascontiguousarray(value))
    dtype = str(value.dtype).replace("torch.", "")
    if not value.is_floating_point():
        raise UserError(f"{str(path)!r}: {what} holds {dtype} values, not floating-point vectors")
    if value.dim() == 1:
        value = value.reshape(1, -1)
    if value.dim() != 2:
        raise UserError(f"{str(path)!r}: {what} has shape {list(value.shape)}, not [num_vectors, dim]")
    vectors = value.detach().to("cpu", torch.float32)
    _check_shape(vectors, f"{str(path)!r}: {what}")
    return vectors, dtype


def _tensor_from_list(values: Any, path: Path) -> torch.Tensor:
    try:
        return torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise UserError(f"{str(path)!r}: its embedding data is not a table of numbers ({first_line(error)})") from None


def _int_or_none(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None

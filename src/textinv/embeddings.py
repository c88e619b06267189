"""One in-memory :class:`Embedding` type, and reading/writing every textual-inversion file format.

Formats (detected by content, never by the file name alone):

``diffusers``
    ``learned_embeds.safetensors`` / ``.bin``: ``{token: float32 [num_vectors, dim]}`` (older files:
    ``[dim]``, or one key per vector ``tok``, ``tok_1``...). Source: diffusers' textual_inversion
    example and ``TextualInversionLoaderMixin.load_textual_inversion``.
``a1111`` / ``a1111-emb_params``
    AUTOMATIC1111 web UI ``.pt``: ``{string_to_token: {'*': 265}, string_to_param: {'*': [n, dim]},
    name, step, sd_checkpoint, sd_checkpoint_name}`` (its ``Embedding.save`` in
    modules/textual_inversion/textual_inversion.py); other trainers write ``{'emb_params': [n, dim]}``,
    which the web UI also reads (one-key dictionaries), in ``.pt`` or ``.safetensors``.
``sdxl``
    ``{clip_l: [n, 768], clip_g: [n, 1280]}`` in safetensors (the web UI's SDXL embedding layout).
``pdparams``
    ppdiffusers ``learned_embeds.pdparams``: ``paddle.save({token: tensor})``, a pickle (protocol 2-4)
    in which Paddle stores tensors as numpy arrays and adds a ``StructuredToParameterName@@`` name
    table (paddle/framework/io.py ``_build_saved_state_dict``). Read and written without Paddle.
``a1111-png``
    The web UI's embedding images: a PNG ``tEXt`` chunk ``sd-ti-embedding`` holding base64 JSON in
    which tensors are ``{'TORCHTENSOR': nested list}`` (its textual_inversion/image_embedding.py).
    Read only.

Safety: ``.pt``/``.bin``/``.pdparams`` are pickles. Torch zip files are read with
``torch.load(weights_only=True)``; raw pickles with :class:`_DataOnlyUnpickler`, which refuses every
global but numpy arrays and plain containers, so no file can run code.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from textinv.config import UserError, first_line
from textinv.files import atomic_write

logger = logging.getLogger(__name__)

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


# --- reading -------------------------------------------------------------------------------------
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
        raise UserError(
            f"embedding folder {str(path)!r} has no {' or '.join(FOLDER_FILE_NAMES)}; give the file itself"
        )
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


def _load_torch_zip(path: Path) -> Any:
    """A torch zip file, read with weights_only=True (tensors and plain containers only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{str(path)!r} is truncated or corrupt (not a complete zip archive)") from None
    if not any(m.filename.endswith("data.pkl") for m in members):
        raise UserError(f"{str(path)!r} is a zip archive but not a torch file (it has no data.pkl)")
    if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
        raise UserError(f"{str(path)!r} unpacks to over {MAX_UNPACKED_BYTES // 2**20} MiB; it is not an embedding")
    return _torch_load(path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise _refused(path, _weights_only_global(error)) from None
        raise UserError(f"{str(path)!r} is truncated or corrupt ({first_line(error)})") from None
    except MemoryError:
        raise UserError(f"{str(path)!r} asks for more memory than an embedding could need; refusing it") from None
    except Exception as error:
        raise UserError(
            f"{str(path)!r} is truncated or corrupt ({type(error).__name__}: {first_line(error)})"
        ) from None


def _weights_only_global(error: BaseException) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else first_line(error)


def _refused(path: Path, what: str) -> UserError:
    return UserError(
        f"refusing {str(path)!r}: it holds Python objects other than tensors ({what}); "
        "loading it could run code. Get the embedding as .safetensors, or from a trusted source"
    )


def _load_raw_pickle(path: Path) -> tuple[Any, str]:
    """A pickle that is not a torch zip: torch's legacy format, or a numpy pickle (ppdiffusers)."""
    try:
        with open(path, "rb") as handle:
            first = _DataOnlyUnpickler(handle).load()
            if type(first) is int and first == _torch_legacy_magic():
                # torch's pre-1.6 format: a magic number, then more pickles; torch reads it weights-only.
                return _torch_load(path), "torch"
            if handle.read(1):
                raise UserError(f"{str(path)!r} has data after its pickle; it is not an embedding file")
    except _RefusedGlobal as error:
        raise _refused(path, str(error)) from None
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{str(path)!r} asks for more memory than an embedding could need; refusing it") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise UserError(
            f"{str(path)!r} is truncated or corrupt ({type(error).__name__}: {first_line(error)})"
        ) from None
    return first, "numpy-pickle"


def _torch_legacy_magic() -> int:
    from torch.serialization import MAGIC_NUMBER

    return int(MAGIC_NUMBER)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays; refuses every other global.

    A pickle can only call what ``find_class`` hands it, so refusing all else means no code runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("a persistent id")


_ALLOWED: dict[tuple[str, str], Any] = {}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    if _ALLOWED:
        return _ALLOWED
    import collections

    import numpy as np

    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    def dtype(*args: Any) -> Any:
        result = np.dtype(*args)
        if result.hasobject:
            raise _RefusedGlobal(f"numpy object dtype {result}")
        return result

    def latin1_encode(text: str, encoding: str = "latin1") -> bytes:
        # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise _RefusedGlobal(f"_codecs.encode(..., {encoding!r})")
        return text.encode("latin1")

    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core: accept both spellings.
    for package in ("numpy.core", "numpy._core"):
        _ALLOWED[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        _ALLOWED[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        _ALLOWED[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    _ALLOWED[("numpy", "ndarray")] = np.ndarray
    _ALLOWED[("numpy", "dtype")] = dtype
    _ALLOWED[("collections", "OrderedDict")] = collections.OrderedDict
    for builtin in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool):
        _ALLOWED[("builtins", builtin.__name__)] = builtin
        _ALLOWED[("__builtin__", builtin.__name__)] = builtin
    _ALLOWED[("_codecs", "encode")] = latin1_encode
    return _ALLOWED


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


def _load_png(path: Path) -> dict[str, Any]:
    """The web UI's embedding dictionary from a PNG's ``sd-ti-embedding`` text chunk."""
    data = path.read_bytes()
    text: Optional[bytes] = None
    position = len(PNG_SIGNATURE)
    ended = False
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        crc = data[position + 8 + length : position + 12 + length]
        if len(body) != length or len(crc) != 4:
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt") and body.split(b"\0", 1)[0] == PNG_TEXT_KEY:
            if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
                raise UserError(f"{str(path)!r}: the embedding's PNG text chunk is corrupt (bad checksum)")
            text = _png_text(kind, body[len(PNG_TEXT_KEY) + 1 :], path)
        if kind == b"IEND":
            ended = True
            break
        position += 12 + length
    if not ended:
        raise UserError(f"{str(path)!r} is a truncated or corrupt PNG (it has no end chunk)")
    if text is None:
        raise UserError(
            f"{str(path)!r} is a PNG without an 'sd-ti-embedding' text chunk, so not a web UI embedding image "
            "(embeddings hidden only in the pixels are not read)"
        )
    try:
        return json.loads(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, RecursionError) as error:
        raise UserError(
            f"{str(path)!r}: its 'sd-ti-embedding' text is not base64 JSON ({first_line(error)})"
        ) from None


def _png_text(kind: bytes, rest: bytes, path: Path) -> bytes:
    """The text of a PNG tEXt/zTXt/iTXt chunk after its keyword."""
    compressed = False
    if kind == b"zTXt":
        compressed, rest = True, rest[1:]
    elif kind == b"iTXt":
        compressed, rest = rest[:1] == b"\x01", rest[2:]
        rest = rest.split(b"\0", 2)[-1]  # skip language tag and translated keyword
    if not compressed:
        return rest
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(rest, MAX_FILE_BYTES)
    except zlib.error as error:
        raise UserError(f"{str(path)!r}: its 'sd-ti-embedding' text chunk is corrupt ({error})") from None
    if inflater.unconsumed_tail:
        raise UserError(f"{str(path)!r}: its 'sd-ti-embedding' text unpacks to over {MAX_FILE_BYTES // 2**20} MiB")
    return text


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
    if "string_to_param" in state:
        return ("a1111-png" if origin == "png" else "a1111"), [_from_a1111(state, path)]
    if set(state) == {"emb_params"}:
        embedding = _a1111_named(path, metadata.get("name"), state["emb_params"], "emb_params")
        embedding.step = _int_or_none(metadata.get("step"))
        return "a1111-emb_params", [embedding]
    if "clip_l" in state or "clip_g" in state:
        return "sdxl", [_from_sdxl(state, path, metadata)]
    if origin == "png":
        raise UserError(f"{where!r}: its 'sd-ti-embedding' data has no string_to_param")
    embeddings = _from_token_dict(state, path)
    if origin == "safetensors" and len(embeddings) == 1:
        embeddings[0].step = _int_or_none(metadata.get("step"))
    return ("pdparams" if origin == "numpy-pickle" else "diffusers"), embeddings


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


def _from_sdxl(state: dict[str, Any], path: Path, metadata: dict[str, str]) -> Embedding:
    missing = [key for key in ("clip_l", "clip_g") if key not in state]
    if missing:
        raise UserError(f"{str(path)!r} looks like an SDXL embedding but has no {missing[0]!r} tensor")
    extra = sorted(set(state) - {"clip_l", "clip_g"})
    if extra:
        logger.warning("%s: ignoring keys %s beside clip_l/clip_g", path, ", ".join(map(str, extra)))
    # clip_l is CLIP ViT-L (SDXL's text_encoder), clip_g is OpenCLIP bigG (text_encoder_2).
    clip_l, dtype_l = _as_vectors(state["clip_l"], path, "clip_l")
    clip_g, dtype_g = _as_vectors(state["clip_g"], path, "clip_g")
    if clip_l.shape[0] != clip_g.shape[0]:
        raise UserError(
            f"{str(path)!r}: clip_l has {clip_l.shape[0]} vectors but clip_g has {clip_g.shape[0]}; they must match"
        )
    name = metadata.get("name")
    return Embedding(
        token=name if name and name.strip() else path.stem,
        vectors={TEXT_ENCODER: clip_l, TEXT_ENCODER_2: clip_g},
        step=_int_or_none(metadata.get("step")),
        metadata={"dtype": {TEXT_ENCODER: dtype_l, TEXT_ENCODER_2: dtype_g}},
    )


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


# --- writing -------------------------------------------------------------------------------------
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


# --- inspecting and converting --------------------------------------------------------------------
def describe(path: str | Path) -> dict[str, Any]:
    """What an embedding file holds: format, and per token its vectors, dims, dtype, norms, family."""
    resolved = _resolve_input(path)
    fmt, embeddings = _parse(resolved)
    tokens = []
    for embedding in embeddings:
        _check_values(embedding, f"embedding {embedding.token!r} in {str(resolved)!r}")
        tokens.append(
            {
                "token": embedding.token,
                "num_vectors": embedding.num_vectors,
                "dims": embedding.dims(),
                "dtype": dict(embedding.metadata.get("dtype", {})),
                "family": embedding.family,
                "step": embedding.step,
                "norms": {
                    name: [round(float(n), 6) for n in tensor.norm(dim=1)] for name, tensor in embedding.vectors.items()
                },
            }
        )
    return {"file": str(resolved), "format": fmt, "bytes": resolved.stat().st_size, "tokens": tokens}


def convert(
    src: str | Path,
    dst: str | Path,
    to: Optional[str] = None,
    token: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Read the one token in ``src`` and write it to ``dst`` as ``to`` (default: by ``dst``'s suffix)."""
    dst = Path(dst).expanduser()
    if dst.exists() and not overwrite:
        raise UserError(f"{str(dst)!r} already exists; pass --overwrite to replace it")
    embeddings = read_embeddings(src)
    if len(embeddings) != 1:
        names = ", ".join(e.token for e in embeddings)
        raise UserError(f"{str(src)!r} holds {len(embeddings)} tokens ({names}); the output formats hold one")
    embedding = embeddings[0]
    if token is not None:
        if not token.strip():
            raise UserError("--token must not be empty")
        embedding.token = token
    return write_embedding(embedding, dst, to)


# --- loading into a pipeline ----------------------------------------------------------------------
def _pipeline_encoders(pipe: Any) -> list[tuple[str, Any, Any]]:
    """(encoder attribute, tokenizer, text encoder) for each text encoder the pipeline has."""
    pairs = []
    for encoder_name, tokenizer_name in ((TEXT_ENCODER, "tokenizer"), (TEXT_ENCODER_2, "tokenizer_2")):
        encoder = getattr(pipe, encoder_name, None)
        tokenizer = getattr(pipe, tokenizer_name, None)
        if encoder is not None and tokenizer is not None:
            pairs.append((encoder_name, tokenizer, encoder))
    if not pairs:
        raise UserError("this pipeline has no text encoder with a tokenizer to load embeddings into")
    return pairs


def _check_fits(embedding: Embedding, pairs: list[tuple[str, Any, Any]], path: Path | str) -> None:
    pipe_dims = {name: int(encoder.get_input_embeddings().weight.shape[1]) for name, _, encoder in pairs}
    emb_dims = embedding.dims()
    where = f"embedding {embedding.token!r} in {str(path)!r}"
    if set(emb_dims) != set(pipe_dims):
        raise UserError(
            f"{where} has vectors for {len(emb_dims)} text encoder(s) (dim {_dims_text(emb_dims)}) but the pipeline "
            f"has {len(pipe_dims)} (dim {_dims_text(pipe_dims)}); it was made for another model family"
        )
    for name, dim in emb_dims.items():
        if dim != pipe_dims[name]:
            raise UserError(
                f"{where} has dim {_dims_text(emb_dims)} but the pipeline's text encoders have dim "
                f"{_dims_text(pipe_dims)}; it was made for another model family"
            )


def _present_names(tokenizer: Any, token: str, num_vectors: int) -> list[str]:
    from textinv.tokens import token_names

    vocab = tokenizer.get_vocab()
    # One name past the end too: a token already there with more vectors must not be half-replaced.
    return [name for name in token_names(token, num_vectors + 1) if name in vocab]


def _loaded_tokens(tokenizer: Any) -> set[str]:
    """Tokens added to the tokenizer after its vocabulary was made (special tokens excepted)."""
    return set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)


def load_embeddings(
    pipe: Any,
    path: str | Path,
    token: Optional[str] = None,
    replace: bool = False,
) -> list[str]:
    """Add the token(s) of an embedding file (any format) to a pipeline's tokenizer(s) and text encoder(s).

    ``token`` renames the (single) token in the file; a token the pipeline already has is replaced
    only with ``replace=True``. A two-encoder pipeline (SDXL) gets both sets of vectors. Every check
    runs before the pipeline changes. Returns the tokens loaded.
    """
    from textinv.tokens import add_placeholder_token, token_names

    embeddings = read_embeddings(path)
    if token is not None:
        if len(embeddings) != 1:
            raise UserError(f"--token renames one token, but {str(path)!r} holds {len(embeddings)}")
        embeddings[0].token = token
    pairs = _pipeline_encoders(pipe)
    replacing: dict[str, bool] = {}
    for embedding in embeddings:
        _check_fits(embedding, pairs, path)
        wanted = token_names(embedding.token, embedding.num_vectors)
        present = {name: _present_names(tok, embedding.token, embedding.num_vectors) for name, tok, _ in pairs}
        for name, tokenizer, _ in pairs:
            loaded = _loaded_tokens(tokenizer)
            words = [entry for entry in present[name] if entry not in loaded]
            if words:
                # Replacing it would change the meaning of that word in every prompt.
                raise UserError(
                    f"token {embedding.token!r} (from {str(path)!r}) is a word of the model's own vocabulary "
                    f"({words[0]!r}); load it under another name, e.g. --token '<{embedding.token.strip('<>')}>'"
                )
        if any(present.values()):
            if not replace:
                raise UserError(
                    f"token {embedding.token!r} (from {str(path)!r}) is already in the pipeline; pass --replace to "
                    "overwrite it or --token NAME to load it under another name"
                )
            if any(found != wanted for found in present.values()):
                raise UserError(
                    f"token {embedding.token!r} is in the pipeline with a different number of vectors than the "
                    f"{embedding.num_vectors} in {str(path)!r}; cannot replace it, load it under another --token"
                )
        replacing[embedding.token] = any(present.values())
    added = []
    for embedding in embeddings:
        for name, tokenizer, encoder in pairs:
            vectors = embedding.vectors[name]
            if replacing[embedding.token]:
                _replace_rows(tokenizer, encoder, embedding.token, vectors)
            else:
                add_placeholder_token(tokenizer, encoder, embedding.token, vectors)
        added.append(embedding.token)
        logger.info("loaded %s (%d vector(s)) from %s", embedding.token, embedding.num_vectors, path)
    return added


def _replace_rows(tokenizer: Any, text_encoder: Any, token: str, vectors: torch.Tensor) -> None:
    from textinv.tokens import token_names

    ids = tokenizer.convert_tokens_to_ids(token_names(token, vectors.shape[0]))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for row, vector in zip(ids, vectors):
            weight[row] = vector.to(weight)


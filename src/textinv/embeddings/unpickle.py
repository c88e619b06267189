"""Reading pickled embedding files without letting them run code.

Torch zip files (and torch's legacy format) are read with ``torch.load(weights_only=True)``; other
pickles (ppdiffusers' numpy pickles) with :class:`_DataOnlyUnpickler`, which refuses every global
but numpy arrays and plain containers. A refusal is a :class:`UserError` naming the file.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from textinv.embeddings.model import MAX_UNPACKED_BYTES
from textinv.errors import UserError, first_line

logger = logging.getLogger(__name__)
_PROTOCOL_WARNING = re.compile(r"pickle protocol (\d+)")


def _load_torch_zip(path: Path) -> Any:
    """A torch zip file, read with weights_only=True (tensors and plain containers only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{str(path)!r} is truncated or corrupt (not a complete zip archive)") from None
    except NotImplementedError as error:  # a zip version or feature Python's zipfile does not read (make fuzz)
        raise UserError(f"{str(path)!r} is not a torch file: its zip archive says {first_line(error)}") from None
    # Nothing is extracted, but a member named outside the archive's folder is no torch.save output (zip-slip names).
    strange = next(
        (m.filename for m in members if m.filename.startswith(("/", "\\")) or ".." in re.split(r"[\\/]", m.filename)),
        None,
    )
    if strange is not None:
        raise UserError(
            f"{str(path)!r} has a member named {strange[:80]!r}, outside its archive; it is not a torch file"
        )
    if not any(m.filename.endswith("data.pkl") for m in members):
        raise UserError(f"{str(path)!r} is a zip archive but not a torch file (it has no data.pkl)")
    if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
        raise UserError(f"{str(path)!r} unpacks to over {MAX_UNPACKED_BYTES // 2**20} MiB; it is not an embedding")
    return _torch_load(path)


def _torch_load(path: Path) -> Any:
    try:
        # torch warns (UserWarning) of a PROTO opcode other than 2; caught here so it never reaches the person, and a
        # protocol no pickle has (fuzzing found "pickle protocol 88") is a corrupt file, refused in one line.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        for warning in caught:
            match = _PROTOCOL_WARNING.search(str(warning.message))
            if match and int(match.group(1)) > pickle.HIGHEST_PROTOCOL:
                raise UserError(
                    f"{str(path)!r} is corrupt: its pickle says protocol {match.group(1)}, and none above "
                    f"{pickle.HIGHEST_PROTOCOL} exists"
                )
            logger.debug("reading %s: %s", path, first_line(warning.message))  # type: ignore[arg-type]
        return loaded
    except UserError:
        raise
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
        # From memory, not the file: a forged length (LONG4, BINBYTES8...) makes a file's read(n) allocate n bytes
        # first (fuzzing found 1.8 GB), a BytesIO's returns what is there. Files are at most MAX_FILE_BYTES.
        with io.BytesIO(path.read_bytes()) as handle:
            first = _DataOnlyUnpickler(handle).load()
            if type(first) is int and first == _torch_legacy_magic():
                # torch's pre-1.6 format: a magic number, then more pickles; torch reads it weights-only.
                return _torch_load(path), "torch"
            if handle.read(1):
                raise UserError(f"{str(path)!r} has data after its pickle; it is not an embedding file")
    except _RefusedGlobal as error:
        raise _refused(path, str(error)) from None
    except _TooManyOperations:
        raise UserError(
            f"{str(path)!r} holds over {MAX_PICKLE_OPERATIONS:,} pickle operations; an embedding's pickle has a few "
            "dozen, so it is not one"
        ) from None
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{str(path)!r} asks for more memory than an embedding could need; refusing it") from None
    except Exception as error:  # noqa: BLE001 - the pickle machine's errors on bad bytes: OverflowError for a FRAME
        # length past sys.maxsize (found by fuzzing), struct.error, RecursionError...; none is the program's fault.
        raise UserError(
            f"{str(path)!r} is truncated or corrupt ({type(error).__name__}: {first_line(error)})"
        ) from None
    return first, "numpy-pickle"


def _torch_legacy_magic() -> int:
    from torch.serialization import MAGIC_NUMBER

    return int(MAGIC_NUMBER)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _TooManyOperations(pickle.UnpicklingError):
    pass


MAX_PICKLE_OPERATIONS = 100_000


def _counted(step: Any) -> Any:
    """An opcode's step that counts: the pure-Python unpickler runs ~200,000 operations a second, so a file of
    millions of one-byte opcodes (a nesting bomb) would take minutes. An embedding's pickle has a few dozen."""

    def run(self: Any) -> None:
        self.operations += 1
        if self.operations > MAX_PICKLE_OPERATIONS:
            raise _TooManyOperations
        step(self)

    return run


class _DataOnlyUnpickler(pickle._Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays; refuses every other global.

    A pickle can only call what ``find_class`` hands it, so refusing all else means no code runs. It is the pure-Python
    unpickler, for its opcode table: BUILD (which calls ``__setstate__`` or sets attributes) is allowed only on numpy
    arrays and dtypes made in this pickle, and a dtype only its own state or a byte order. Fuzzing found dtype BUILDs
    with forged item sizes that broke numpy inside ("get_clear_loop not set") or asked for gigabytes; and BUILD on an
    allowed global would set attributes on it for every later load (the first half of protectai/modelscan#85).
    """

    _steps: dict[int, Any] = dict(pickle._Unpickler.dispatch)  # opcode -> step; counted below
    stack: list[Any]  # the unpickler's own, set by load()
    operations = 0

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("a persistent id")

    def _load_build(self) -> None:
        import numpy as np

        target, state = self.stack[-2], self.stack[-1]
        if isinstance(target, np.dtype):
            own = target.__reduce__()[2]
            if not (isinstance(state, tuple) and len(state) == len(own) and state[1] in ("<", ">", "|", "=")):
                raise _RefusedGlobal(f"a numpy dtype state {state!r:.60}")
            if state[:1] + state[2:] != own[:1] + own[2:]:
                raise _RefusedGlobal(f"a forged numpy dtype state {state!r:.60}")
        elif type(target) is not np.ndarray:
            raise _RefusedGlobal(f"BUILD on a {type(target).__name__}")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def _load_reduce(self) -> None:
        import numpy as np

        if self.stack[-2] is np.ndarray:  # ndarray(shape) would allocate the shape the pickle names
            raise _RefusedGlobal("a call of numpy.ndarray")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    def _load_newobj(self) -> None:
        # cls.__new__(cls, *args): numpy and Paddle pickles never use it, and ndarray/bytes would allocate from a count.
        raise _RefusedGlobal("NEWOBJ")

    def _load_ext(self) -> None:
        # The extension registry (copyreg) hands out objects from a cache without find_class; no pickle here uses it.
        raise _RefusedGlobal("an extension code")

    def _load_bytearray8(self) -> None:
        # The library's step allocates the length it reads before reading (fuzzing found 10**19): read, then check.
        (size,) = struct.unpack("<Q", self.read(8))  # type: ignore[attr-defined]
        data = self.read(size)  # type: ignore[attr-defined]
        if len(data) != size:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {size} bytes runs past the end of the file")
        self.stack.append(bytearray(data))

    _steps[pickle.BYTEARRAY8[0]] = _load_bytearray8
    _steps[pickle.BUILD[0]] = _load_build
    _steps[pickle.REDUCE[0]] = _load_reduce
    for _opcode in (pickle.NEWOBJ, pickle.NEWOBJ_EX):
        _steps[_opcode[0]] = _load_newobj
    for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        _steps[_opcode[0]] = _load_ext
    dispatch = {code: _counted(step) for code, step in _steps.items()}


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

    def reconstruct(subtype: Any, shape: Any, kind: Any) -> Any:
        # What ndarray.__reduce__ writes: an empty array, filled by BUILD. Another shape would be allocated here.
        if subtype is not np.ndarray or shape != (0,):
            raise _RefusedGlobal(f"numpy _reconstruct of {getattr(subtype, '__name__', subtype)!r:.40} {shape!r:.40}")
        return multiarray._reconstruct(subtype, shape, kind)

    def from_text(kind: type) -> Any:
        def make(*args: Any) -> Any:
            # bytes(2**33) would zero 8 GB: a pickle's bytes come from a string (or nothing), never from a count.
            if args and not isinstance(args[0], (str, bytes, bytearray)):
                raise _RefusedGlobal(f"{kind.__name__}() of a {type(args[0]).__name__}")
            return kind(*args)

        return make

    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core: accept both spellings.
    for package in ("numpy.core", "numpy._core"):
        _ALLOWED[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        _ALLOWED[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        _ALLOWED[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]  # private, what pickles of arrays name
    _ALLOWED[("numpy", "ndarray")] = np.ndarray
    _ALLOWED[("numpy", "dtype")] = dtype
    _ALLOWED[("collections", "OrderedDict")] = collections.OrderedDict
    for builtin in (dict, list, tuple, set, frozenset, int, float, complex, str, bool, bytes, bytearray):
        made = from_text(builtin) if builtin in (bytes, bytearray) else builtin
        _ALLOWED[("builtins", builtin.__name__)] = made
        _ALLOWED[("__builtin__", builtin.__name__)] = made
    _ALLOWED[("_codecs", "encode")] = latin1_encode
    return _ALLOWED

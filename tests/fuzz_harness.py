"""The fuzz suite's property, seeds and input strategies (issue 31), shared by tests/test_fuzz.py (CI's seeded set),
tests/test_fuzz_regressions.py and bench/fuzz.py (``make fuzz``, time-bound, corpus outside the repository).

The property every reader of untrusted input must keep, on any input: it returns a valid result or raises a
:class:`UserError` whose message is one line. The case fails on anything else: another exception, more than 2 s
of CPU time, more than 1 GiB of memory (an address-space limit on the process while the reader runs), a file
written, moved or deleted outside the folder the reader may write to, or a process started (a pickle that ran
code). Writes and process starts are seen through Python's audit hooks (PEP 578), which is where ``open``,
``os.remove``, ``subprocess.Popen``, ``os.system``... all report before they act.

Inputs are real files and mutations of them drawn by hypothesis strategies (byte flips, truncation, splices,
insertions, pickle-opcode swaps and argument edits), so hypothesis shrinks a failure to a small file.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import resource
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hypothesis import strategies as st

from textinv.errors import UserError

CPU_SECONDS = 2.0  # the property's time limit, in CPU seconds (the machine is shared: wall time would be noise)
WALL_SECONDS = 30.0  # a hang that burns no CPU (a blocking read) still ends the case
MEMORY_BYTES = 2**30  # the property's memory limit, over what the process had mapped before the call
REGRESSIONS = Path(__file__).resolve().parent / "data" / "fuzz-regressions"


class Violation(AssertionError):
    """The property broken: the case fails (and hypothesis shrinks it)."""


class _Abort(BaseException):
    """Raised inside the reader when a limit is hit: a BaseException, so a reader's ``except Exception`` cannot
    swallow it (the guard turns it into a Violation)."""


# --- the guard: audit hook, timers, memory limit ---------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {  # audit events that change the file system, and which of their arguments are paths
    "os.remove": (0,),
    "os.rename": (0, 1),
    "os.replace": (0, 1),
    "os.mkdir": (0,),
    "os.rmdir": (0,),
    "os.symlink": (0, 1),
    "os.link": (0, 1),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.move": (0, 1),
}
_PROCESS_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "pty.spawn")


@dataclass
class _Watch:
    allowed: Optional[Path] = None  # writes inside this folder are the reader's to make
    active: bool = False
    broken: list[str] = field(default_factory=list)


_WATCH = _Watch()
# What Python's default filters hide outside __main__: these never reach the person.
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _inside(path: Any, folder: Optional[Path]) -> bool:
    if isinstance(path, int) or folder is None:
        return isinstance(path, int)  # a file descriptor was opened by a call that was itself checked
    try:
        resolved = Path(os.fsdecode(path)).resolve()
    except (TypeError, ValueError, OSError):
        return False
    return resolved == folder or folder in resolved.parents


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCH.active:
        return
    problem = None
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        if writes and not _inside(path, _WATCH.allowed):
            problem = f"opened {path!r} for writing ({mode or flags})"
    elif event in _PATH_EVENTS:
        outside = [args[i] for i in _PATH_EVENTS[event] if i < len(args) and not _inside(args[i], _WATCH.allowed)]
        if outside:
            problem = f"{event} on {outside[0]!r}"
    elif event.startswith(_PROCESS_EVENTS) or event == "socket.connect":
        problem = f"{event} {args[:2]!r}"
    if problem is not None:
        _WATCH.broken.append(problem)
        _WATCH.active = False  # the raise below must not re-enter
        raise _Abort(problem)


sys.addaudithook(_audit)  # hooks cannot be removed; inactive outside guarded() it returns at once


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * resource.getpagesize()


def _expire(signum: int, frame: Any) -> None:
    raise _Abort(f"over {CPU_SECONDS} s of CPU time" if signum == signal.SIGPROF else f"over {WALL_SECONDS} s")


@contextmanager
def guarded(allowed: Optional[Path]) -> Iterator[None]:
    """Run a reader under the property's limits; a Violation (or an AssertionError after it) if one is broken."""
    _WATCH.allowed = allowed.resolve() if allowed is not None else None
    _WATCH.broken = []
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    previous = {sig: signal.signal(sig, _expire) for sig in (signal.SIGPROF, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_PROF, CPU_SECONDS * 1.5)  # the interrupt; the exact check is below
    signal.setitimer(signal.ITIMER_REAL, WALL_SECONDS)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _WATCH.broken.append(  # printed as "Exception ignored in: ..."
        f"an unraisable {type(unraisable.exc_value).__name__}: {unraisable.exc_value}"
    )
    started = time.process_time()
    _WATCH.active = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except _Abort as abort:
        raise Violation(str(abort)) from None
    finally:
        _WATCH.active = False
        sys.unraisablehook = hook
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    used = time.process_time() - started
    if used > CPU_SECONDS:
        raise Violation(f"took {used:.2f} s of CPU time (limit {CPU_SECONDS} s)")
    if _WATCH.broken:
        raise Violation(_WATCH.broken[0])
    # A warning Python shows by default reaches the person's terminal ("pickle protocol 88" did).
    shown = [w for w in caught if not issubclass(w.category, _HIDDEN_WARNINGS)]
    if shown:
        raise Violation(f"a {shown[0].category.__name__} reached the user: {shown[0].message}")


def check_property(call: Callable[[], Any], allowed: Optional[Path] = None) -> tuple[str, Any]:
    """("ok", result) or ("refused", message): the two outcomes the property allows. Anything else raises."""
    with guarded(allowed):
        try:
            outcome: tuple[str, Any] = ("ok", call())
        except UserError as error:  # handled inside the guard: what the failed read leaves is freed under it
            outcome = ("refused", str(error))
    if outcome[0] == "refused":
        message = outcome[1]
        if not message.strip() or "\n" in message or "\r" in message:
            raise Violation(f"UserError of {len(message.splitlines())} lines: {message!r}")
        # Under the 1 GiB limit an allocation failed: without the limit the reader would have used that memory.
        if re.search(r"asks for more memory|allocate memory|MemoryError|DefaultCPUAllocator", message):
            raise Violation(f"hit the memory limit: {message}")
    return outcome


# --- seeds -------------------------------------------------------------------------------------------
def embedding_seeds(folder: Path, extra: Optional[Path] = None) -> list[Path]:
    """Real embedding files: the committed third-party ones, every format textinv writes (its own outputs), the
    web UI's PNG look-alike, and (when given) the folder of third-party originals."""
    import torch

    import fixtures_embeddings as lookalike
    from textinv.embeddings.model import TEXT_ENCODER, Embedding
    from textinv.embeddings.write import write_embedding

    folder.mkdir(parents=True, exist_ok=True)
    seeds = sorted((REGRESSIONS.parent / "embeddings").iterdir())
    small = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    one = Embedding(token="<seed>", vectors={TEXT_ENCODER: small}, step=3)
    two = Embedding(token="<seed>", vectors={"clip_l": small, "clip_g": torch.ones(2, 12)})
    for name, embedding, fmt in (
        ("diffusers.safetensors", one, "diffusers"),
        ("diffusers.bin", one, "diffusers"),
        ("a1111.pt", one, "a1111"),
        ("paddle.pdparams", one, "pdparams"),
        ("sdxl.safetensors", two, "sdxl"),
        ("comfyui.safetensors", two, "comfyui"),
    ):
        seeds.append(write_embedding(embedding, folder / name, fmt))
    seeds.append(lookalike.a1111_png(folder / "webui.png", "rick", small, 60, size=(8, 8)))
    seeds.append(lookalike.emb_params_pt(folder / "emb_params.pt", small))
    if extra is not None and extra.is_dir():
        seeds += sorted(p for p in extra.iterdir() if p.is_file() and p.stat().st_size < 2**20)
    return seeds


def image_seeds() -> list[bytes]:
    """Small real images: the demo photos shrunk (JPEG), and PNGs with and without alpha, a palette, WEBP, BMP."""
    import io

    from PIL import Image

    from textinv.tiny import demo_images_dir

    out = []
    source = sorted(demo_images_dir().glob("*.jpg"))[0]
    with Image.open(source) as image:
        small = image.convert("RGB").resize((24, 16))
    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("WEBP", "RGB"), ("BMP", "L")):
        buffer = io.BytesIO()
        small.convert(mode).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


CONCEPT_SEED = (
    '[[concept]]\nplaceholder_token = "<cat-toy>"\ninitializer_token = "toy"\ntrain_data_dir = "cat"\n'
    'repeats = 3\ncaption_extension = ".txt"\n[[concept]]\nplaceholder_token = "<wave>"\ninitializer_token = "art"\n'
    'learnable_property = "style"\nnum_vectors = 2\ntrain_data_dir = "cat"\ncaption_extension = ".txt"\n'
    "shuffle_caption = true\n"
    "caption_tag_dropout_rate = 0.1\n"
)
TEMPLATE_SEED = "a photo of [name], [filewords]\n\ufeffa painting of [name]\n\n  [name] in the style of [filewords]  \n"
CAPTION_SEED = "a red car, parked, 写真，night\r\nsecond line [name]\n".encode()


# --- strategies --------------------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, seeds: st.SearchStrategy[bytes], max_edits: int = 4) -> bytes:
    """A seed after up to ``max_edits`` edits: flips, overwrites, truncation, insertions, deletions, splices."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(0, max_edits))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "splice", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at : at + 8] = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f\xff\xff\xff", b"\xff" * 8, b"\x80"]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            other = draw(seeds)
            start = draw(st.integers(0, max(len(other) - 1, 0)))
            data[at:] = other[start : start + draw(st.integers(1, 4096))]
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 256))] * draw(st.integers(2, 64))
    return bytes(data)


def _opcodes(data: bytes) -> list[tuple[Any, Any, int]]:
    found = []
    try:
        for op, arg, position in pickletools.genops(data):
            found.append((op, arg, position))
    except Exception:  # noqa: BLE001 - a damaged pickle: the opcodes before the damage
        pass
    return found


_OPCODE_BYTES = [op.code.encode("latin1") for op in pickletools.opcodes]


@st.composite
def pickle_edited(draw: st.DrawFn, pickles: st.SearchStrategy[bytes]) -> bytes:
    """A pickle with opcodes swapped, dropped, duplicated or their integer arguments pushed to extremes (a FRAME or
    BINBYTES length near 2**63, a PROTO of 88, a memo index out of range)."""
    data = bytearray(draw(pickles))
    for _ in range(draw(st.integers(1, 3))):
        ops = _opcodes(bytes(data))
        if not ops:
            break
        op, arg, position = draw(st.sampled_from(ops))
        kind = draw(st.sampled_from(["swap", "drop", "duplicate", "argument"]))
        width = 1 + (op.arg.n if op.arg is not None and op.arg.n > 0 else 0)
        if kind == "swap":
            data[position : position + 1] = draw(st.sampled_from(_OPCODE_BYTES))
        elif kind == "drop":
            del data[position : position + width]
        elif kind == "duplicate":
            data[position:position] = data[position : position + width]
        elif op.arg is not None and op.arg.n > 0:
            extreme = draw(st.sampled_from([0, 1, 88, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**63 + 5, 2**64 - 1]))
            mask = (1 << (8 * op.arg.n)) - 1
            data[position + 1 : position + width] = (extreme & mask).to_bytes(op.arg.n, "little")
    return bytes(data)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value (the configs' keys get them in place of what they should hold)."""
    leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=max_leaves,
    )


def toml_values() -> st.SearchStrategy[str]:
    """TOML spellings of values of every type, for a concept table's keys."""
    scalars = st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=True).map(lambda v: repr(v).replace("inf", "inf").replace("nan", "nan")),
        st.booleans().map(lambda b: "true" if b else "false"),
        st.text(max_size=30).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
        st.sampled_from(['"../../etc"', '"/"', '""', '"<a>"', "1979-05-27T07:32:00Z", '"\\u0000"', '"~"']),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
        | st.lists(inner, max_size=2).map(lambda xs: "{" + ", ".join(f"k{i} = {x}" for i, x in enumerate(xs)) + "}"),
        max_leaves=6,
    )


UPLOAD_NAMES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "../../../../tmp/pwned.png",
            "/etc/passwd",
            "..\\..\\Windows\\win.ini",
            "C:\\x\\cat.png",
            "a/../../b.png",
            "\x00.png",
            ".",
            "..",
            "",
            "cat.png\x00.txt",
            "\udcff\udcfe.png",  # a non-UTF-8 name, as Python spells undecodable bytes
            "x" * 5000 + ".png",
            "\u202egnp.exe",
            "con.png",
        ]
    ),
)


def reset_folder(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def opcodes_of(data: bytes) -> list[str]:
    """The opcode names of a pickle (for the hostile suite's own checks of what it built)."""
    return [op.name for op, _, _ in _opcodes(data)]


def highest_protocol() -> int:
    return pickle.HIGHEST_PROTOCOL

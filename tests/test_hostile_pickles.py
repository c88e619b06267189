"""The pickle guard attacked the way published bypasses attacked others (issue 31): one hand-built file per technique.

Every file is built here from pickle opcodes (``pickle``'s opcode constants), never from exploit code. Each payload
would create a canary file if any of it ran. For each: ``textinv inspect FILE`` (textinv.cli.main, in this process,
under the fuzz suite's guard, which also fails on any process start or file write) exits 2 with exactly one line on
stderr, no traceback, no warning, and the canary never appears. 46 files, ~8 s in all on 2 CPUs.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fixtures_embeddings as lookalike
from fuzz_harness import guarded
from textinv.cli import main

P = pickle  # opcode constants: P.GLOBAL, P.REDUCE, ...


def text(value: str) -> bytes:
    """SHORT_BINUNICODE (or BINUNICODE past 255 bytes) of ``value``."""
    data = value.encode()
    return (
        P.SHORT_BINUNICODE + bytes([len(data)]) if len(data) < 256 else P.BINUNICODE + struct.pack("<I", len(data))
    ) + data


def glob0(module: str, name: str) -> bytes:
    """A protocol 0-3 GLOBAL opcode."""
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def stack_global(module: str, name: str) -> bytes:
    """A protocol 4+ STACK_GLOBAL from two strings."""
    return text(module) + text(name) + P.STACK_GLOBAL


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` through MARK ... TUPLE, REDUCE."""
    return func + P.MARK + b"".join(args) + P.TUPLE + P.REDUCE


def framed(body: bytes, protocol: int = 4) -> bytes:
    return P.PROTO + bytes([protocol]) + body + P.STOP


def touch(canary: Path) -> str:
    return f"touch {canary}"


def as_token_dict(value: bytes) -> bytes:
    """``{'<w>': value}``: the payload where an embedding's tensor would be."""
    return P.EMPTY_DICT + text("<w>") + value + P.SETITEM


def torch_zip(data_pkl: bytes | None = None, extra: list[tuple[str, bytes]] = (), bad_crc: bool = False) -> bytes:
    """A real torch zip of one token (tests/fixtures_embeddings.py), its data.pkl replaced by ``data_pkl``."""
    out = io.BytesIO()
    real = zipfile.ZipFile(io.BytesIO(lookalike.torch_save_bytes({"<w>": torch.ones(1, 4)})))
    with real, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for info in real.infolist():
            body = real.read(info)
            archive.writestr(
                info.filename, data_pkl if data_pkl is not None and info.filename.endswith("data.pkl") else body
            )
        for name, body in extra:
            archive.writestr(name, body)
    data = out.getvalue()
    if bad_crc:  # CVE-2025-10156: a wrong CRC made picklescan skip the archive while torch still read it
        at = data.index(b"PK\x01\x02") + 16  # the central directory's CRC of the first member (data.pkl)
        data = data[:at] + bytes(4) + data[at + 4 :]
        data = data[:14] + bytes(4) + data[18:]  # and its local header's
    return data


# Each case: (file suffix, builder of the file's bytes from the canary path, text the one-line refusal must hold).
Builder = Callable[[Path], bytes]
CASES: dict[str, tuple[str, Builder, str]] = {
    # REDUCE straight to code (the textbook payloads; fickling's and picklescan's unsafe-globals lists).
    "reduce-os-system": (
        ".pdparams",
        lambda c: framed(call(stack_global("os", "system"), text(touch(c)))),
        "os.system",
    ),
    "reduce-posix-system": (
        ".pdparams",
        lambda c: framed(call(glob0("posix", "system"), text(touch(c))), 2),
        "posix.system",
    ),
    "reduce-subprocess": (
        ".pdparams",
        lambda c: framed(
            call(stack_global("subprocess", "check_call"), P.MARK + text("touch") + text(str(c)) + P.LIST)
        ),
        "subprocess.check_call",
    ),
    "reduce-eval": (
        ".pdparams",
        lambda c: framed(call(stack_global("builtins", "eval"), text(f"open({str(c)!r}, 'w')"))),
        "builtins.eval",
    ),
    "reduce-exec": (
        ".pdparams",
        lambda c: framed(call(stack_global("builtins", "exec"), text(f"open({str(c)!r}, 'w')"))),
        "builtins.exec",
    ),
    "reduce-import": (
        ".pdparams",
        lambda c: framed(call(stack_global("builtins", "__import__"), text("os"))),
        "builtins.__import__",
    ),
    # builtins.getattr(builtins.__import__('os'), 'system')(cmd): a chain of allowed-looking builtins.
    "getattr-chain": (
        ".pdparams",
        lambda c: framed(
            call(
                call(
                    stack_global("builtins", "getattr"),
                    call(stack_global("builtins", "__import__"), text("os")),
                    text("system"),
                ),
                text(touch(c)),
            )
        ),
        "builtins.getattr",
    ),
    # Globals smuggled through allowed modules: numpy.__builtins__ (protectai/modelscan#89, #330), numpy's runstring
    # (picklescan PR #40's additions), collections' and copyreg's internals, torch._utils in a raw pickle.
    "numpy-builtins": (
        ".pdparams",
        lambda c: framed(
            call(
                call(stack_global("builtins", "dict.get"), stack_global("numpy", "__builtins__"), text("exec")),
                text(f"open({str(c)!r}, 'w')"),
            )
        ),
        "builtins.dict.get",
    ),
    "numpy-runstring": (
        ".pdparams",
        lambda c: framed(
            call(
                stack_global("numpy.testing._private.utils", "runstring"), text(f"open({str(c)!r}, 'w')"), P.EMPTY_DICT
            )
        ),
        "numpy.testing._private.utils.runstring",
    ),
    "collections-internals": (
        ".pdparams",
        lambda c: framed(call(stack_global("collections", "_sys.modules.get"), text("os"))),
        "collections._sys.modules.get",
    ),
    "copyreg-reconstructor": (
        ".pdparams",
        lambda c: framed(
            call(stack_global("copyreg", "_reconstructor"), stack_global("os", "system"), text("x"), text(touch(c)))
        ),
        "copyreg._reconstructor",
    ),
    "torch-utils-in-raw-pickle": (
        ".pdparams",
        lambda c: framed(call(stack_global("torch._utils", "_rebuild_tensor_v2"), P.NONE)),
        "torch._utils._rebuild_tensor_v2",
    ),
    # In a torch zip, torch's weights-only unpickler decides: _rebuild_from_type_v2 calls its first argument.
    "torch-rebuild-from-type": (
        ".bin",
        lambda c: torch_zip(
            framed(
                call(
                    glob0("torch._tensor", "_rebuild_from_type_v2"),
                    glob0("os", "system"),
                    P.NONE,
                    P.MARK + text(touch(c)) + P.TUPLE,
                    P.EMPTY_DICT,
                ),
                2,
            )
        ),
        "os.system",
    ),
    # Object arrays and allow_pickle paths: a numpy object dtype; numpy.load(allow_pickle=True) of a .npy.
    "numpy-object-array": (
        ".pdparams",
        lambda c: framed(as_token_dict(call(stack_global("numpy", "dtype"), text("O"), P.NEWFALSE, P.NEWTRUE))),
        "numpy object dtype object",
    ),
    "numpy-load-allow-pickle": (
        ".pdparams",
        lambda c: framed(call(stack_global("numpy", "load"), text(str(c) + ".npy"), P.NONE, P.NEWTRUE)),
        "numpy.load",
    ),
    "npy-member-in-torch-zip": (
        ".bin",
        lambda c: torch_zip(
            framed(call(glob0("numpy", "load"), text("archive/data/x.npy"), P.NONE, P.NEWTRUE), 2),
            [("archive/data/x.npy", npy_object_array(c))],
        ),
        "numpy.load",
    ),
    # Nested: the payload deep inside the structure, and a pickle that unpickles another.
    "nested-deep": (
        ".pdparams",
        lambda c: framed(
            as_token_dict(P.EMPTY_LIST * 50 + call(stack_global("os", "system"), text(touch(c))) + P.APPEND * 50)
        ),
        "os.system",
    ),
    "nested-pickle-loads": (
        ".pdparams",
        lambda c: framed(call(stack_global("pickle", "loads"), P.SHORT_BINBYTES + b"\x00")),
        "pickle.loads",
    ),
    # Memory and recursion bombs.
    "bytes-from-a-count": (
        ".pdparams",
        lambda c: framed(
            as_token_dict(call(stack_global("builtins", "bytes"), P.BININT + struct.pack("<i", 2**31 - 1)))
        ),
        "bytes() of a int",
    ),
    "ndarray-shape-bomb": (
        ".pdparams",
        lambda c: framed(
            as_token_dict(
                call(
                    stack_global("numpy.core.multiarray", "_reconstruct"),
                    stack_global("numpy", "ndarray"),
                    P.MARK + P.LONG1 + b"\x05\x00\x00\x00\x00\x04" + P.TUPLE,
                    text("b"),
                )
            )
        ),
        "numpy _reconstruct",
    ),
    "forged-length": (".pdparams", lambda c: framed(P.BINBYTES8 + struct.pack("<Q", 2**62)), "truncated or corrupt"),
    "recursion-bomb": (
        ".pdparams",
        lambda c: framed(P.EMPTY_LIST * 200_000 + P.APPEND * 199_999),
        "holds over 100,000 pickle operations",
    ),
    "torch-recursion-bomb": (
        ".bin",
        lambda c: torch_zip(framed(P.EMPTY_LIST * 100_000 + P.APPEND * 99_999, 2)),
        "holds a list",
    ),
    # Zip archives: zip-slip member names (nothing is extracted), a member claiming 300 MB, a bad CRC with a payload.
    "zip-slip": (".bin", lambda c: torch_zip(None, [(f"../../{c.name}", b"x"), (str(c), b"x")]), "outside its archive"),
    "oversize-member": (".bin", lambda c: oversize_zip(), "unpacks to over 256 MiB"),
    "bad-crc-with-payload": (
        ".bin",
        lambda c: torch_zip(framed(call(glob0("os", "system"), text(touch(c))), 2), bad_crc=True),
        "(os.system)",
    ),
    # protectai/modelscan#85: BUILD sets attributes on an allowed global, then a dotted STACK_GLOBAL reads them.
    "build-on-allowed-global": (
        ".pdparams",
        lambda c: framed(
            stack_global("collections", "OrderedDict")
            + P.NONE
            + P.MARK
            + text("a")
            + text("os")
            + P.DICT
            + P.TUPLE2
            + P.BUILD
            + P.POP
            + call(stack_global("collections", "OrderedDict.a"), text(touch(c)))
        ),
        "BUILD on a type",
    ),
    "dotted-stack-global": (
        ".pdparams",
        lambda c: framed(call(stack_global("numpy", "dtype.__globals__"), P.NONE)),
        "numpy.dtype.__globals__",
    ),
    # mmaitre314/picklescan#14: BINPUT and MEMOIZE mixed so a scanner's memo differs from the real one.
    "memo-confusion": (
        ".pdparams",
        lambda c: framed(
            text("os")
            + P.BINPUT
            + b"\x00"
            + text("system")
            + P.BINPUT
            + b"\x01"
            + text("torch._utils")
            + P.MEMOIZE
            + text("_rebuild_tensor_v2")
            + P.MEMOIZE
            + P.POP * 4
            + P.BINGET
            + b"\x00"
            + P.BINGET
            + b"\x01"
            + P.STACK_GLOBAL
            + P.MARK
            + text(touch(c))
            + P.TUPLE
            + P.REDUCE
        ),
        "os.system",
    ),
    # Gadgets that call what they are given (fickling's list, trailofbits/fickling#190).
    "operator-methodcaller": (
        ".pdparams",
        lambda c: framed(call(stack_global("operator", "methodcaller"), text("system"), text(touch(c)))),
        "operator.methodcaller",
    ),
    "functools-partial": (
        ".pdparams",
        lambda c: framed(call(stack_global("functools", "partial"), stack_global("os", "system"), text(touch(c)))),
        "functools.partial",
    ),
    "importlib": (
        ".pdparams",
        lambda c: framed(call(stack_global("importlib", "import_module"), text("os"))),
        "importlib.import_module",
    ),
    "marshal-code": (
        ".pdparams",
        lambda c: framed(call(stack_global("marshal", "loads"), P.SHORT_BINBYTES + b"\x01\x00")),
        "marshal.loads",
    ),
    "copyreg-extension": (
        ".pdparams",
        lambda c: framed(P.EXT1 + b"\x01" + text(touch(c)) + P.TUPLE1 + P.REDUCE),
        "an extension code",
    ),
    # CVE-2025-1716: pip.main as the callable (picklescan allowed it); CVE-2025-10157: a submodule of a module a
    # list names (asyncio's); CVE-2025-10155: a protocol-0 pickle named .bin/.pt, which scanners skipped by name.
    "cve-2025-1716-pip-main": (
        ".pdparams",
        lambda c: framed(call(stack_global("pip", "main"), P.MARK + text("--version") + P.LIST)),
        "pip.main",
    ),
    "cve-2025-10157-submodule": (
        ".pdparams",
        lambda c: framed(call(stack_global("asyncio.unix_events", "_UnixSubprocessTransport"), P.NONE)),
        "asyncio.unix_events._UnixSubprocessTransport",
    ),
    "cve-2025-10155-protocol-0-bin": (
        ".bin",
        lambda c: b"cos\nsystem\n(V" + touch(c).encode() + b"\ntR.",
        "is a text file",
    ),
    "cve-2025-10155-protocol-0-pt": (
        ".pt",
        lambda c: b"(cos\nsystem\nV" + touch(c).encode() + b"\no.",
        "is a text file",
    ),
    # CVE-2025-32434 (torch <= 2.5.1 weights_only bypass): torch's legacy (pre-zip) format, whose later pickles
    # torch reads; the payload sits in them.
    "cve-2025-32434-legacy-format": (".pt", lambda c: legacy_torch_file(c), "posix.system"),
    "protocol-88": (".bin", lambda c: torch_zip(b"\x80\x58" + lookalike_pickle()[2:]), "protocol 88"),
}
# Protocol variants of the textbook payload: 0 and 1 (no PROTO: not taken for a pickle at all), 2-5.
for _protocol in range(6):
    CASES[f"os-system-protocol-{_protocol}"] = (
        ".pdparams",
        (lambda c, p=_protocol: pickle_of_call(p, c)),
        "(posix.system)" if _protocol >= 2 else "is a text file",  # os.system pickles as posix.system
    )


class _Call:
    """An object whose pickle is ``os.system(cmd)`` at any protocol (built by pickle itself, not run here)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (self.command,)


def pickle_of_call(protocol: int, canary: Path) -> bytes:
    return pickle.dumps({"<w>": _Call(touch(canary))}, protocol=protocol)


def lookalike_pickle() -> bytes:
    """A real torch data.pkl (protocol 2) of one token."""
    with zipfile.ZipFile(io.BytesIO(lookalike.torch_save_bytes({"<w>": torch.ones(1, 4)}))) as archive:
        return archive.read("archive/data.pkl")


def npy_object_array(canary: Path) -> bytes:
    """A .npy of an object array whose pickle would run the payload (numpy.load(allow_pickle=True) would)."""
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + pickle_of_call(2, canary)


def oversize_zip() -> bytes:
    """A torch zip whose last member's central directory entry says it unpacks to 300 MB."""
    data = torch_zip(None, [("archive/data/1", b"\x00" * 16)])
    at = data.rindex(b"PK\x01\x02")  # the central header of archive/data/1; its uncompressed size is at +24
    return data[: at + 24] + struct.pack("<I", 300 * 2**20) + data[at + 28 :]


def legacy_torch_file(canary: Path) -> bytes:
    """torch's legacy format: magic number, protocol version, sys info, then the object's pickle (the payload)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    parts = [pickle.dumps(MAGIC_NUMBER, 2), pickle.dumps(PROTOCOL_VERSION, 2), pickle.dumps({"little_endian": True}, 2)]
    return b"".join(parts) + pickle_of_call(2, canary)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hostile_file_is_refused_in_one_line_and_runs_nothing(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix, build, expected = CASES[name]
    canary = tmp_path / "canary"
    path = tmp_path / f"hostile{suffix}"
    path.write_bytes(build(canary))
    with guarded(None):  # fails on a process start, a file written, a warning shown, 2 s CPU or 1 GiB
        code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("textinv: error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert not canary.exists() and not (tmp_path.parent / canary.name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing extracted or written beside it

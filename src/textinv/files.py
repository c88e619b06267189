"""Writing files so that a crash never leaves a half-written one, and never clobbering a run.

Every writer in textinv goes through :func:`atomic_write` (a file) or :func:`atomic_dir`
(a directory): the content is written beside the target under a temporary name, flushed
to disk, then renamed over the target in one step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from textinv.config import UserError

# Files whose presence means a directory holds a textinv (or diffusers/ppdiffusers) run's results.
RUN_MARKERS = (
    "run.json",
    "learned_embeds.safetensors",
    "learned_embeds.bin",
    "learned_embeds.pdparams",
    "model_index.json",
)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _give_usual_permissions(path: Path, mode: int, umask: Optional[int] = None) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; results get what open()/mkdir() would give."""
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~(_current_umask() if umask is None else umask))


def _give_tree_usual_permissions(root: Path) -> None:
    """What a folder's writers made private (safetensors: 0600) or copied from elsewhere gets the umask's modes."""
    umask = _current_umask()
    _give_usual_permissions(root, 0o777, umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            _give_usual_permissions(Path(folder) / name, 0o777, umask)
        for name in files:
            _give_usual_permissions(Path(folder) / name, 0o666, umask)


def atomic_write(target: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename tmp_path to ``target``.

    On any error the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # After the writer: some replace the file with their own private one (safetensors' save_file does).
        _give_usual_permissions(tmp, 0o666)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(error, target)
        raise
    _fsync_dir(target.parent)
    return target


# Below this many free bytes, a writer's failure is taken to be the full disk.
DISK_NEARLY_FULL_BYTES = 1 << 20


def _raise_if_disk_full(error: BaseException, target: Path) -> None:
    """Re-raise a full disk as ``OSError(ENOSPC)``, whatever the writer made of it.

    safetensors and torch.save report a failed write as their own exception types (without errno);
    the CLI turns ENOSPC into one clear line instead of an internal error.
    """
    if isinstance(error, OSError) or not isinstance(error, Exception):
        return
    text = str(error)
    said_so = "No space left on device" in text or "os error 28" in text
    try:
        nearly_full = shutil.disk_usage(target.parent).free < DISK_NEARLY_FULL_BYTES
    except OSError:
        nearly_full = False
    if said_so or nearly_full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from error


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(target: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target`` whole.

    An existing ``target`` is moved aside first and deleted only after the new one is in place,
    so at every moment one complete version exists on disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(error, target)
        raise
    _give_tree_usual_permissions(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def unique_path(path: Path) -> Path:
    """``path`` if it is free, else ``stem-2.suffix``, ``stem-3.suffix``... (never overwrite)."""
    if not path.exists():
        return path
    counter = 2
    while True:
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        if not candidate.exists():
            return candidate
        counter += 1


def check_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` if needed and prove we can write in it, or raise UserError."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file, not a directory; give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".textinv-write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(
            f"{flag} {str(path)!r} is not writable ({error.strerror or error}); choose a directory you can write to"
        ) from None


def previous_run_markers(output_dir: Path) -> list[str]:
    """Names of files in ``output_dir`` that show it holds another run's results."""
    if not output_dir.is_dir():
        return []
    found = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    found += sorted(p.name for p in output_dir.glob("learned_embeds-steps-*"))[:3]
    checkpoints = [
        p.parent for p in output_dir.glob("checkpoint-*/state.pt") if p.parent.name[len("checkpoint-") :].isdigit()
    ]
    found += [p.name for p in sorted(checkpoints, key=lambda p: int(p.name[len("checkpoint-") :]))][:2]
    return found


def refuse_another_runs_results(output_dir: Path, overwrite: bool) -> list[str]:
    """The names that show ``output_dir`` holds another run's results; a UserError unless ``overwrite``.

    Needs nothing but the folder, so the CLI checks it before importing torch (and training again).
    """
    markers = previous_run_markers(output_dir)
    if markers and not overwrite:
        # Resuming needs a checkpoint: suggest it only when there is one (a finished run without any has none).
        resume = any(output_dir.glob("checkpoint-*/state.pt"))
        continue_it = "pass --resume_from_checkpoint latest to continue it, " if resume else ""
        raise UserError(
            f"--output_dir {str(output_dir)!r} already holds another run's results ({', '.join(markers)}); "
            f"choose a new --output_dir, {continue_it}or --overwrite_output_dir to replace it"
        )
    return markers

"""Atomic writes: a failed write leaves the old file whole; results get the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from textinv.files import atomic_dir, atomic_write, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "run.json", "old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("ne")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_failed_directory_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "unet"
    with atomic_dir(target) as folder:
        (folder / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as folder:
        (folder / "weights").write_text("v2 partial")
        raise RuntimeError("disk went away")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_results_get_the_permissions_the_umask_gives(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "learned.txt", "x")
        with atomic_dir(tmp_path / "text_encoder") as folder:
            (folder / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert _mode(written) == 0o666 & ~umask
    assert _mode(tmp_path / "text_encoder") == 0o777 & ~umask

"""Where the reference scripts and the Paddle venv are, and Paddle-format copies of diffusers pipelines.

Shared by bench/reference_scripts.py and the tests that run real ppdiffusers (tests/conftest.py imports it):

- the reference scripts (../shared/reference beside the clone, or $TEXTINV_REFERENCE_DIR): ppdiffusers' and diffusers'
  textual-inversion training scripts, unmodified, each with a SOURCE.md saying how it runs offline;
- the Paddle venv `make paddle-venv` builds (or $TEXTINV_PADDLE_PYTHON);
- ``paddle_format_copy``: a diffusers folder converted once to ppdiffusers' own weights, the way the seed's script
  reads it (ppdiffusers' SOURCE.md: ``StableDiffusionPipeline.from_pretrained(folder, from_diffusers=True)
  .save_pretrained(paddle_folder)``, after the tokenizer and text encoder are written in the Hub's layout).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
REFERENCE_ENV = "TEXTINV_REFERENCE_DIR"
PYTHON_ENV = "TEXTINV_PADDLE_PYTHON"
# The files the Makefile's paddle-venv target hashes to name the venv's folder (keep the two in step).
PADDLE_PINS = (REPO / "tests" / "paddle-requirements.txt", REPO / "tests" / "paddle-constraints.txt")
COMPLETE_MARKER = ".textinv-complete"
SEED_SCRIPT = Path("ppdiffusers") / "train_textual_inversion.py"
DIFFUSERS_SCRIPT = Path("diffusers") / "textual_inversion.py"
# What the Paddle venv's python needs to start offline and without our venv's packages (they conflict).
PADDLE_ENV_REMOVE = ("PYTHONPATH",)
PADDLE_ENV_SET = {"HF_HUB_OFFLINE": "1", "AISTUDIO_BOS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}


def reference_dir() -> tuple[Optional[Path], str]:
    """(the folder of reference scripts or None, why there is none): $TEXTINV_REFERENCE_DIR, else ../shared/reference."""
    value = os.environ.get(REFERENCE_ENV, "").strip()
    if value:
        folder = Path(value).expanduser()
        if (folder / SEED_SCRIPT).is_file():
            return folder, ""
        return None, f"{REFERENCE_ENV}={value} does not hold {SEED_SCRIPT}"
    beside = REPO.parent / "shared" / "reference"
    if (beside / SEED_SCRIPT).is_file():
        return beside, ""
    return None, (
        f"the reference scripts are not here: set {REFERENCE_ENV} to a folder holding {SEED_SCRIPT} and "
        f"{DIFFUSERS_SCRIPT} (each with its SOURCE.md), or put one at {beside}"
    )


def paddle_venv_dir() -> Path:
    """Where `make paddle-venv` builds the venv: ${XDG_CACHE_HOME:-~/.cache}/textinv/paddle-venv-<hash>."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in PADDLE_PINS)).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "textinv" / f"paddle-venv-{digest}"


def find_paddle_python() -> tuple[Optional[Path], str]:
    """(the Paddle venv's python or None, why there is none)."""
    given = os.environ.get(PYTHON_ENV, "").strip()
    if given:
        python = Path(given).expanduser()
        return (python, "") if python.is_file() else (None, f"{PYTHON_ENV}={given} is not a file")
    venv = paddle_venv_dir()
    if (venv / COMPLETE_MARKER).is_file():
        return venv / "bin" / "python", ""
    return None, f"no Paddle venv at {venv}: run `make paddle-venv` (or set {PYTHON_ENV})"


def paddle_environment(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment the Paddle venv's python runs in: offline, nothing of our venv on its path."""
    environment = {k: v for k, v in (os.environ if base is None else base).items() if k not in PADDLE_ENV_REMOVE}
    environment.update(PADDLE_ENV_SET)
    return environment


def write_hub_layout(model: Path, destination: Path) -> Path:
    """``model`` in the layout of Stable Diffusion checkpoints on the Hub, which ppdiffusers reads: textinv's tiny
    builder writes transformers 5's (no vocab.json/merges.txt, no ``text_model.`` key prefix). The tokenizer and the
    text encoder are rewritten; the other parts are symbolic links to ``model``'s (a 4 GB UNet is not copied)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from textinv.training.paddle_layout import save_text_encoder, save_tokenizer

    destination.mkdir(parents=True)
    for part in sorted(model.iterdir()):
        if part.name not in ("tokenizer", "text_encoder"):
            (destination / part.name).symlink_to(part.resolve(), target_is_directory=part.is_dir())
    save_tokenizer(CLIPTokenizer.from_pretrained(model / "tokenizer"), destination / "tokenizer")
    save_text_encoder(CLIPTextModel.from_pretrained(model / "text_encoder"), destination / "text_encoder")
    return destination


def folder_key(model: Path) -> str:
    """A short hash of a pipeline folder: every file's path, size and modification time, and the Paddle pins (a
    rebuilt model or a new Paddle means a new copy). Reading 4 GB of weights to hash them would cost more than the
    check is worth."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in PADDLE_PINS))
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


CONVERT = (
    "import sys\n"
    "from ppdiffusers import StableDiffusionPipeline\n"
    "StableDiffusionPipeline.from_pretrained(sys.argv[1], from_diffusers=True).save_pretrained(sys.argv[2])\n"
)


def convert_to_paddle(model: Path, destination: Path, paddle_python: Path, timeout: float = 3600) -> Path:
    """Write ``model`` (a diffusers SD1 folder) into ``destination`` with ppdiffusers' own weights (a new folder)."""
    staging = destination.parent / f".{destination.name}.hub-layout"
    partial = destination.parent / f".{destination.name}.partial"
    for leftover in (staging, partial):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write_hub_layout(model, staging)
        command = [str(paddle_python), "-c", CONVERT, str(staging), str(partial)]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=paddle_environment(), cwd=destination.parent
        )
        if completed.returncode != 0:
            raise RuntimeError(f"converting {model} to Paddle's format failed:\n{completed.stderr[-3000:]}")
        (partial / COMPLETE_MARKER).write_text(f"converted from {model}\n", encoding="utf-8")
        partial.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    return destination


def paddle_format_copy(model: Path, paddle_python: Path) -> Path:
    """The Paddle-format copy of ``model`` cached beside it (``<model>-paddle-<folder_key>``), converted once."""
    destination = model.parent / f"{model.name}-paddle-{folder_key(model)}"
    if (destination / COMPLETE_MARKER).is_file():
        return destination
    shutil.rmtree(destination, ignore_errors=True)  # an older, incomplete attempt
    return convert_to_paddle(model, destination, paddle_python)

"""Shared fixtures: a tiny SD1 pipeline (seeded random weights, real CLIP vocabulary) and images.

The suite needs nothing beside the clone: the third-party files it reads are committed under
tests/data/ or written by tests/fixtures_embeddings.py. Only tests marked ``interop`` read the real
third-party originals, from an optional folder (see INTEROP_ENV below).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# textinv picks torch's CPU thread count from the cores other jobs leave free (textinv.cpu_threads); the tests compare
# runs bit for bit, and a count that follows the machine's load would make them differ. So they pin it, for this
# process and every one it starts: OMP_NUM_THREADS when the caller set it, else one thread per usable core (torch's
# own default, what the suite ran with before).
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))

REPO = Path(__file__).resolve().parents[1]

# Third-party files the repository may carry (licences in tests/data/ATTRIBUTION.md), laid out like
# the team's ../shared/data: embeddings/, images/style_vangogh/.
TEST_DATA = REPO / "tests" / "data"
SHARED_DATA = TEST_DATA  # the name tests/test_eval.py imports

# --- interop: the real third-party files that may not be committed --------------------------------
# Tests marked `interop` read the originals (bad-hands-5.pt, EasyNegative.pt, test_embedding.png, ...)
# from TEXTINV_INTEROP_DATA (a folder laid out like ../shared/data, i.e. holding embeddings/) or from
# ../shared/data beside the clone. Without either they skip, saying why; with
# TEXTINV_REQUIRE_INTEROP=1 (set in CI) a missing folder fails them instead, so they cannot vanish.
INTEROP_ENV = "TEXTINV_INTEROP_DATA"
REQUIRE_INTEROP_ENV = "TEXTINV_REQUIRE_INTEROP"


def _interop_data() -> tuple[Optional[Path], str]:
    """(the folder of third-party originals or None, why there is none)."""
    value = os.environ.get(INTEROP_ENV, "").strip()
    if value:
        folder = Path(value).expanduser()
        if folder.is_dir():
            return folder, ""
        return None, f"{INTEROP_ENV}={value} is not a folder"
    beside = REPO.parent / "shared" / "data"
    if beside.is_dir():
        return beside, ""
    return None, (
        f"the third-party originals are not here: set {INTEROP_ENV} to a folder laid out like "
        f"../shared/data (holding embeddings/), or put one at {beside}"
    )


INTEROP_DATA, _NO_INTEROP_REASON = _interop_data()


def _skip_or_fail_without_interop_data() -> None:
    if INTEROP_DATA is not None:
        return
    if os.environ.get(REQUIRE_INTEROP_ENV, "").strip() == "1":
        pytest.fail(f"interop test cannot run: {_NO_INTEROP_REASON} ({REQUIRE_INTEROP_ENV}=1)", pytrace=False)
    pytest.skip(f"interop: {_NO_INTEROP_REASON}")


def pytest_report_header(config: pytest.Config) -> str:
    return f"interop data: {INTEROP_DATA}" if INTEROP_DATA else f"interop data: none ({_NO_INTEROP_REASON})"


# --- interop(needs="paddle"): real ppdiffusers in the Paddle venv, and the reference training scripts -----------
# bench/reference_env.py finds both (the benches need them too): the venv `make paddle-venv` builds (or
# $TEXTINV_PADDLE_PYTHON), and the reference scripts in $TEXTINV_REFERENCE_DIR or ../shared/reference beside the clone.
# Without them the tests that need them skip, saying how to get them; with TEXTINV_REQUIRE_INTEROP=1 (CI) they fail.
sys.path.append(str(REPO / "bench"))  # appended: nothing in bench/ shadows a module the tests import
import reference_env  # noqa: E402


def _skip_or_fail(what: str, why: str) -> None:
    if os.environ.get(REQUIRE_INTEROP_ENV, "").strip() == "1":
        pytest.fail(f"{what} cannot run: {why} ({REQUIRE_INTEROP_ENV}=1)", pytrace=False)
    pytest.skip(f"{what}: {why}")


@pytest.fixture(scope="session")
def paddle_python() -> Path:
    """The Paddle venv's python (PaddlePaddle + ppdiffusers, tests/paddle-requirements.txt)."""
    python, why = reference_env.find_paddle_python()
    if python is None:
        _skip_or_fail("ppdiffusers interop", why)
    assert python is not None
    return python


@pytest.fixture(scope="session")
def reference_scripts() -> Path:
    """The folder of reference training scripts (ppdiffusers/ and diffusers/, each with its SOURCE.md)."""
    folder, why = reference_env.reference_dir()
    if folder is None:
        _skip_or_fail("reference scripts", why)
    assert folder is not None
    return folder


@pytest.fixture(scope="session")
def ppdiffusers_base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base in the layout of Stable Diffusion checkpoints on the Hub, which ppdiffusers reads (PyTorch
    weights, loaded with ``from_diffusers=True``): reference_env.write_hub_layout."""
    return reference_env.write_hub_layout(tiny_model, tmp_path_factory.mktemp("ppd-base") / "tiny-sd1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # `interop(needs="paddle")` (tests/test_ppdiffusers.py) needs the Paddle venv, not these files: it checks its own.
    marker = item.get_closest_marker("interop")
    if marker is not None and marker.kwargs.get("needs", "data") == "data":
        _skip_or_fail_without_interop_data()


@pytest.fixture(scope="session")
def interop_data() -> Path:
    """The folder of third-party originals (its embeddings/ holds the files SOURCES.md lists)."""
    _skip_or_fail_without_interop_data()
    assert INTEROP_DATA is not None
    return INTEROP_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from textinv.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1", seed=0)


@pytest.fixture(scope="session")
def train_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three of the demo images, shrunk to 96 px so decoding costs nothing."""
    from textinv.tiny import demo_images_dir

    folder = tmp_path_factory.mktemp("images")
    for source in sorted(demo_images_dir().glob("*.jpg"))[:3]:
        with Image.open(source) as image:
            image.convert("RGB").resize((96, 96)).save(folder / f"{source.stem}.png")
    return folder


def train_config(model: Path, images: Path, output_dir: Path, **overrides):
    """A fast training config on the tiny pipeline (64 px, batch 1)."""
    from textinv.config import TrainConfig

    values = dict(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(images),
        placeholder_token="<cat-toy>",
        initializer_token="toy",
        resolution=64,
        train_batch_size=1,
        max_train_steps=20,
        learning_rate=5e-3,
        lr_scheduler="constant",  # the tests' runs keep one rate (textinv's default decays it: cosine)
        lr_warmup_steps=0,
        seed=42,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def same_vectors(actual, expected, mixed_precision: str = "no") -> bool:
    """Two runs' vectors agree: bit-identical on the CPU (same thread count), within
    textinv.models.precision.vector_tolerance on CUDA, where some kernels are nondeterministic."""
    import torch

    from textinv.models.precision import vector_tolerance, vectors_agree

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return vectors_agree(actual, expected, vector_tolerance(device, mixed_precision))


def sigint_on_loss_call(monkeypatch, call_number: int) -> None:
    """Deliver a real SIGINT while the call_number-th micro-batch loss is being computed (an interrupted run)."""
    import signal

    from textinv.training import loss as loss_module
    from textinv.training import recipe

    # A background job of a non-interactive shell (`cmd &` in a script) starts with SIGINT ignored, and textinv then
    # leaves it ignored (stopping.stop_on_signals): give the test the SIGINT an interactive user has.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    real = loss_module.denoising_loss
    calls = {"count": 0}

    def loss_with_signal(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == call_number:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "denoising_loss", loss_with_signal)


def read_terminal(
    command: list[str], env: dict[str, str], rows: int = 40, columns: int = 160, timeout: float = 600
) -> str:
    """Run ``command`` with stdout and stderr on a pseudo-terminal of that size (default 160 x 40); all it wrote."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(command, stdout=follower, stderr=follower, env=env, cwd=REPO)
    os.close(follower)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    assert process.returncode == 0, b"".join(chunks)[-3000:]
    return b"".join(chunks).decode("utf-8", "replace")


def train_args(model: Path, images: Path, output_dir: Path, *extra: str) -> list[str]:
    """``textinv train`` arguments for a fast run on the tiny pipeline (64 px, batch 1, 3 steps), plus ``extra``."""
    return [
        "train",
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}",
        "--placeholder_token=<cat-toy>",
        "--initializer_token=toy",
        "--resolution=64",
        "--train_batch_size=1",
        "--max_train_steps=3",
        "--seed=1",
        f"--output_dir={output_dir}",
        *extra,
    ]

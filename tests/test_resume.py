"""Never lose a run: exact resume, signals, divergence, kill -9, checkpoint limits."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import textinv
from conftest import REPO, same_vectors, sigint_on_loss_call, train_config
from textinv.config import TrainingInterrupted, UserError
from textinv.training import stopping
from textinv.training.checkpoints import list_checkpoints, read_checkpoint

# 3 images x 2 repeats = 6 examples an epoch; batch 1 x accumulation 2 = 2 examples a step,
# so epochs end after steps 3, 6, ...; a cosine schedule with warm-up makes the LR state matter.
RESUME_SETTINGS = dict(
    max_train_steps=8,
    gradient_accumulation_steps=2,
    repeats=2,
    lr_scheduler="cosine",
    lr_warmup_steps=2,
    only_save_embeds=True,
    checkpointing_steps=100,
    seed=11,
)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model: Path, train_images: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    config = train_config(tiny_model, train_images, tmp_path_factory.mktemp("full") / "out", **RESUME_SETTINGS)
    return textinv.train(config, show_progress=False).embedding.vectors["text_encoder"]


@pytest.mark.parametrize(
    "loss_call, stopped_after",
    [
        (3, 2),  # first micro-batch of step 2: inside an accumulation cycle
        (6, 3),  # last micro-batch of step 3: the step that ends epoch 1
        (11, 6),  # inside step 6's cycle, the step that ends epoch 2
    ],
)
@pytest.mark.slow
def test_exact_resume(
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Path,
    train_images: Path,
    tmp_path: Path,
    uninterrupted: torch.Tensor,
    loss_call: int,
    stopped_after: int,
) -> None:
    config = train_config(tiny_model, train_images, tmp_path / "out", **RESUME_SETTINGS)
    sigint_on_loss_call(monkeypatch, loss_call)
    # Whatever the launcher left (pytest: default_int_handler; a background job: SIG_IGN).
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        textinv.train(config, show_progress=False)
    assert stopped.value.step == stopped_after and stopped.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler_before, "the handler must be restored"
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == [f"checkpoint-{stopped_after}"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()

    resumed_config = train_config(
        tiny_model, train_images, tmp_path / "out", **{**RESUME_SETTINGS, "seed": None}, resume_from_checkpoint="latest"
    )
    resumed = textinv.train(resumed_config, show_progress=False)
    assert len(resumed.losses) == 8
    assert same_vectors(resumed.embedding.vectors["text_encoder"], uninterrupted)  # bit-identical on the CPU


@pytest.mark.slow
def test_checkpoints_are_complete_and_limited(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    config = train_config(
        tiny_model,
        train_images,
        tmp_path / "out",
        max_train_steps=7,
        checkpointing_steps=2,
        checkpoints_total_limit=2,
        only_save_embeds=True,
    )
    result = textinv.train(config, show_progress=False)
    kept = list_checkpoints(result.output_dir)
    assert [p.name for p in kept] == ["checkpoint-4", "checkpoint-6"]
    state, rng = read_checkpoint(kept[-1])
    assert state.step == 6 and state.vectors.shape == (1, 32) and len(state.losses) == 6
    assert rng is not None and set(rng) >= {"python", "numpy", "torch"}
    snapshot = load_file(str(kept[-1] / "learned_embeds.safetensors"))["<cat-toy>"]
    assert torch.equal(snapshot, state.vectors)
    assert sum(p.stat().st_size for p in kept[-1].iterdir()) < 200_000, "a checkpoint should be tiny"
    assert not [p for p in result.output_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_resume_refuses_another_run(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = dict(max_train_steps=4, checkpointing_steps=2, only_save_embeds=True)
    textinv.train(train_config(tiny_model, train_images, out, **base), show_progress=False)
    with pytest.raises(UserError, match="placeholder_token"):
        textinv.train(
            train_config(
                tiny_model, train_images, out, **base, placeholder_token="<other>", resume_from_checkpoint="latest"
            ),
            show_progress=False,
        )
    other_images = tmp_path / "other-images"
    other_images.mkdir()
    for image in sorted(train_images.iterdir())[:2]:
        (other_images / image.name).write_bytes(image.read_bytes())
    with pytest.raises(UserError, match="training images differ"):
        textinv.train(
            train_config(tiny_model, other_images, out, **base, resume_from_checkpoint="latest"), show_progress=False
        )
    with pytest.raises(UserError, match="--seed 5 differs"):
        textinv.train(
            train_config(tiny_model, train_images, out, **{**base, "seed": 5}, resume_from_checkpoint="latest"),
            show_progress=False,
        )
    with pytest.raises(UserError, match="no checkpoint-N"):
        textinv.train(
            train_config(tiny_model, train_images, tmp_path / "fresh", **base, resume_from_checkpoint="latest"),
            show_progress=False,
        )


@pytest.mark.slow
def test_divergence_stops_and_keeps_last_good_vectors(tiny_model: Path, train_images: Path, tmp_path: Path) -> None:
    config = train_config(
        tiny_model, train_images, tmp_path / "out", learning_rate=1e36, max_train_steps=20, only_save_embeds=True
    )
    with pytest.raises(stopping.TrainingDiverged) as diverged:
        textinv.train(config, show_progress=False)
    message = str(diverged.value)
    assert "at step" in message and "--learning_rate" in message
    saved = load_file(str(tmp_path / "out" / "learned_embeds.safetensors"))["<cat-toy>"]
    assert torch.isfinite(saved).all()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "diverged"


def _train_command(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train_textual_inversion.py"),
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}",
        "--placeholder_token=<cat-toy>",
        "--initializer_token=toy",
        "--resolution=64",
        "--train_batch_size=1",
        "--learning_rate=5e-3",
        "--lr_warmup_steps=0",
        "--seed=3",
        f"--output_dir={out}",
        *extra,
    ]


# A child `textinv train` that gets a real signal while its loss_call-th micro-batch loss is computed (the point
# sigint_on_loss_call picks in-process): SIGKILL ends it there with no handler run, as `kill -9` would.
SIGNAL_AT_LOSS_CALL = """
import signal, sys
from textinv import cli
from textinv.training import recipe
signum, call_number = int(sys.argv[1]), int(sys.argv[2])
real, calls = recipe.denoising_loss, [0]
def loss_with_signal(*args, **kwargs):
    calls[0] += 1
    if calls[0] == call_number:
        signal.raise_signal(signum)
    return real(*args, **kwargs)
recipe.denoising_loss = loss_with_signal
sys.exit(cli.main(sys.argv[3:]))
"""


def _resume_settings_args(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    """`textinv train` flags for RESUME_SETTINGS (the uninterrupted fixture's run) with a checkpoint every step."""
    return [
        "train",
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}",
        "--placeholder_token=<cat-toy>",
        "--initializer_token=toy",
        "--resolution=64",
        "--train_batch_size=1",
        "--learning_rate=5e-3",
        "--max_train_steps=8",
        "--gradient_accumulation_steps=2",
        "--repeats=2",
        "--lr_scheduler=cosine",
        "--lr_warmup_steps=2",
        "--only_save_embeds",
        "--checkpointing_steps=1",
        "--seed=11",
        f"--output_dir={out}",
        *extra,
    ]


@pytest.mark.parametrize(
    "signum, returncode, loss_call, checkpoints",
    [
        # SIGTERM inside step 6's accumulation cycle: textinv finishes the cycle, checkpoints step 6, exits 143.
        (signal.SIGTERM, 143, 11, ["checkpoint-4", "checkpoint-5", "checkpoint-6"]),
        # kill -9 at the same point: no handler runs; step 5's checkpoint (written before) is the last one.
        (signal.SIGKILL, -signal.SIGKILL, 11, ["checkpoint-3", "checkpoint-4", "checkpoint-5"]),
    ],
    ids=["sigterm", "kill-9"],
)
@pytest.mark.slow
def test_a_signalled_process_resumes_bit_identical(
    tiny_model: Path,
    train_images: Path,
    tmp_path: Path,
    uninterrupted: torch.Tensor,
    signum: int,
    returncode: int,
    loss_call: int,
    checkpoints: list[str],
) -> None:
    out = tmp_path / "out"
    args = _resume_settings_args(tiny_model, train_images, out, "--checkpoints_total_limit=3")
    killed = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_LOSS_CALL, str(int(signum)), str(loss_call), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert killed.returncode == returncode, killed.stderr[-2000:]
    assert "Traceback" not in killed.stderr
    if signum == signal.SIGTERM:
        last = killed.stderr.strip().splitlines()[-1]
        assert "SIGTERM" in last and "--resume_from_checkpoint latest" in last, last
    assert [p.name for p in list_checkpoints(out)] == checkpoints
    record = json.loads((out / "run.json").read_text())
    # SIGTERM's handler records the stop; after kill -9 the record still says what it said mid-run.
    assert (record["status"], record.get("steps_done")) == (
        ("interrupted", 6) if signum == signal.SIGTERM else ("running", None)
    )
    finish = subprocess.run(
        [sys.executable, "-m", "textinv.cli", *args, "--resume_from_checkpoint=latest"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["steps_done"] == 8
    resumed = load_file(str(out / "learned_embeds.safetensors"))["<cat-toy>"]
    assert same_vectors(resumed, uninterrupted)  # bit-identical on the CPU, as after SIGINT in-process


def _load_everything(out: Path) -> int:
    """Load every file a killed run left (temporaries excepted); returns how many were checked."""
    checked = 0
    for path in out.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(out).parts) or path.is_dir():
            continue
        if path.suffix == ".safetensors":
            assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".pdparams":  # the root script also writes ppdiffusers' files (issue 15)
            assert all(
                torch.isfinite(e.vectors["text_encoder"]).all() for e in textinv.embeddings.read_embeddings(path)
            ), path
        checked += 1
    return checked


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_every_file_loadable(
    tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rng = random.Random(1234)
    common = [
        "--max_train_steps=400",
        "--checkpointing_steps=1",
        "--save_steps=1",
        "--checkpoints_total_limit=3",
        "--only_save_embeds",
    ]
    checked = 0
    for _attempt in range(10):
        resume = ["--resume_from_checkpoint=latest"] if list_checkpoints(out) else ["--overwrite_output_dir"]
        before = {path.name for path in list_checkpoints(out)}
        process = subprocess.Popen(
            _train_command(tiny_model, train_images, out, *common, *resume), stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            # A new checkpoint means steps are running (a checkpoint every step): kill some time after
            # that, mid-step or mid-write, however long the start-up took on a loaded machine.
            if {path.name for path in list_checkpoints(out)} - before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        process.kill()
        process.wait()
        checked += _load_everything(out)
    assert checked > 20, "the kills came too early to test anything"
    assert list_checkpoints(out), "no checkpoint survived"
    finish = subprocess.run(
        _train_command(
            tiny_model, train_images, out, *common[1:], "--max_train_steps=401", "--resume_from_checkpoint=latest"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr[-2000:]
    _load_everything(out)


def test_a_signal_the_launcher_ignores_stays_ignored() -> None:
    # A background job of a non-interactive shell starts with SIGINT ignored; training must not
    # start reacting to it, while SIGTERM still asks for a checkpointed stop.
    class Run:
        stop_requested = None

    sigterm_before = signal.getsignal(signal.SIGTERM)
    sigint_before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stopping.stop_on_signals(Run()):  # type: ignore[arg-type]
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert callable(signal.getsignal(signal.SIGTERM)) and signal.getsignal(signal.SIGTERM) is not sigterm_before
        assert signal.getsignal(signal.SIGTERM) is sigterm_before
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, sigint_before)

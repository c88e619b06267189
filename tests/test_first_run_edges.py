"""Rough edges of a first run (issue 28), each as the user sees it: the command, what it printed, the exit code and
what was left on disk."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

import textinv
from conftest import train_args, train_config
from textinv.cli import main


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- 1. nothing is created until the run is really starting --------------------------------------------------
@pytest.mark.parametrize("case", ["missing-folder", "empty-folder", "existing-word", "resume-without-checkpoint"])
def test_a_run_that_fails_before_its_first_step_leaves_no_output_folder(
    tiny_model: Path, train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    out = tmp_path / "nested" / "out"
    images, extra = train_images, []
    if case == "missing-folder":
        images = tmp_path / "no-such-folder"
    elif case == "empty-folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "resume-without-checkpoint":
        extra = ["--resume_from_checkpoint=latest"]
    argv = train_args(tiny_model, images, out, *extra)
    if case == "existing-word":
        argv = [arg.replace("<cat-toy>", "toy") for arg in argv]
    assert main(argv) == 2
    expected = {
        "missing-folder": "does not exist",
        "empty-folder": "has no image files",
        "existing-word": "is already in the tokenizer's vocabulary",
        "resume-without-checkpoint": "has no checkpoint-N folder",
    }[case]
    assert expected in _one_error_line(capsys)
    assert not out.parent.exists()  # nested/out: neither folder is left


def test_a_failure_in_a_folder_that_existed_keeps_the_folder_and_its_files(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(train_args(tiny_model, tmp_path / "no-such-folder", out)) == 2
    assert [path.name for path in out.iterdir()] == ["notes.txt"]


# --- 2. hints that lead somewhere ------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_is_suggested_only_where_there_is_a_checkpoint_and_a_missing_one_lists_what_there_is(
    tiny_model: Path, train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    finished = tmp_path / "finished"
    textinv.train(
        train_config(
            tiny_model, train_images, finished, max_train_steps=2, only_save_embeds=True, eval_steps=0, report_to="none"
        ),
        show_progress=False,
    )
    assert main(train_args(tiny_model, train_images, finished)) == 2
    line = _one_error_line(capsys)
    assert "already holds another run's results" in line and "--resume_from_checkpoint" not in line
    assert line.endswith("choose a new --output_dir, or --overwrite_output_dir to replace it")

    stopped = tmp_path / "with-checkpoints"
    textinv.train(
        train_config(
            tiny_model,
            train_images,
            stopped,
            max_train_steps=4,
            checkpointing_steps=2,
            only_save_embeds=True,
            eval_steps=0,
            report_to="none",
        ),
        show_progress=False,
    )
    assert main(train_args(tiny_model, train_images, stopped)) == 2
    assert "pass --resume_from_checkpoint latest to continue it" in _one_error_line(capsys)

    assert main(train_args(tiny_model, train_images, stopped, "--resume_from_checkpoint=checkpoint-999")) == 2
    assert _one_error_line(capsys) == (
        f"textinv: error: --resume_from_checkpoint 'checkpoint-999' does not exist; {str(stopped)!r} has "
        "checkpoint-2 (or give 'latest')"
    )
    assert main(train_args(tiny_model, train_images, finished, "--resume_from_checkpoint=checkpoint-1")) == 2
    assert _one_error_line(capsys) == (
        f"textinv: error: --resume_from_checkpoint 'checkpoint-1' does not exist; {str(finished)!r} has no "
        "checkpoint; train with --checkpointing_steps N to make some, or drop the flag"
    )


# --- 4. Ctrl-C while the model loads ---------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_model_loads_stops_at_once_and_writes_nothing(
    tiny_model: Path,
    train_images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
) -> None:
    from textinv.training import recipe

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job starts with SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    real, calls = recipe.load_model_parts, []

    def load_with_signal(*args, **kwargs):
        signal.raise_signal(signum)  # the user presses Ctrl-C (or `kill`) while the model loads
        calls.append("after the signal")  # never reached: the run stops at once
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "load_model_parts", load_with_signal)
    out = tmp_path / "out"
    code = main(train_args(tiny_model, train_images, out))
    name = signal.Signals(signum).name
    assert code == 128 + signum
    assert _one_error_line(capsys) == f"textinv: stopped by {name} before the first step; nothing was written"
    assert calls == [] and not out.exists()


# --- 7. one meaning of "best" ----------------------------------------------------------------------------------
def test_the_model_card_calls_best_the_lowest_held_out_loss_only(tmp_path: Path) -> None:
    from textinv.config import TrainConfig
    from textinv.observers.model_card import render_model_card

    config = TrainConfig("m", "images", "<cat-toy>", "toy")
    record = {
        "steps_done": 10,
        "final_loss": 0.9123,
        "lowest_train_loss": 0.8617,
        "eval": {"best_step": 8, "best_loss": 1.09026, "best_file": "learned_embeds-best.safetensors"},
        "identity": {"images": ["a", "b"]},
    }
    card = render_model_card(config, record, tmp_path)
    assert (
        "for 10 steps (final training loss 0.9123; lowest eval_loss 1.09026 at step 8 "
        "(learned_embeds-best.safetensors))." in card
    )
    assert "0.8617" not in card and "best 0" not in card
    without_eval = render_model_card(config, {**record, "eval": None}, tmp_path)
    assert "for 10 steps (final training loss 0.9123)." in without_eval


# --- 10. the demo installs what it runs ------------------------------------------------------------------------
def test_make_demo_installs_textinv_alone_and_make_test_adds_the_tools(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]

    def planned(target: str) -> str:
        venv = tmp_path / f"venv-{target}"  # a venv that does not exist: make plans every step
        result = subprocess.run(
            ["make", "-n", "-C", str(repo), target, f"VENV={venv}", "CHROMIUM=/bin/sh"],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    demo, test = planned("demo"), planned("test")
    assert "pip install --quiet -e ." in demo and "[test]" not in demo
    assert "pip install --quiet -e '.[test]'" in test

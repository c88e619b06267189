"""torch's CPU thread count (issue 28): --cpu_threads, else OMP_NUM_THREADS, else a resumed run's, else the cores other
jobs leave free; one log line, run.json, and the caller's count back afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import textinv
from conftest import train_config
from textinv import cpu_threads
from textinv.cli import main
from textinv.cpu_threads import ThreadChoice, choose_cpu_threads


@pytest.mark.parametrize(
    ("cores", "load", "processes", "expected"),
    [
        (2, 0.3, 1, ThreadChoice(2, "2 of 2 cores free, 1-minute load average 0.3")),
        (2, 1.6, 1, ThreadChoice(1, "1 of 2 cores free, 1-minute load average 1.6")),
        (2, 7.8, 1, ThreadChoice(1, "1 of 2 cores free, 1-minute load average 7.8")),
        (8, 3.4, 1, ThreadChoice(5, "5 of 8 cores free, 1-minute load average 3.4")),
        (8, 0.0, 2, ThreadChoice(4, "8 of 8 cores free, 1-minute load average 0.0, shared by 2 processes")),
    ],
)
def test_the_free_cores_decide_when_nothing_else_does(cores: int, load: float, processes: int, expected) -> None:
    assert choose_cpu_threads(None, None, environ={}, cores=cores, load=load, processes=processes) == expected


def test_the_flag_then_omp_num_threads_then_the_resumed_run_decide() -> None:
    busy = dict(cores=2, load=7.0)
    assert choose_cpu_threads(3, 2, environ={"OMP_NUM_THREADS": "1"}, **busy) == ThreadChoice(3, "--cpu_threads")
    assert choose_cpu_threads(None, 2, environ={"OMP_NUM_THREADS": "1"}, **busy) == ThreadChoice(1, "OMP_NUM_THREADS")
    resumed = ThreadChoice(2, "as the run being resumed, for a bit-identical resume")
    assert choose_cpu_threads(None, 2, environ={"OMP_NUM_THREADS": "x"}, **busy) == resumed


@pytest.mark.slow
def test_a_run_says_and_records_its_choice_and_gives_the_callers_count_back(
    tiny_model: Path,
    train_images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (1.6, 1.0, 1.0))  # a busy 2-core machine
    before = torch.get_num_threads()
    settings = dict(max_train_steps=2, checkpointing_steps=1, only_save_embeds=True, eval_steps=0, report_to="none")
    with caplog.at_level("INFO", logger="textinv"):
        textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **settings), show_progress=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["cpu_threads"] == {"threads": 1, "reason": "1 of 2 cores free, 1-minute load average 1.6"}
    assert record["torch_threads"] == 1
    assert "CPU threads: 1 (1 of 2 cores free, 1-minute load average 1.6); --cpu_threads N to choose" in caplog.messages
    assert torch.get_num_threads() == before

    # A resume on an idle machine keeps the run's count, so that it stays bit-identical.
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    resumed = dict(settings, max_train_steps=3, resume_from_checkpoint="latest")
    textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **resumed), show_progress=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["cpu_threads"] == {"threads": 1, "reason": "as the run being resumed, for a bit-identical resume"}


@pytest.mark.slow
def test_generate_uses_the_flag_and_gives_the_callers_count_back(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = torch.get_num_threads()
    seen = []
    real = cpu_threads.apply_cpu_threads

    def spy(choice):
        seen.append(choice)
        return real(choice)

    monkeypatch.setattr("textinv.inference.generation.apply_cpu_threads", spy)
    with caplog.at_level("INFO", logger="textinv"):
        textinv.generate(str(tiny_model), "a toy", num_inference_steps=1, height=64, width=64, seed=0, cpu_threads=1)
    assert seen == [ThreadChoice(1, "--cpu_threads")]
    assert "CPU threads: 1 (--cpu_threads); --cpu_threads N to choose" in caplog.messages
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("command", ["train", "generate"])
def test_cpu_threads_below_one_is_one_line(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    argv = {
        "train": [
            "train",
            f"--pretrained_model_name_or_path={tiny_model}",
            f"--train_data_dir={tmp_path}",
            "--placeholder_token=<t>",
            "--initializer_token=toy",
            f"--output_dir={tmp_path / 'out'}",
        ],
        "generate": ["generate", f"--model={tiny_model}", "--prompt=a toy"],
    }[command]
    assert main([*argv, "--cpu_threads=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["textinv: error: --cpu_threads 0 must be >= 1"], err

"""torch's CPU thread count (issue 28): --cpu_threads, else OMP_NUM_THREADS, else a resumed run's, else the cores other
jobs leave free; one log line, run.json, and the caller's count back afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
        (2, 0.3, 1, ThreadChoice(2, "2 of 2 cores free, 0.3 busy with other processes")),
        (2, 1.6, 1, ThreadChoice(1, "1 of 2 cores free, 1.6 busy with other processes")),
        (2, 7.8, 1, ThreadChoice(1, "1 of 2 cores free, 7.8 busy with other processes")),
        (8, 3.4, 1, ThreadChoice(5, "5 of 8 cores free, 3.4 busy with other processes")),
        (8, 0.0, 2, ThreadChoice(4, "8 of 8 cores free, 0.0 busy with other processes, shared by 2 processes")),
    ],
)
def test_the_free_cores_decide_when_nothing_else_does(cores: int, load: float, processes: int, expected) -> None:
    assert choose_cpu_threads(None, None, environ={}, cores=cores, load=load, processes=processes) == expected


def test_busy_cores_are_measured_now_without_this_process_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two cores; over 0.5 s of wall time the machine's busy ticks grew by 90 of 100, 0.2 s of it this process's own:
    # 1.8 cores busy in all, 0.4 of them ours.
    samples = iter([(1000, 5000), (1090, 5100)])
    clock = iter([10.0, 10.5])
    own = iter([3.0, 3.2])
    monkeypatch.setattr(cpu_threads, "_cpu_jiffies", lambda: next(samples))
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(cpu_threads.time, "process_time", lambda: next(own))
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda seconds: None)
    assert cpu_threads.cores_busy_elsewhere() == pytest.approx(1.4)


def test_a_busy_process_beside_it_counts_and_the_load_average_stands_in_without_proc_stat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # past its start-up
        busy = cpu_threads.cores_busy_elsewhere(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.7, busy  # one core spinning (more if other jobs run too)
    monkeypatch.setattr(cpu_threads, "_cpu_jiffies", lambda: None)
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (1.6, 1.0, 1.0))
    choice = choose_cpu_threads(None, None, environ={}, cores=2)
    assert choice == ThreadChoice(1, "1 of 2 cores free, 1-minute load average 1.6")


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
    monkeypatch.setattr(cpu_threads, "cores_busy_elsewhere", lambda: 1.6)  # a busy 2-core machine
    before = torch.get_num_threads()
    settings = dict(max_train_steps=2, checkpointing_steps=1, only_save_embeds=True, eval_steps=0, report_to="none")
    with caplog.at_level("INFO", logger="textinv"):
        textinv.train(train_config(tiny_model, train_images, tmp_path / "out", **settings), show_progress=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["cpu_threads"] == {"threads": 1, "reason": "1 of 2 cores free, 1.6 busy with other processes"}
    assert record["torch_threads"] == 1
    assert (
        "CPU threads: 1 (1 of 2 cores free, 1.6 busy with other processes); --cpu_threads N to choose"
        in caplog.messages
    )
    assert torch.get_num_threads() == before

    # A resume on an idle machine keeps the run's count, so that it stays bit-identical.
    monkeypatch.setattr(cpu_threads, "cores_busy_elsewhere", lambda: 0.0)
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

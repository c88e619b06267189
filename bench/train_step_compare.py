"""``bench/train_step.py --compare lora``: pivotal tuning (``--lora_rank``) against plain textual inversion.

    python bench/train_step.py --compare lora --settings sd15-256-lora4 sd15-512-lora4 --runs 3 --threads 1

Each ``*-lora*`` setting of train_step.py is run two ways, each run in two fresh processes one after the other:
plain TI (the setting without its LoRA fields) and then pivotal tuning (the setting as named, e.g. ``lora_rank`` 4
with textinv's LoRA defaults otherwise: alpha = rank, lr 1e-4, adapters on the UNet's attention projections).
Both processes run textinv's ``train()`` as the CLI runs it (train_step.py's textinv-alone process: the demo
images through the lazy latent cache, so the VAE counts in memory; ``--ready-latents`` hands over random latents
instead) with the same seed, so they draw the same examples. Per process:

- **s/step**: the median of textinv's own step time (``StepState.step_seconds``) over the steps after
  ``--warmup`` that encoded no view (a step that fills the latent cache pays a VAE pass; seed 42 with the demo
  images encodes at steps 1, 3, 4, 9, 10, 11, so 1 warm-up step and 5 more give steps 2, 5 and 6);
- **peak RSS**: the process's high-water mark (``ru_maxrss``) at its end;
- **trained elements**: what needs a gradient once training starts: the word's vectors, the adapters, and any
  base weight of the denoiser or text encoders (0 when the base stays frozen).

Absolute times move by up to 40 % on a shared machine, so each run's pivotal figure is divided by the TI figure
of the same run (adjacent processes): the table shows the median of those ratios and each run's.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Optional

# TrainConfig's pivotal-tuning fields (textinv.lora_options.LoraOptions): the TI side runs without any of them.
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_learning_rate", "embedding_train_frac", "lora_text_encoder")
SIDES = ("ti", "pivotal")
RunChild = Callable[[str, dict[str, Any], int], Optional[dict[str, Any]]]


def is_pivotal(extra: dict[str, Any]) -> bool:
    return bool(extra.get("lora_rank"))


def side_extras(extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The TrainConfig fields of each side: the setting's without its LoRA fields (TI), and as they are (pivotal)."""
    return {"ti": {key: value for key, value in extra.items() if key not in LORA_FIELDS}, "pivotal": dict(extra)}


def trained_elements(run: Any) -> dict[str, int]:
    """Elements that need a gradient at the start of training: the word's vectors, the LoRA adapters (PEFT's
    ``lora_*`` parameters) and anything else of the denoiser and text encoders (the frozen base: should be 0)."""
    modules = [run.parts.denoiser, *(part.text_encoder for part in run.parts.text_encoders)]
    counts = {"vectors": sum(vectors.numel() for vectors in run.trainable.parameters()), "adapters": 0, "base": 0}
    for module in modules:
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                counts["adapters" if "lora_" in name else "base"] += parameter.numel()
    return counts


def compare_setting(name: str, spec: dict[str, Any], runs: int, threads: int, run_child: RunChild) -> dict[str, Any]:
    """``runs`` pairs of fresh processes, TI then pivotal; a pair where either process failed is left out."""
    row: dict[str, Any] = {"setting": name, "threads": threads, "steps": spec["steps"], "warmup": spec["warmup"]}
    row["extra"] = side_extras(spec["extra"])
    row["runs"] = []
    for run in range(runs):
        pair = {side: run_child("textinv", {**spec, "extra": row["extra"][side]}, threads) for side in SIDES}
        if any(result is None for result in pair.values()):
            print(f"{name} run {run + 1}: left out (a process failed)", file=sys.stderr)
            continue
        row["runs"].append(pair)
        ti, pivotal = pair["ti"], pair["pivotal"]
        print(
            f"{name} run {run + 1}: TI {ti['s_per_step_without_vae']:.3f} s/step {ti['peak_rss_gib']:.2f} GiB, "
            f"pivotal {pivotal['s_per_step_without_vae']:.3f} s/step {pivotal['peak_rss_gib']:.2f} GiB",
            file=sys.stderr,
        )
    return row


def machine_line(threads: int) -> str:
    """Date, CPU, memory and library versions, for the table's caption."""
    import diffusers
    import peft
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.system()} {platform.machine()}, {cpu}, "
        f"{os.cpu_count()} CPUs, {memory:.0f} GiB; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}; OMP_NUM_THREADS={threads}"
    )


def _values(runs: list[dict[str, Any]], side: str, key: str) -> list[float]:
    return [run[side][key] for run in runs]


def _median_and_runs(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({', '.join(f'{value:.{digits}f}' for value in values)})"


def _steps(runs: list[dict[str, Any]]) -> str:
    """The timed steps of the first process (the same in every process: same seed, same draws), or each's."""
    timed = {tuple(run[side]["timed_steps"]) for run in runs for side in SIDES}
    return " / ".join(",".join(map(str, steps)) for steps in sorted(timed))


def print_comparison(rows: list[dict[str, Any]], threads: int) -> None:
    """The markdown table: per setting the medians over the runs, each run's figure in brackets."""
    print(machine_line(threads))
    print()
    print(
        "| setting | runs | timed steps | TI s/step | pivotal s/step | pivotal/TI s/step: median (runs) "
        "| TI peak RSS GiB | pivotal peak RSS GiB | pivotal - TI peak RSS | pivotal/TI peak RSS: median (runs) "
        "| trained elements: TI / pivotal (base) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        runs = row["runs"]
        if not runs:
            print(f"| {row['setting']} | 0 | | | | | | | | | |")
            continue
        seconds = {side: _values(runs, side, "s_per_step_without_vae") for side in SIDES}
        rss = {side: _values(runs, side, "peak_rss_gib") for side in SIDES}
        time_ratios = [pivotal / ti for ti, pivotal in zip(seconds["ti"], seconds["pivotal"])]
        rss_ratios = [pivotal / ti for ti, pivotal in zip(rss["ti"], rss["pivotal"])]
        differences = [(pivotal - ti) * 1024 for ti, pivotal in zip(rss["ti"], rss["pivotal"])]
        trained = {side: runs[0][side]["trained"] for side in SIDES}
        base = max(run[side]["trained"]["base"] for run in runs for side in SIDES)
        elements = (
            f"{trained['ti']['vectors']:,} / {trained['pivotal']['vectors']:,} + "
            f"{trained['pivotal']['adapters']:,} adapters ({base})"
        )
        print(
            f"| {row['setting']} | {len(runs)} | {_steps(runs)} | {_median_and_runs(seconds['ti'], 3)} "
            f"| {_median_and_runs(seconds['pivotal'], 3)} | **{_median_and_runs(time_ratios, 3)}** "
            f"| {_median_and_runs(rss['ti'], 3)} | {_median_and_runs(rss['pivotal'], 3)} "
            f"| {_median_and_runs(differences, 0)} MiB | **{_median_and_runs(rss_ratios, 3)}** | {elements} |"
        )

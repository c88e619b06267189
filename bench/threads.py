"""torch's CPU thread count as a user meets it (issue 28): `textinv train` on the tiny pipeline, each run in a process
of its own, with the automatic choice (textinv.cpu_threads: the free cores), one thread and one per core, on an idle
machine and on one that two busy-looping processes keep loaded. Prints a table of seconds per step (run.json's
steady-state timing) and the threads each run used; the settings are interleaved, so the load drifts alike for all.

    python bench/threads.py                 # 3 rounds, 30 steps at 64 px
    python bench/threads.py --rounds 5 --steps 60
    python bench/threads.py --vectors       # how far apart the learned vectors of 1, 2, 4 threads end (seeds 1-3)

--vectors measures the bound docs/gpus.md states and tests/test_gpu_paths.py checks: the largest absolute difference
over the largest absolute entry, 12 steps at batch 4 (the tests' setting: batch 4 x accumulation 2, 6 steps, too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"automatic": [], "1 thread": ["--cpu_threads=1"], "1 per core": [f"--cpu_threads={os.cpu_count() or 1}"]}
BUSY = "while True: pass"


def train_once(model: Path, images: Path, out: Path, steps: int, extra: list[str]) -> dict:
    environment = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    command = [
        sys.executable, "-m", "textinv.cli", "train", f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}", "--placeholder_token=<bench>", "--initializer_token=toy", "--resolution=64",
        f"--max_train_steps={steps}", "--only_save_embeds", "--eval_steps=0", "--report_to=none",
        f"--output_dir={out}", *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, env=environment, capture_output=True)
    record = json.loads((out / "run.json").read_text())
    return {"seconds_per_step": record["timings"]["seconds_per_step"], "threads": record["torch_threads"]}


VECTOR_SETTINGS = {
    "12 steps, batch 4": ["--train_batch_size=4", "--max_train_steps=12"],
    "6 steps, batch 4 x 2": ["--train_batch_size=4", "--gradient_accumulation_steps=2", "--max_train_steps=6"],
}


def learned_vector(model: Path, images: Path, out: Path, threads: int, seed: int, extra: list[str]):
    from safetensors.torch import load_file

    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [
        sys.executable, "-m", "textinv.cli", "train", f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}", "--placeholder_token=<cat-toy>", "--initializer_token=toy", "--resolution=64",
        "--learning_rate=5e-3", "--lr_warmup_steps=0", f"--seed={seed}", "--only_save_embeds", "--eval_steps=0",
        "--report_to=none", f"--output_dir={out}", *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, env=environment, capture_output=True)
    assert json.loads((out / "run.json").read_text())["torch_threads"] == threads
    return load_file(str(out / "learned_embeds.safetensors"))["<cat-toy>"]


def vectors_main(seeds: list[int]) -> None:
    """The relative spread of the learned vectors across torch thread counts (precision.vectors_agree's measure)."""
    from textinv.tiny import build_tiny_pipeline, demo_images_dir

    started = time.time()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {cpu_name()}, {os.cpu_count()} cores, "
        f"tiny SD1 pipeline at 64 px, seeds {seeds}, each run its own process"
    )
    print("| setting | seed | 1 vs 2 threads | 1 vs 4 threads | 2 threads twice |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="textinv-thread-vectors-") as scratch:
        work = Path(scratch)
        model = build_tiny_pipeline(work / "tiny", seed=0)
        # Only the first three demo images, as the tests train on.
        images = work / "images"
        images.mkdir()
        for source in sorted(demo_images_dir().glob("*.jpg"))[:3]:
            (images / source.name).write_bytes(source.read_bytes())
        for name, extra in VECTOR_SETTINGS.items():
            for seed in seeds:
                runs = {
                    label: learned_vector(
                        model, images, work / f"{name}-{seed}-{label}".replace(" ", "_"), t, seed, extra
                    )
                    for label, t in (("1", 1), ("2", 2), ("2 again", 2), ("4", 4))
                }
                scale = float(runs["1"].abs().max())
                spread = {k: float((runs[k] - runs["1"]).abs().max()) / scale for k in ("2", "4")}
                same = "bit-identical" if runs["2"].equal(runs["2 again"]) else "DIFFER"
                print(f"| {name} | {seed} | {spread['2']:.2e} | {spread['4']:.2e} | {same} |")
    print(f"total {time.time() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vectors", action="store_true", help="measure the vectors' spread across thread counts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    if args.vectors:
        vectors_main(args.seeds)
        return
    from textinv.tiny import build_tiny_pipeline, demo_images_dir

    started = time.time()
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="textinv-threads-") as scratch:
        work = Path(scratch)
        model = build_tiny_pipeline(work / "tiny", seed=0)
        for machine in ("idle", "busy (2 busy loops)"):
            loops = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)] if machine != "idle" else []
            try:
                time.sleep(20 if loops else 0)  # let the 1-minute load average see them
                for round_index in range(args.rounds):
                    for name, extra in SETTINGS.items():
                        out = work / f"run-{len(results)}-{round_index}-{name.replace(' ', '_')}"
                        run = train_once(model, demo_images_dir(), out, args.steps, extra)
                        run["load"] = os.getloadavg()[0]
                        results.setdefault((machine, name), []).append(run)
            finally:
                for loop in loops:
                    loop.kill()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {cpu_name()}, {os.cpu_count()} cores, "
        f"{args.rounds} rounds x {args.steps} steps at 64 px, tiny SD1 pipeline, each run its own process"
    )
    print("| machine | setting | threads used | s/step (median) | vs automatic | load |")
    print("|---|---|---|---|---|---|")
    for machine in ("idle", "busy (2 busy loops)"):
        automatic = statistics.median(run["seconds_per_step"] for run in results[(machine, "automatic")])
        for name in SETTINGS:
            runs = results[(machine, name)]
            median = statistics.median(run["seconds_per_step"] for run in runs)
            threads = sorted({run["threads"] for run in runs})
            loads = [run["load"] for run in runs]
            print(
                f"| {machine} | {name} | {', '.join(map(str, threads))} | {median:.4f} | {median / automatic:.2f}x | "
                f"{min(loads):.1f}-{max(loads):.1f} |"
            )
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

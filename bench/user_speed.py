"""Speed as a user measures it (issue 29): every side in a process of its own, with its own defaults, in turns.

    python bench/user_speed.py                               # SD1.5 architecture, 256 and 512 px
    python bench/user_speed.py --resolutions 256 --rounds 2
    python bench/user_speed.py --model tiny --resolutions 64 --steps 12    # a minute, for trying it out
    python bench/user_speed.py --resolutions 256 --steps 8 --rounds 3 --steps-only   # the floor and textinv only

Per resolution and round, one process each, in this order (so a busy spell of the machine falls on all of them):

1. **floor**: the text encoder's and the UNet's forward and backward with the gradient at the token embeddings only,
   from ready latents (bench/train_step.py's ``Floor``: plain transformers/diffusers calls), in a process that
   never imports textinv: Python's and glibc's defaults, torch's default thread count.
2. **textinv, steps**: ``textinv.train()`` in a fresh process (Python's and glibc's defaults, as ``textinv train``
   leaves them), batch 1, images from the demo folder through the lazy latent cache, the held-out
   evaluation off; its steady s/step leaves out the steps that encoded a view (the VAE pass the floor does not
   have), and the first steps' times are shown beside the reference scripts' (which encode on every step).
   With torch's default threads and with 1 thread (the seed's script's equal-thread column).
3. **diffusers' example script** and 4. **the seed's script** (ppdiffusers, real PaddlePaddle in the Paddle venv,
   on a Paddle-format copy of the same weights; 1 thread and Paddle's default), both run as they are by
   bench/reference_scripts.py: ``--steps`` steps, batch 1, their own defaults otherwise (each writes only the
   learned embedding at the end, logs every step; no validation, no snapshot within the run).
5. **textinv, whole run**: the ``textinv train`` command with its defaults (held-out evaluation, snapshots,
   the lazy latent cache, the full pipeline save, the model card) and the same steps, images and batch (1).
   Wall time is launch to exit, peak RSS the child's ``ru_maxrss``; the breakdown comes from textinv's own closing
   line (loading, steps, evaluation) and the rest (saving, start-up outside loading) is what is left.
   ``--ppdiffusers-weights`` adds the same run with ``--ppdiffusers_weights`` (the pipeline folder also in Paddle's
   format): its wall time, peak RSS and output size beside the plain run's.

The reference scripts' rows are their whole runs too (wall time, launch to exit). Ratios: textinv's steady step
over the floor's; textinv's over each script's (at the same thread setting); peak RSS over diffusers'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bench_models import DEFAULT_CACHE, ensure_models
from machine import cpu_name
from reference_scripts import images_only, run_diffusers_script, run_seed_script

HERE = Path(__file__).resolve().parent
CLOSING = re.compile(r"in all: loading ([\d.]+) s, steps ([\d.]+) s(?:, evaluation ([\d.]+) s)?")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """The floor (never imports textinv) or textinv's steps, in this fresh process."""
    if spec["mode"] == "floor":
        from train_step import Floor, peak_rss_gib

        started = time.perf_counter()
        floor = Floor(Path(spec["model"]), spec["resolution"])
        load = time.perf_counter() - started
        times = [floor.step() for _ in range(spec["steps"])]
        return {"step_seconds": times, "startup_s": load, "peak_rss_gib": peak_rss_gib()}
    from train_step import run_textinv_alone

    result = run_textinv_alone(
        Path(spec["model"]), spec["resolution"], spec["steps"], 0, {}, spec["launched_at"], False
    )
    return {
        "step_seconds": result["step_seconds"],
        "vae_steps": result["vae_steps"],
        "startup_s": result["startup_s"],
        "peak_rss_gib": result["peak_rss_gib"],
    }


def run_child(mode: str, model: Path, resolution: int, steps: int, threads: Optional[int]) -> dict[str, Any]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_"):
        env.pop(name, None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    spec = {"mode": mode, "model": str(model), "resolution": resolution, "steps": steps, "launched_at": time.time()}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: failed:\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def folder_bytes(folder: Path) -> int:
    """Bytes on disk under ``folder``, each hard-linked file once (as ``du`` counts them)."""
    seen: dict[tuple[int, int], int] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


def whole_textinv(
    model: Path, images: Path, resolution: int, steps: int, scratch: Path, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The ``textinv train`` command with its defaults (and ``extra`` flags), launch to exit."""
    output = scratch / f"textinv-whole-{time.monotonic_ns()}"
    command = [
        str(Path(sys.executable).parent / "textinv"), "train",
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={images}",
        "--placeholder_token=<bench>", "--initializer_token=toy", f"--resolution={resolution}",
        "--train_batch_size=1", f"--max_train_steps={steps}", f"--output_dir={output}", *extra,
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"textinv train failed:\n{out[-3000:]}")
    closing = CLOSING.search(out)
    loading, step_total, evaluation = (float(g) if g else 0.0 for g in closing.groups()) if closing else (0, 0, 0)
    output_bytes = folder_bytes(output)
    subprocess.run(["rm", "-rf", str(output)], check=False)
    return {
        "wall_s": wall,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "loading_s": loading,
        "steps_s": step_total,
        "evaluation_s": evaluation,
        "rest_s": wall - loading - step_total - evaluation,
        "output_gb": output_bytes / 1e9,
        "log": out[-1500:],
    }


def reference(run: Any) -> dict[str, Any]:
    if not run.ok:
        raise SystemExit(f"{run.tool} failed (exit {run.exit_code}):\n{run.stderr_tail}")
    return {
        "step_seconds": run.step_seconds,
        "startup_s": run.startup_seconds,
        "peak_rss_gib": run.peak_rss_bytes / 2**30,
        "wall_s": run.wall_seconds,
        "threads_used": run.framework_threads,
    }


def steady(result: dict[str, Any], skip_first: int = 1) -> float:
    """Median step time after the first (start-up of the loop), without the steps that encoded a view."""
    times = result["step_seconds"]
    vae = set(result.get("vae_steps", []))
    kept = [t for step, t in enumerate(times, 1) if step > skip_first and step not in vae]
    return statistics.median(kept or times[skip_first:] or times)


def measure(
    model: Path,
    images: Path,
    resolution: int,
    steps: int,
    rounds: int,
    scratch: Path,
    paddle_weights: bool,
    steps_only: bool = False,
) -> dict[str, list]:
    sides: dict[str, list[dict[str, Any]]] = {}

    def add(name: str, result: dict[str, Any]) -> None:
        sides.setdefault(name, []).append(result)
        print(
            f"{resolution} px {name}: steady {steady(result):.3f} s/step, peak RSS {result['peak_rss_gib']:.2f} GiB, "
            f"wall {result.get('wall_s', float('nan')):.1f} s",
            file=sys.stderr,
        )

    for _ in range(rounds):
        add("floor", run_child("floor", model, resolution, steps, None))
        add("textinv", run_child("textinv", model, resolution, steps, None))
        if steps_only:
            continue
        add("textinv 1 thread", run_child("textinv", model, resolution, steps, 1))
        add("diffusers script", reference(run_diffusers_script(model, images, resolution, steps, None, scratch / "d")))
        add("seed script 1 thread", reference(run_seed_script(model, images, resolution, steps, 1, scratch / "p1")))
        add("seed script", reference(run_seed_script(model, images, resolution, steps, None, scratch / "p")))
        variants = {"textinv train": ()}
        if paddle_weights:
            variants["textinv train --ppdiffusers_weights"] = ("--ppdiffusers_weights",)
        for name, extra in variants.items():
            whole = whole_textinv(model, images, resolution, steps, scratch, extra)
            whole["step_seconds"] = []
            sides.setdefault(f"{name} (whole run)", []).append(whole)
            print(f"{resolution} px whole run, {name}: {whole['wall_s']:.1f} s", file=sys.stderr)
    return sides


def med(runs: list[dict[str, Any]], key: str) -> float:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def print_tables(results: dict[int, dict[str, list]], steps: dict[int, int], rounds: int, started: str) -> None:
    runs = ", ".join(f"{count} steps at {px} px" for px, count in steps.items())
    print(f"\nspeed as a user measures it: {cpu_name()}, {started}; {runs}, batch 1, {rounds} round(s)\n")
    print("| px | side | steady s/step | textinv / this | start-up s | peak RSS GiB | textinv RSS / this | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for resolution, sides in results.items():
        textinv = {1: sides.get("textinv 1 thread", []), None: sides["textinv"]}
        for name, runs in sides.items():
            if name.endswith("(whole run)"):
                continue
            step = statistics.median(steady(run) for run in runs)
            mine = textinv[1 if "1 thread" in name else None]
            ratio = statistics.median(steady(run) for run in mine) / step
            rss = med(runs, "peak_rss_gib")
            rss_ratio = med(mine, "peak_rss_gib") / rss
            print(
                f"| {resolution} | {name} | {step:.3f} | {ratio:.3f} | {med(runs, 'startup_s'):.1f} | {rss:.2f} | "
                f"{rss_ratio:.3f} | {med(runs, 'wall_s'):.1f} |"
            )
    for resolution, sides in results.items():
        pairs = zip(sides["textinv"], sides["floor"])  # the same round: floor, then textinv
        print(
            f"\n{resolution} px, textinv / floor by round: "
            + ", ".join(f"{steady(t) / steady(f):.3f}" for t, f in pairs)
        )
    if all("diffusers script" not in sides for sides in results.values()):
        return
    print("\nfirst steps (s): textinv's lazy latent cache against the scripts, which encode every step\n")
    print("| px | side | steps 1-5 |")
    print("|---|---|---|")
    for resolution, sides in results.items():
        for name in ("textinv", "diffusers script"):
            first = sides[name][0]["step_seconds"][:5]
            print(f"| {resolution} | {name} | {', '.join(f'{t:.2f}' for t in first)} |")
    print("\nwhole runs with the defaults (same steps, images, batch 1): wall time and peak RSS\n")
    print(
        "| px | tool | wall s | vs textinv | peak RSS GiB | output GB | textinv: loading / steps / evaluation / rest s |"
    )
    print("|---|---|---|---|---|---|---|")
    for resolution, sides in results.items():
        mine = med(sides["textinv train (whole run)"], "wall_s")
        for name, whole in sides.items():
            if not name.endswith("(whole run)"):
                continue
            wall = med(whole, "wall_s")
            parts = "/".join(f"{med(whole, key):.1f}" for key in ("loading_s", "steps_s", "evaluation_s", "rest_s"))
            print(
                f"| {resolution} | {name.removesuffix(' (whole run)')} | {wall:.1f} | {wall / mine:.3f} | "
                f"{med(whole, 'peak_rss_gib'):.2f} | {med(whole, 'output_gb'):.2f} | {parts} |"
            )
        for name in ("diffusers script", "seed script", "seed script 1 thread"):
            wall = med(sides[name], "wall_s")
            print(
                f"| {resolution} | {name} | {wall:.1f} | {wall / mine:.3f} | {med(sides[name], 'peak_rss_gib'):.2f} | | |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[12], help="steps of every run: one number, or one per resolution"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument(
        "--ppdiffusers-weights", action="store_true", help="also a whole run with --ppdiffusers_weights (its cost)"
    )
    parser.add_argument(
        "--steps-only", action="store_true", help="only the floor and textinv's steps (more rounds of that ratio)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from textinv.tiny import demo_images_dir

    if len(args.steps) not in (1, len(args.resolutions)):
        parser.error(f"--steps: one number, or one per resolution ({len(args.resolutions)})")
    steps = dict(zip(args.resolutions, args.steps * len(args.resolutions) if len(args.steps) == 1 else args.steps))
    model = ensure_models(args.cache, {args.model})[args.model]
    images = images_only(demo_images_dir(), args.cache)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: dict[int, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="textinv-user-speed-") as scratch:
        for resolution in args.resolutions:
            results[resolution] = measure(
                model,
                images,
                resolution,
                steps[resolution],
                args.rounds,
                Path(scratch),
                args.ppdiffusers_weights,
                args.steps_only,
            )
    print_tables(results, steps, args.rounds, started)
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

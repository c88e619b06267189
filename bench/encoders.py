"""What each text encoder's vectors do: a planted concept learned in CLIP only, T5 only or all encoders (SD3, Flux).

    OMP_NUM_THREADS=1 python bench/encoders.py --seeds 3 --steps 100 --checkpointing --t5_lr 4e-2 --jobs 2  # docs/encoders.md
    OMP_NUM_THREADS=1 python bench/encoders.py --seeds 1 --steps 40 --families flux
    OMP_NUM_THREADS=1 python bench/encoders.py --checkpointing --json /tmp/encoders.json

Per family and seed, a teacher (bench/planted_flow.py: a tiny pipeline whose transformer was pre-trained to read
ten words from its frozen text encoders, cached under --cache_dir) and a plant (latents of "toy"); then, at
equal steps and with textinv's defaults otherwise, a placeholder starting from "dog" is trained with
``textinv.train`` in each encoder set (``TrainConfig.text_encoders``), each run in a subprocess of its own (one
torch thread) so its peak RSS is its own. Reported per run: the final held-out ``eval_loss`` (textinv's, from
run.json), the recovery on the plant's held-out triples (per encoder set: 0 = the initial word's rows, 1 = the true
word's rows in every trained encoder), L(init) - L(target) (how much that encoder set can carry at all), the
median step time of steady steps (no evaluation, after the first 5), the peak RSS of the training process and its
rise over the RSS once the models were loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from machine import cpu_name  # noqa: E402

# The encoder sets compared, per family: CLIP only, T5 only, all.
ENCODER_SETS: dict[str, dict[str, list[str]]] = {
    "sd3": {"clip": ["clip_l", "clip_g"], "t5": ["t5xxl"], "all": ["clip_l", "clip_g", "t5xxl"]},
    "flux": {"clip": ["clip_l"], "t5": ["t5xxl"], "all": ["clip_l", "t5xxl"]},
}
WARMUP_STEPS = 5  # steps left out of the step-time median (first calls, allocator growth)
# Below this L(init) - L(target) the teacher barely reads the word through that encoder set, and recovery divides by
# almost nothing: the summary's recovery leaves such seeds out (the per-run table has them all).
MIN_HEADROOM = 0.01


def _rss_mb() -> float:
    """This process's peak resident set so far, MB (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS: now, VmHWM: peak since start or the last reset), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the peak of training alone can be read."""
    Path("/proc/self/clear_refs").write_text("5")


def run_child(spec_path: Path) -> int:
    """One training run, in this process: the spec's TrainConfig and latents; writes timings, RSS and eval_loss."""
    from textinv import train
    from textinv.config import TrainConfig
    from textinv.data.latents import LatentCache
    from textinv.events import RunContext, StepState, TrainObserver

    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    latents = torch.load(spec["latents"])
    cache = LatentCache(mean=latents, std=torch.zeros_like(latents), scaling_factor=1.0)

    class Timer(TrainObserver):
        """Step times without evaluation, and the RSS once the models are loaded (then the peak restarts there:
        loading a pipeline peaks above what the steps use, at tiny scale)."""

        def __init__(self) -> None:
            self.steps: list[float] = []
            self.loaded_rss = 0.0

        def on_start(self, run: RunContext) -> None:
            self.loaded_rss = _status_mb("VmRSS")
            _reset_peak()

        def on_step(self, run: RunContext, state: StepState) -> None:
            if state.eval_loss is None and state.step > WARMUP_STEPS:
                self.steps.append(state.step_seconds)

    timer = Timer()
    started = time.perf_counter()
    train(TrainConfig(**spec["config"]), show_progress=False, observers=[timer], latent_cache=cache)
    seconds = time.perf_counter() - started
    peak, training_peak = _rss_mb(), _status_mb("VmHWM")  # before anything else runs here
    record = json.loads((Path(spec["config"]["output_dir"]) / "run.json").read_text())
    losses = record.get("eval", {}).get("losses", [])
    result = {
        "seconds": seconds,
        "s_per_step": statistics.median(timer.steps) if timer.steps else None,
        "steady_steps": len(timer.steps),
        "peak_rss_mb": peak,  # the whole process, loading included
        "training_peak_rss_mb": training_peak,  # from the first step on (the end's evaluation and saving included)
        "loaded_rss_mb": timer.loaded_rss,
        "eval_loss": float(losses[-1][1]) if losses else None,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def launch(spec: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Run one setting in a subprocess (one torch thread) and return what it wrote."""
    spec_path = workdir / f"{name}.spec.json"
    spec["result"] = str(workdir / f"{name}.result.json")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(Path(spec["result"]).read_text())


def machine_lines(argv: list[str]) -> list[str]:
    cpu = cpu_name()
    return [
        f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"1 torch thread per training process (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} here)",
        "command: " + " ".join(["python", "bench/encoders.py", *argv]),
    ]


def _spread(values: list[float], digits: int = 3) -> str:
    """mean [min, max] (just the value for one)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def print_tables(rows: list[dict[str, Any]]) -> None:
    print("\nper run:")
    print(
        "| family | encoders | seed | eval_loss | L(init) | L(target) | L(learned) | recovery | s/step | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['setting']} | {r['seed']} | {r['eval_loss']:.4f} | {r['l_init']:.4f} | "
            f"{r['l_target']:.4f} | {r['l_learned']:.4f} | {r['recovery']:.3f} | {r['s_per_step']:.3f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    seeds = len({r["seed"] for r in rows})
    print(
        f"\nmean [min, max] over {seeds} seed(s); recovery over the seeds whose L(init) - L(target) >= {MIN_HEADROOM} "
        "(how many in brackets):"
    )
    print(
        "| family | encoders (trained) | eval_loss | recovery (seeds) | L(init) - L(target) | L(init) - L(learned) | "
        "s/step | peak RSS MB | training peak MB | rise over loaded MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["family"], r["setting"]) for r in rows):
        mine = [r for r in rows if (r["family"], r["setting"]) == key]
        readable = [r["recovery"] for r in mine if r["l_init"] - r["l_target"] >= MIN_HEADROOM]
        print(
            f"| {key[0]} | {key[1]} ({' + '.join(mine[0]['roles'])}) | {_spread([r['eval_loss'] for r in mine], 4)} | "
            f"{_spread(readable, 2)} ({len(readable)}/{len(mine)}) | "
            f"{_spread([r['l_init'] - r['l_target'] for r in mine], 4)} | "
            f"{_spread([r['l_init'] - r['l_learned'] for r in mine], 4)} | "
            f"{_spread([r['s_per_step'] for r in mine], 3)} | {_spread([r['peak_rss_mb'] for r in mine], 0)} | "
            f"{_spread([r['training_peak_rss_mb'] for r in mine], 0)} | "
            f"{_spread([r['training_peak_rss_mb'] - r['loaded_rss_mb'] for r in mine], 0)} |"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="teacher/plant seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=100, help="training steps of every run (equal steps)")
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=list(ENCODER_SETS))
    parser.add_argument("--settings", nargs="+", default=["clip", "t5", "all"], choices=["clip", "t5", "all"])
    parser.add_argument("--checkpointing", action="store_true", help="also run 'all' with gradient_checkpointing")
    parser.add_argument("--learning_rate", type=float, default=None, help="for every run (default: TrainConfig's)")
    parser.add_argument(
        "--t5_lr", type=float, default=None, help="also train T5 only at this learning rate (setting 't5@LR')"
    )
    parser.add_argument("--jobs", type=int, default=1, help="training subprocesses at once (1 thread each)")
    parser.add_argument("--teacher_steps", type=int, default=None, help="pre-training steps (default: the recipe's)")
    parser.add_argument("--train_latents", type=int, default=64)
    parser.add_argument("--held_out", type=int, default=128)
    parser.add_argument("--cache_dir", default=str(Path("~/.cache/textinv-bench").expanduser()))
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child)

    import logging

    from safetensors.torch import load_file

    from planted import PLACEHOLDER
    from planted_flow import INITIAL_WORD, FlowScorer, FlowTeacherRecipe, plant, teacher

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    started = time.perf_counter()
    for line in machine_lines(argv):
        print(line, flush=True)
    plans, concepts = [], {}
    for family in args.families:
        for seed in range(args.seeds):
            recipe = FlowTeacherRecipe(family=family, seed=seed)
            if args.teacher_steps is not None:
                recipe = FlowTeacherRecipe(family=family, seed=seed, steps=args.teacher_steps)
            model_dir, report = teacher(Path(args.cache_dir), recipe)
            print(f"teacher {family} seed {seed} ({model_dir.parent.name}): {report.summary()}", flush=True)
            concepts[family, seed] = plant(model_dir, recipe, seed, args.train_latents, args.held_out)
            settings = list(args.settings) + (["all+gc"] if args.checkpointing else [])
            settings += [f"t5@{args.t5_lr:g}"] if args.t5_lr is not None else []
            plans += [(family, seed, setting) for setting in settings]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="textinv-encoders-") as tmp:
        workdir = Path(tmp)

        def one(plan: tuple[str, int, str]) -> dict[str, Any]:
            family, seed, setting = plan
            concept = concepts[family, seed]
            name = f"{family}-{seed}-{setting}"
            latents_path = workdir / f"{family}-{seed}.latents.pt"
            if not latents_path.exists():
                torch.save(concept.latents.mean, latents_path)
            config = dict(
                pretrained_model_name_or_path=str(concept.model_dir),
                train_data_dir=str(workdir),  # unused: the latents come from the plant
                placeholder_token=PLACEHOLDER,
                initializer_token=INITIAL_WORD,
                resolution=concept.recipe.spec.sample_size,
                max_train_steps=args.steps,
                seed=seed,
                output_dir=str(workdir / name),
                only_save_embeds=True,
                checkpointing_steps=None,
                save_steps=10**9,
                report_to="none",
                eval_steps=args.steps,  # one evaluation, at the end: it is not a step's time
                text_encoders=ENCODER_SETS[family][setting.split("+")[0].split("@")[0]],
                gradient_checkpointing=setting.endswith("+gc"),
            )
            if args.learning_rate is not None:
                config["learning_rate"] = args.learning_rate
            if "@" in setting:
                config["learning_rate"] = float(setting.split("@")[1])
            result = launch({"config": config, "latents": str(latents_path)}, workdir, name)
            print(f"  {name}: {result['seconds']:.0f} s", file=sys.stderr, flush=True)
            return {"family": family, "seed": seed, "setting": setting, "roles": config["text_encoders"], **result}

        for family in args.families:  # the latents files, before runs share them
            for seed in range(args.seeds):
                torch.save(concepts[family, seed].latents.mean, workdir / f"{family}-{seed}.latents.pt")
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = list(pool.map(one, plans))
        scorers: dict[tuple[str, int, str], FlowScorer] = {}
        for run in runs:
            key = (run["family"], run["seed"], "+".join(run["roles"]))
            if key not in scorers:
                scorers[key] = FlowScorer(concepts[run["family"], run["seed"]], run["roles"])
            scorer = scorers[key]
            learned = load_file(
                str(workdir / f"{run['family']}-{run['seed']}-{run['setting']}" / "learned_embeds.safetensors")
            )
            recovery, loss = scorer.recovery({role: learned[role] for role in run["roles"]})
            rows.append(
                {
                    **run,
                    "recovery": recovery,
                    "l_learned": loss,
                    "l_init": scorer.initial_loss,
                    "l_target": scorer.target_loss,
                }
            )
    print(
        f"\n{args.steps} steps per run (textinv's defaults otherwise: batch 4, cosine; "
        f"lr {args.learning_rate or 'TrainConfig default 1e-3'}), "
        f"{args.train_latents} training latents, {args.held_out} scoring triples"
    )
    print_tables(rows)
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "runs": rows}, indent=1) + "\n")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

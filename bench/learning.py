"""Does training find a planted concept, in how many steps, and does eval_loss show when? (issues 8, 20)

    OMP_NUM_THREADS=1 python bench/learning.py                    # textinv's defaults vs the README command (seed 0)
    OMP_NUM_THREADS=1 python bench/learning.py --seeds 0 1 2 3 4  # docs/quality.md "How many steps"
    OMP_NUM_THREADS=1 python bench/learning.py --variants lr1e-3 batch8_lr1e-3 --seeds 0 1 2
    OMP_NUM_THREADS=1 python bench/learning.py --variants all     # every variant (docs/quality.md "How many steps")
    OMP_NUM_THREADS=1 python bench/learning.py --teacher_seed 1 --steps 60 --seeds 0 1 2 3 4 --variants lr4e-3_preserve
                                                                  # issue 27: another teacher, a norm rule

A tiny pipeline (seeded random weights, real CLIP vocabulary) whose UNet is first taught to draw
each of a dozen words as its own latent pattern (the teacher: bench/planted.py, cached under
--cache_dir); a placeholder starting from "shape" is then trained with textinv's ``train()`` on
latents of "star" and scored on held-out triples. Each seed has its own plant (training latents and
scoring triples) and its own training order and noise.

Per setting and seed it reports: recovery at steps 10-40, the first scored step at recovery >= 0.8
and 0.9, the final recovery, cosine and norm ratio to the "star" row, the step --stop_when_converged
would stop at (the rule applied to the run's own eval_loss curve: a run that stops there learned the
same vectors up to it), whether that step is inside the issue-20 bounds (no earlier than the first
step at recovery >= 0.9, no later than twice the first step at 95 % of the final recovery), and the
rank correlation of eval_loss with recovery over the run's evaluations (-1: eval_loss orders the
steps exactly as recovery does). Scored every 5 steps up to 50, then every --every and at every
evaluation.
Deterministic for a seed (on one machine). Run with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from machine import cpu_name  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from planted import (  # noqa: E402
    CONCEPT_WORDS,
    INITIAL_WORD,
    PLACEHOLDER,
    TARGET_WORD,
    PlantedConcept,
    PlantedScorer,
    RecoveryCurve,
    TeacherRecipe,
    plant,
    teacher,
    word_losses,
)
from textinv import train  # noqa: E402
from textinv.cli import PPDIFFUSERS_DEFAULTS  # noqa: E402
from textinv.config import TrainConfig  # noqa: E402 (after the environment that quiets model loading)
from textinv.training.held_out import convergence_step  # noqa: E402

# The seed's README command line (diffusers' and ppdiffusers' textual-inversion READMEs, the cat toy):
# batch 1 x accumulation 4, lr 5e-4 with --scale_lr (2e-3), constant, no warm-up, uniform t, plain MSE.
README_COMMAND = dict(
    train_batch_size=1,
    gradient_accumulation_steps=4,
    learning_rate=5e-4,
    scale_lr=True,
    lr_scheduler="constant",
    lr_warmup_steps=0,
)
# ppdiffusers' parse_args defaults, which train_textual_inversion.py keeps (textinv's before issue 20), measured
# with textinv's held-out evaluation on (the root script has it off).
PPDIFFUSERS = {name: value for name, value in PPDIFFUSERS_DEFAULTS.items() if name != "eval_steps"}
# Issue 27's variants share this: 4 examples per optimizer step in one micro-batch, no warm-up.
ISSUE27 = dict(train_batch_size=4, gradient_accumulation_steps=1, scale_lr=False, lr_warmup_steps=0)
SETTINGS: dict[str, dict[str, Any]] = {
    "textinv": {},  # TrainConfig's defaults: `textinv train`, the Python API and the web page
    "readme": README_COMMAND,
    "ppdiffusers": PPDIFFUSERS,
    # Variants measured while choosing the defaults (docs/quality.md "How many steps"): ppdiffusers' defaults with
    # the changes the name says, spelled out so they mean the same whatever TrainConfig's defaults are.
    "lr3e-4": {**PPDIFFUSERS, "learning_rate": 3e-4},
    "lr5e-4": {**PPDIFFUSERS, "learning_rate": 5e-4},
    "lr1e-3": {**PPDIFFUSERS, "learning_rate": 1e-3},
    "lr2e-3": {**PPDIFFUSERS, "learning_rate": 2e-3},
    "lr1e-3_cosine": {**PPDIFFUSERS, "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 0},
    "lr2e-3_cosine": {**PPDIFFUSERS, "learning_rate": 2e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 0},
    "lr1e-3_warmup10": {
        **PPDIFFUSERS,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 10,
    },
    "lr1e-3_logit_normal": {**PPDIFFUSERS, "learning_rate": 1e-3, "timestep_sampling": "logit_normal"},
    "lr5e-4_logit_normal": {**PPDIFFUSERS, "learning_rate": 5e-4, "timestep_sampling": "logit_normal"},
    "batch8_lr1e-3": {**PPDIFFUSERS, "train_batch_size": 8, "learning_rate": 1e-3},
    "batch4_lr1e-3": {**PPDIFFUSERS, "train_batch_size": 4, "learning_rate": 1e-3},
    "batch4_lr2e-3": {**PPDIFFUSERS, "train_batch_size": 4, "learning_rate": 2e-3},
    "batch4_lr1e-3_cosine": {
        **PPDIFFUSERS,
        "train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0,
    },
    "batch4_lr2e-3_cosine": {
        **PPDIFFUSERS,
        "train_batch_size": 4,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0,
    },
    "batch4_lr1e-3_logit_normal": {
        **PPDIFFUSERS,
        "train_batch_size": 4,
        "learning_rate": 1e-3,
        "timestep_sampling": "logit_normal",
    },
    "batch4x4_lr1e-3": {**PPDIFFUSERS, "train_batch_size": 4, "gradient_accumulation_steps": 4, "learning_rate": 1e-3},
    # textinv's defaults with one change
    "snr5": dict(snr_gamma=5.0),
    "vectors2": dict(num_vectors=2),
    "constant": dict(lr_scheduler="constant"),
    "eval_fixed": dict(eval_spacing=0.0),  # issue 28: evaluations every --eval_steps throughout (before --eval_spacing)
    # Issue 27: faster than the README command with vectors of a real word's size. Batch 4 (the README command's 4
    # examples per step in one micro-batch), no warm-up, with the optimizer, rate, schedule and norm rule the name
    # says (maxX: --max_embedding_norm X; preserve: --preserve_embedding_norm).
    **{
        f"{'' if optimizer == 'adamw' else optimizer + '_'}lr{rate}{'_cosine' if cosine else ''}_{norm}": {
            **ISSUE27,
            "optimizer": optimizer,
            "learning_rate": float(rate),
            "lr_scheduler": "cosine" if cosine else "constant",
            **({"preserve_embedding_norm": True} if norm == "preserve" else {"max_embedding_norm": float(norm[3:])}),
        }
        for optimizer, rate, cosine, norm in (
            ("adamw", "2e-3", False, "max1.5"),
            ("adamw", "3e-3", False, "max1.5"),
            ("adamw", "4e-3", False, "max1.5"),
            ("adamw", "3e-3", False, "max1.25"),
            ("adamw", "4e-3", False, "max1.25"),
            ("adamw", "3e-3", True, "max1.25"),
            ("adamw", "3e-3", False, "preserve"),
            ("adamw", "4e-3", False, "preserve"),
            ("adamw", "6e-3", False, "preserve"),
            ("adamw", "8e-3", False, "preserve"),
            ("adamw", "6e-3", False, "max1.5"),
            ("lion", "1e-3", False, "max1.25"),
            ("lion", "2e-3", False, "max1.25"),
            ("prodigy", "1", False, "max1.25"),
            ("schedulefree_adamw", "5e-3", False, "max1.25"),
        )
    },
}
VARIANTS = [name for name in SETTINGS if name not in ("textinv", "readme", "ppdiffusers")]
MARKS = (10, 20, 30, 40)
EARLY = 50  # scored every 5 steps up to here (and every --every after)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None below 3 points or for a constant series."""
    if len(xs) < 3:
        return None

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2
            start = end + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx, sy = sum((a - mx) ** 2 for a in rx) ** 0.5, sum((b - my) ** 2 for b in ry) ** 0.5
    return None if sx == 0 or sy == 0 else cov / (sx * sy)


def run_setting(
    name: str,
    concept: PlantedConcept,
    scorers: dict[int, PlantedScorer],
    steps: int,
    every: int,
    seed: int,
    workdir: Path,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    output_dir = workdir / f"run-{name}-{seed}"
    values: dict[str, Any] = dict(
        pretrained_model_name_or_path=str(concept.model_dir),
        train_data_dir=str(workdir),  # unused: the latents come from the planted concept
        placeholder_token=PLACEHOLDER,
        initializer_token=INITIAL_WORD,
        resolution=64,
        max_train_steps=steps,
        seed=seed,
        output_dir=str(output_dir),
        only_save_embeds=True,
        checkpointing_steps=None,
        save_steps=10**9,
        report_to="none",
    )
    values.update(SETTINGS[name])
    values.update(overrides)
    config = TrainConfig(**values)
    if config.num_vectors not in scorers:
        scorers[config.num_vectors] = PlantedScorer(concept, num_vectors=config.num_vectors)
    curve = RecoveryCurve(scorers[config.num_vectors], every, extra_steps=frozenset(range(5, EARLY + 1, 5)))
    started = time.perf_counter()
    train(config, show_progress=False, observers=[curve], latent_cache=concept.latents)
    seconds = time.perf_counter() - started
    record = json.loads((output_dir / "run.json").read_text())
    history = [(int(step), float(value)) for step, value in record.get("eval", {}).get("losses", [])]
    final = curve.scores[steps]
    stop = convergence_step(history, config.convergence_margin, config.convergence_patience) if history else None
    to_95 = curve.steps_to(0.95 * final.recovery)
    to_09 = curve.steps_to(0.9)
    scored = [(value, curve.scores[step].recovery) for step, value in history if step in curve.scores]
    return {
        "name": name,
        "seed": seed,
        "curve": curve,
        "final": final,
        "to_0.8": curve.steps_to(0.8),
        "to_0.9": to_09,
        "to_95%": to_95,
        "stop": stop,
        "history": history,
        "stop_ok": stop is not None and to_09 is not None and to_95 is not None and to_09 <= stop <= 2 * to_95,
        "rho": spearman([v for v, _ in scored], [r for _, r in scored]),
        "seconds": seconds,
        "lr": config.resolved_learning_rate * (config.examples_per_update(1) if config.scale_lr else 1),
        "per_step": config.examples_per_update(1),
        "eval_every": config.eval_steps,
    }


def _steps(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


def print_table(results: list[dict[str, Any]]) -> None:
    header = ["setting", "seed", "lr", "ex/step"] + [f"@{m}" for m in MARKS]
    header += ["to 0.8", "to 0.9", "recovery", "cosine", "norm", "stop", "95% at", "stop ok", "rho", "s"]
    rows = []
    for result in results:
        curve, final = result["curve"], result["final"]
        rho = result["rho"]
        rows.append(
            [result["name"], str(result["seed"]), f"{result['lr']:.3g}", str(result["per_step"])]
            + [f"{curve.scores[m].recovery:.2f}" if m in curve.scores else "" for m in MARKS]
            + [_steps(result["to_0.8"]), _steps(result["to_0.9"])]
            + [f"{final.recovery:.3f}", f"{final.cosine:.3f}", f"{final.norm_ratio:.2f}"]
            + [_steps(result["stop"]), _steps(result["to_95%"]), "yes" if result["stop_ok"] else "NO"]
            + ["-" if rho is None else f"{rho:.2f}", f"{result['seconds']:.0f}"]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def print_summary(results: list[dict[str, Any]], steps: int) -> None:
    """Per setting over the seeds: medians, worst cases, and issue 20's done-when checks."""
    print("per setting over the seeds (a miss counts as > the run's length):")
    for name in dict.fromkeys(result["name"] for result in results):
        mine = [result for result in results if result["name"] == name]

        def steps_of(key: str, pick: Any, mine: list[dict[str, Any]] = mine) -> str:
            value = pick(result[key] if result[key] is not None else steps + 1 for result in mine)
            return f">{steps}" if value > steps else f"{value:g}"

        final = statistics.median(result["final"].recovery for result in mine)
        worst_norm = max(result["final"].norm_ratio for result in mine)
        rhos = [result["rho"] for result in mine if result["rho"] is not None]
        within_40 = all(result["to_0.9"] is not None and result["to_0.9"] <= 40 for result in mine)
        rho = statistics.median(rhos) if rhos else float("nan")
        stops_ok = all(result["stop_ok"] for result in mine)
        print(
            f"  {name}: to 0.8 median {steps_of('to_0.8', statistics.median)}, "
            f"to 0.9 median {steps_of('to_0.9', statistics.median)} (worst {steps_of('to_0.9', max)}), "
            f"final recovery median {final:.3f}, norm worst {worst_norm:.2f}, "
            f"stop median {steps_of('stop', statistics.median)}, rho median {rho:.2f}; "
            f"0.9 within 40 on every seed: {'yes' if within_40 else 'no'}, "
            f"norm <= 1.5: {'yes' if worst_norm <= 1.5 else 'no'}, "
            f"stop inside the bounds on every seed: {'yes' if stops_ok else 'no'}"
        )


def machine_line(load_at_start: float) -> str:
    """When and where the table was measured, and how busy the machine was (the seconds depend on it)."""
    cpu = cpu_name()
    return (
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"1-minute load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--every", type=int, default=10, help=f"score every N steps, every 5 up to {EARLY} and at every evaluation"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seeds: each has its own plant, training order and noise"
    )
    parser.add_argument(
        "--settings", nargs="*", default=["textinv", "readme"], choices=list(SETTINGS), help="the settings to run first"
    )
    parser.add_argument("--variants", nargs="*", default=[], choices=VARIANTS + ["all"])
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="TrainConfig fields for every run, e.g. eval_samples=64",
    )
    parser.add_argument("--train_latents", type=int, default=64)
    parser.add_argument("--held_out", type=int, default=256)
    parser.add_argument("--teacher_seed", type=int, default=0)
    parser.add_argument("--teacher_steps", type=int, default=TeacherRecipe.steps)
    parser.add_argument(
        "--cache_dir",
        default=str(Path("~/.cache/textinv-bench").expanduser()),
        help="where pre-trained teachers are kept",
    )
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    overrides = {
        key: json.loads(value) if value[:1] in "0123456789-[{tf" else value
        for key, value in (item.split("=", 1) for item in args.set)
    }
    variants = VARIANTS if "all" in args.variants else args.variants
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    recipe = TeacherRecipe(seed=args.teacher_seed, steps=args.teacher_steps)
    model_dir, report = teacher(Path(args.cache_dir), recipe)
    print(
        f"teacher {model_dir.parent.name}: tiny {recipe.family} (text width {recipe.spec.text_hidden_size}, "
        f"UNet {recipe.spec.unet_channels}, {recipe.spec.sample_size // 8}x{recipe.spec.sample_size // 8} latents), "
        f"{len(recipe.words)} words, {recipe.steps} pre-training steps of batch {recipe.batch_size}, {report.summary()}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="textinv-learning-") as tmp:
        for seed in args.seeds:
            concept = plant(model_dir, recipe, seed=seed, num_train=args.train_latents, num_held_out=args.held_out)
            scorers = {1: PlantedScorer(concept)}
            gap, error = scorers[1].gap(concept.initial, concept.target)
            if seed == args.seeds[0]:
                losses = word_losses(scorers[1], CONCEPT_WORDS)
                print(
                    f"held-out L(word), plant {seed}: "
                    + ", ".join(f"{word} {loss:.4f}" for word, loss in sorted(losses.items(), key=lambda item: item[1]))
                )
            print(
                f"plant {seed}: L({INITIAL_WORD}) - L({TARGET_WORD}) = {gap:.4f} +- {error:.4f} "
                f"(paired standard error, {args.held_out} triples)",
                flush=True,
            )
            for name in [*args.settings, *variants]:
                result = run_setting(name, concept, scorers, args.steps, args.every, seed, Path(tmp), overrides)
                results.append(result)
                print(
                    f"  {name} (seed {seed}): recovery {result['final'].recovery:.3f}, "
                    f"to 0.8 {_steps(result['to_0.8'])}, to 0.9 {_steps(result['to_0.9'])}, "
                    f"norm {result['final'].norm_ratio:.2f}, stop {_steps(result['stop'])}, {result['seconds']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"{args.steps} steps, {args.train_latents} training latents, {args.held_out} scoring triples, "
        f"scored every {args.every} steps and at every evaluation; "
        f"{'; '.join(f'{k}={v}' for k, v in overrides.items()) or 'no overrides'}"
    )
    print(machine_line(load_at_start))
    print_table(results)
    print_summary(results, args.steps)
    if args.json:
        rows = [
            {
                **{key: value for key, value in result.items() if key not in ("curve", "final")},
                "final": vars(result["final"]),
                "recovery": {step: score.recovery for step, score in sorted(result["curve"].scores.items())},
            }
            for result in results
        ]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does training find a planted concept, and in how many steps? (issue 8)

    OMP_NUM_THREADS=1 python bench/learning.py                  # textinv's defaults vs the reference's
    OMP_NUM_THREADS=1 python bench/learning.py --variants all   # every setting of README's table
    OMP_NUM_THREADS=1 python bench/learning.py --variants snr5 logit_normal --seeds 0 1 2

A tiny pipeline (seeded random weights, real CLIP vocabulary) whose UNet is first taught to draw
each of a dozen words as its own latent pattern (the teacher: textinv.planted, cached under
--cache_dir); a placeholder starting from "shape" is then trained with textinv's ``train()`` on
latents of "star" and scored on held-out triples. Prints the teacher's losses per word (is "star"
really the minimum, by how much), then per setting: recovery at step marks, the final recovery,
cosine and norm ratio to the "star" row, and the first scored step at >= 0.8 / 0.9.
Deterministic for a seed (on one machine). Run with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from textinv.config import TrainConfig  # noqa: E402 (after the environment that quiets model loading)
from textinv.planted import (  # noqa: E402
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
from textinv.training import train  # noqa: E402

# The reference command line (diffusers' and ppdiffusers' textual-inversion READMEs): lr 5e-4 with
# --scale_lr, constant schedule, no warm-up; those scripts draw t uniformly and use plain MSE.
REFERENCE = dict(learning_rate=5e-4, scale_lr=True, lr_scheduler="constant", lr_warmup_steps=0, timestep_sampling="uniform", snr_gamma=None)
SETTINGS: dict[str, dict[str, Any]] = {
    "textinv": {},  # TrainConfig's defaults
    "reference": REFERENCE,
    # Variants measured while choosing the defaults (README "How well it learns").
    "uniform_mse": dict(timestep_sampling="uniform", snr_gamma=None),
    "snr5": dict(snr_gamma=5.0),
    "logit_normal": dict(timestep_sampling="logit_normal"),
    "logit_normal_snr5": dict(timestep_sampling="logit_normal", snr_gamma=5.0),
    "lr3e-4": dict(learning_rate=3e-4),
    "lr5e-4": dict(learning_rate=5e-4),
    "lr1e-3": dict(learning_rate=1e-3),
    "lr2e-3": dict(learning_rate=2e-3),  # the reference command's effective lr (5e-4 x batch 1 x 4 accumulation)
    "cosine": dict(lr_scheduler="cosine", lr_warmup_steps=0),
    "warmup50": dict(lr_scheduler="constant_with_warmup", lr_warmup_steps=50),
    "warmup500": dict(lr_scheduler="constant_with_warmup"),  # the default 500 warm-up steps, actually applied
    "repeats1": dict(repeats=1),
    "vectors2": dict(num_vectors=2),
    "reference_snr5": {**REFERENCE, "snr_gamma": 5.0},
    "reference_logit_normal": {**REFERENCE, "timestep_sampling": "logit_normal"},
}
VARIANTS = [name for name in SETTINGS if name not in ("textinv", "reference")]


def run_setting(name: str, concept: PlantedConcept, scorers: dict[int, PlantedScorer], steps: int, every: int, seed: int, batch: int, workdir: Path) -> dict[str, Any]:
    config = TrainConfig(
        pretrained_model_name_or_path=str(concept.model_dir),
        train_data_dir=str(workdir),  # unused: the latents come from the planted concept
        placeholder_token=PLACEHOLDER,
        initializer_token=INITIAL_WORD,
        resolution=64,
        train_batch_size=batch,
        max_train_steps=steps,
        seed=seed,
        output_dir=str(workdir / f"run-{name}-{seed}"),
        only_save_embeds=True,
        checkpointing_steps=None,
        save_steps=10**9,
        report_to="none",
        **SETTINGS[name],
    )
    if config.num_vectors not in scorers:
        scorers[config.num_vectors] = PlantedScorer(concept, num_vectors=config.num_vectors)
    curve = RecoveryCurve(scorers[config.num_vectors], every)
    started = time.perf_counter()
    train(config, show_progress=False, observers=[curve], latent_cache=concept.latents)
    return {
        "name": name,
        "seed": seed,
        "curve": curve,
        "final": curve.scores[steps],
        "to_0.8": curve.steps_to(0.8),
        "to_0.9": curve.steps_to(0.9),
        "seconds": time.perf_counter() - started,
        "lr": config.learning_rate * (batch if config.scale_lr else 1),
    }


def _steps(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


def print_table(results: list[dict[str, Any]], marks: list[int], several_seeds: bool) -> None:
    header = ["setting", "lr"] + [f"@{m}" for m in marks] + ["recovery", "cosine", "norm", "to 0.8", "to 0.9", "s"]
    rows = []
    for result in results:
        curve, final = result["curve"], result["final"]
        name = f"{result['name']} s{result['seed']}" if several_seeds else result["name"]
        rows.append(
            [name, f"{result['lr']:.3g}"]
            + [f"{curve.scores[m].recovery:.2f}" for m in marks]
            + [f"{final.recovery:.3f}", f"{final.cosine:.3f}", f"{final.norm_ratio:.2f}"]
            + [_steps(result["to_0.8"]), _steps(result["to_0.9"]), f"{result['seconds']:.0f}"]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def print_medians(results: list[dict[str, Any]], steps: int) -> None:
    """Per setting over the seeds: median steps to 0.8 / 0.9 (a miss counts as past the end) and final recovery."""
    print("medians over seeds (a miss counts as > the run's length):")
    for name in dict.fromkeys(result["name"] for result in results):
        mine = [result for result in results if result["name"] == name]

        def median_steps(key: str) -> str:
            value = statistics.median(result[key] if result[key] is not None else steps + 1 for result in mine)
            return f">{steps}" if value > steps else f"{value:g}"

        final = statistics.median(result["final"].recovery for result in mine)
        print(f"  {name}: to 0.8 {median_steps('to_0.8')}, to 0.9 {median_steps('to_0.9')}, final recovery {final:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="score every N steps (steps-to-0.8/0.9 resolution)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (data order, noise); the plant uses the first")
    parser.add_argument("--batch", type=int, default=16, help="train_batch_size (TrainConfig's default: 16)")
    parser.add_argument("--train_latents", type=int, default=64)
    parser.add_argument("--held_out", type=int, default=256)
    parser.add_argument("--teacher_seed", type=int, default=0)
    parser.add_argument("--teacher_steps", type=int, default=TeacherRecipe.steps)
    parser.add_argument("--cache_dir", default=str(Path("~/.cache/textinv-bench").expanduser()), help="where pre-trained teachers are kept")
    parser.add_argument("--variants", nargs="*", default=[], choices=VARIANTS + ["all"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    variants = VARIANTS if "all" in args.variants else args.variants
    started = time.perf_counter()
    recipe = TeacherRecipe(seed=args.teacher_seed, steps=args.teacher_steps)
    model_dir, report = teacher(Path(args.cache_dir), recipe)
    concept = plant(model_dir, recipe, seed=args.seeds[0], num_train=args.train_latents, num_held_out=args.held_out)
    scorers = {1: PlantedScorer(concept)}
    scorer = scorers[1]
    losses = word_losses(scorer, CONCEPT_WORDS)
    gap, error = scorer.gap(concept.initial, concept.target)
    print(
        f"teacher {model_dir.parent.name}: tiny {recipe.family} (text width {recipe.spec.text_hidden_size}, "
        f"UNet {recipe.spec.unet_channels}, {recipe.spec.sample_size // 8}x{recipe.spec.sample_size // 8} latents), "
        f"{len(recipe.words)} words, {recipe.steps} pre-training steps of batch {recipe.batch_size}, {report.summary()}"
    )
    print("held-out L(word): " + ", ".join(f"{word} {loss:.4f}" for word, loss in sorted(losses.items(), key=lambda item: item[1])))
    print(
        f"L({INITIAL_WORD}) - L({TARGET_WORD}) = {gap:.4f} +- {error:.4f} (paired standard error, {args.held_out} triples); "
        f"cosine({INITIAL_WORD}, {TARGET_WORD}) {float(torch.nn.functional.cosine_similarity(concept.initial, concept.target, dim=0)):.3f}; "
        f"set-up {time.perf_counter() - started:.0f} s"
    )
    sys.stdout.flush()
    results = []
    with tempfile.TemporaryDirectory(prefix="textinv-learning-") as tmp:
        for name in ["textinv", "reference", *variants]:
            for seed in args.seeds:
                result = run_setting(name, concept, scorers, args.steps, args.every, seed, args.batch, Path(tmp))
                results.append(result)
                print(
                    f"  {name} (seed {seed}): recovery {result['final'].recovery:.3f}, to 0.8 {_steps(result['to_0.8'])}, "
                    f"to 0.9 {_steps(result['to_0.9'])}, {result['seconds']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    marks = sorted({m for m in (20, 50, 100, 150, 200, 300, args.steps) if m <= args.steps and m % args.every == 0})
    print(f"{args.steps} steps, batch {args.batch}, {args.train_latents} training latents, {args.held_out} held-out triples, scored every {args.every} steps")
    print_table(results, marks, len(args.seeds) > 1)
    if len(args.seeds) > 1:
        print_medians(results, args.steps)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

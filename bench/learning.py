"""Does training find a planted concept, and in how many steps? (issue 8)

    python bench/learning.py                                   # textinv's defaults vs the reference's
    python bench/learning.py --steps 300 --seed 0 --variants snr5 logit_normal warmup500

A tiny pipeline (seeded random weights, real CLIP vocabulary) draws latents for prompts with
"star"; a placeholder starting from "shape" is trained on them with textinv's ``train()`` and scored
on held-out triples (textinv.planted). Prints, per setting: recovery at step marks, the final
recovery, cosine and norm ratio to the "star" row, and the first scored step at >= 0.8 / 0.9.
Deterministic for a seed. Everything is written to a temporary folder that is removed at the end.
Run with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from textinv.config import TrainConfig
from textinv.planted import INITIAL_WORD, PLACEHOLDER, TARGET_WORD, PlantedScorer, RecoveryCurve, plant, routing_strength
from textinv.training import train

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
    "warmup500": dict(lr_scheduler="constant_with_warmup"),  # the default 500 warm-up steps, actually applied
    "lr5e-4": dict(learning_rate=5e-4),
    "lr1e-3": dict(learning_rate=1e-3),
    "repeats1": dict(repeats=1),
    "reference_snr5": {**REFERENCE, "snr_gamma": 5.0},
    "reference_logit_normal": {**REFERENCE, "timestep_sampling": "logit_normal"},
}


def run_setting(name: str, concept: Any, scorer: PlantedScorer, steps: int, every: int, seed: int, batch: int, workdir: Path) -> dict[str, Any]:
    config = TrainConfig(
        pretrained_model_name_or_path=str(concept.model_dir),
        train_data_dir=str(workdir),  # unused: the latents come from the planted concept
        placeholder_token=PLACEHOLDER,
        initializer_token=INITIAL_WORD,
        resolution=64,
        train_batch_size=batch,
        max_train_steps=steps,
        seed=seed,
        output_dir=str(workdir / f"run-{name}"),
        only_save_embeds=True,
        checkpointing_steps=None,
        save_steps=10**9,
        report_to="none",
        **SETTINGS[name],
    )
    curve = RecoveryCurve(scorer, every)
    started = time.perf_counter()
    train(config, show_progress=False, observers=[curve], latent_cache=concept.latents)
    final = curve.scores[steps]
    return {
        "name": name,
        "curve": curve,
        "final": final,
        "to_0.8": curve.steps_to(0.8),
        "to_0.9": curve.steps_to(0.9),
        "seconds": time.perf_counter() - started,
        "lr": config.learning_rate * (batch if config.scale_lr else 1),
    }


def print_table(results: list[dict[str, Any]], marks: list[int]) -> None:
    header = ["setting", "lr"] + [f"@{m}" for m in marks] + ["recovery", "cosine", "norm", "to 0.8", "to 0.9", "s"]
    rows = []
    for result in results:
        curve, final = result["curve"], result["final"]
        rows.append(
            [result["name"], f"{result['lr']:.3g}"]
            + [f"{curve.scores[m].recovery:.2f}" for m in marks]
            + [f"{final.recovery:.2f}", f"{final.cosine:.3f}", f"{final.norm_ratio:.2f}"]
            + [str(result[key]) if result[key] is not None else "-" for key in ("to_0.8", "to_0.9")]
            + [f"{result['seconds']:.0f}"]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25, help="score every N steps (steps-to-0.8/0.9 resolution)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="train_batch_size (TrainConfig's default: 16)")
    parser.add_argument("--train_latents", type=int, default=64)
    parser.add_argument("--held_out", type=int, default=256)
    parser.add_argument("--variants", nargs="*", default=[], choices=[n for n in SETTINGS if n not in ("textinv", "reference")])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="textinv-learning-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        concept = plant(workdir, seed=args.seed, num_train=args.train_latents, num_held_out=args.held_out)
        scorer = PlantedScorer(concept)
        print(
            f"planted '{TARGET_WORD}' in a tiny pipeline (seed {args.seed}); start '{INITIAL_WORD}' "
            f"(cosine to target {float(torch.nn.functional.cosine_similarity(concept.initial, concept.target, dim=0)):.3f}); "
            f"L(init) {scorer.initial_loss:.5f}, L(target) {scorer.target_loss:.5f}; "
            f"swapping the word moves the UNet output by {100 * routing_strength(concept, scorer):.1f}% RMS; "
            f"set-up {time.perf_counter() - started:.0f} s"
        )
        results = [
            run_setting(name, concept, scorer, args.steps, args.every, args.seed, args.batch, workdir)
            for name in ["textinv", "reference", *args.variants]
        ]
    marks = sorted({m for m in range(args.every, args.steps + 1, args.every)} & {25, 50, 100, 150, 200, 300, args.steps})
    print(f"{args.steps} steps, batch {args.batch}, {args.train_latents} training latents, {args.held_out} held-out triples")
    print_table(results, marks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

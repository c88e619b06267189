"""Pivotal tuning where an embedding alone cannot reach the concept: a planted concept with a spatial part.

    OMP_NUM_THREADS=1 python bench/pivotal.py                          # 3 seeds, every family (docs/pivotal.md)
    OMP_NUM_THREADS=1 python bench/pivotal.py --seeds 1 --steps 60 --families sd2-v
    OMP_NUM_THREADS=1 python bench/pivotal.py --json /tmp/pivotal.json

The teachers are bench/planted.py's (``sd2-v``: a tiny UNet taught a flat per-channel mean per word) and
bench/planted_flow.py's (every other family: its denoiser taught the same kind of words through the family's own
encode/denoise and objective), cached under --cache_dir. The concept trained here is the target word's distribution *plus a spatial offset*: a fixed per-channel
direction times +1 on the top half of the latent and -1 on the bottom half. Its mean over the latent is zero, so the
target word is still the best word; but the teacher only ever learned flat patterns, so no word (and, in practice,
no input vector) makes it predict the offset. A LoRA on the denoiser can learn it. Per family and seed, at equal
steps and with textinv's defaults otherwise, a placeholder starting from the initial word is trained

- ``ti``: vectors only (``lora_rank`` 0); ``ti-x4``: the same with 4x the steps (where an embedding alone levels off);
- ``pivotal``: vectors + a LoRA of rank 4 with the LoRA defaults (alpha = rank, lr 1e-4);
- ``pivotal-lr1e-3``: the same with ``lora_learning_rate`` 1e-3.

Reported per run: textinv's own final held-out ``eval_loss`` (run.json; triples of the training latents), the loss on
fresh held-out latents of the concept with the run's denoiser (LoRA on for pivotal runs), the loss of the run's
vectors alone on the base teacher (LoRA off), and the recovery of those vectors on the plain word's held-out triples
(planted.py's score: 0 = the initial word, 1 = the target word). One torch thread, one process, runs in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

import planted  # noqa: E402
import planted_flow  # noqa: E402
from machine import cpu_name  # noqa: E402
from planted import PLACEHOLDER, HeldOut, _captions  # noqa: E402
from textinv import train  # noqa: E402
from textinv.config import TrainConfig  # noqa: E402
from textinv.events import TrainObserver  # noqa: E402
from textinv.models.loading import load_model_parts  # noqa: E402
from textinv.models.objectives import Objective, ObjectiveSettings  # noqa: E402
from textinv.training.loss import ObjectiveFor  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "ti": {},
    # TI with 4x the steps: how far an embedding alone gets when given more time (the plateau).
    "ti-x4": {"steps_factor": 4},
    "pivotal": {"lora_rank": 4},
    "pivotal-lr1e-3": {"lora_rank": 4, "lora_learning_rate": 1e-3},
}
# Flow families: the CLIP encoders learn the word (docs/encoders.md: the tiny teachers read it best there).
# The other families train the word in every encoder, textinv's default.
FLOW_ROLES = {"sd3": ["clip_l", "clip_g"], "flux": ["clip_l"]}
# sd2-v: bench/planted.py's teacher (the learning table of docs/quality.md). sd3/flux: bench/planted_flow.py's, one per seed
# (as bench/encoders.py). The others: planted_flow.py's teacher on the family's own objective, one per family.
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "zh-bert", "zh-xlmr", "sd3", "flux")
PER_SEED_TEACHER = ("sd3", "flux")
AMPLITUDE = 1.0  # of the spatial offset, per element (the words' channel means have std 1 too)


def spatial_offset(channels: int, side: int, amplitude: float = AMPLITUDE, seed: int = 0) -> torch.Tensor:
    """[channels, side, side]: a fixed direction over the channels (RMS ``amplitude``), + on the top half of the
    latent, - on the bottom half. Zero mean over the latent in every channel, so the words' flat means are unchanged.
    Rows, not columns: a horizontal flip would leave it as it is."""
    direction = torch.randn(channels, generator=torch.Generator().manual_seed(seed + 303))
    direction = direction * amplitude * channels**0.5 / direction.norm()
    rows = torch.where(torch.arange(side) < side // 2, 1.0, -1.0)
    return direction[:, None, None] * rows[None, :, None].expand(1, side, side)


def held_out_of(
    objective: Objective, draw: Callable[[torch.Generator, int], torch.Tensor], seed: int, count: int
) -> HeldOut:
    """Fresh scoring triples: ``count`` clean latents from ``draw``, noise, timesteps one per stratum (shuffled)."""
    generator = torch.Generator().manual_seed(seed + 2_000_003)  # a stream the plants do not use
    captions = _captions(count, generator, PLACEHOLDER)
    clean = draw(generator, count)
    noise = torch.randn(clean.shape, generator=generator)
    fractions = (torch.arange(count) + torch.rand(count, generator=generator)) / count
    steps = objective.stratified_timesteps(fractions[torch.randperm(count, generator=generator)])
    return HeldOut(
        captions,
        objective.noisy(clean, noise, steps),
        objective.target(clean, noise, steps).float(),
        objective.model_timesteps(steps),
    )


@dataclass
class Plant:
    """One family and seed: the plain plant (for the word's recovery) and the spatial concept trained here."""

    family: str
    seed: int
    plain: Any  # planted.PlantedConcept or planted_flow.FlowConcept
    spatial: Any  # the same type: the training latents and held-out triples of the spatial concept
    plain_scorer: Any  # planted.PlantedScorer or planted_flow.FlowScorer
    spatial_scorer: Any
    roles: list[str]  # the encoders that learn the word
    resolution: int

    def loss(self, vectors: dict[str, torch.Tensor], denoiser: Optional[torch.nn.Module] = None) -> float:
        """Mean loss on the spatial concept's held-out triples, with ``denoiser`` in place of the teacher's if given."""
        scorer = self.spatial_scorer
        base = scorer.parts.denoiser
        scorer.parts.denoiser = denoiser if denoiser is not None else base
        try:
            return float(scorer.loss(vectors["text_encoder"] if self.family == "sd2-v" else vectors))
        finally:
            scorer.parts.denoiser = base

    def recovery(self, vectors: dict[str, torch.Tensor]) -> float:
        """The vectors' recovery of the plain word on the base teacher (planted.py's score)."""
        if self.family == "sd2-v":
            return float(self.plain_scorer.score(vectors["text_encoder"]).recovery)
        return float(self.plain_scorer.recovery(vectors)[0])


def make_plant(
    family: str, seed: int, cache_dir: Path, num_train: int, num_held_out: int, teacher_steps: Optional[int] = None
) -> Plant:
    """The family's teacher (cached; ``teacher_steps``: a shorter pre-training, for tests) and seed's plant, and the
    spatial concept on top of it."""
    if family == "sd2-v":
        recipe: Any = planted.TeacherRecipe(steps=teacher_steps or planted.TeacherRecipe.steps)
        model_dir, _ = planted.teacher(cache_dir, recipe)
        plain: Any = planted.plant(model_dir, recipe, seed=seed, num_train=num_train, num_held_out=num_held_out)
        target, draw_words, channels = planted.TARGET_WORD, planted.draw_concept_latents, 4
    else:
        steps = teacher_steps or planted_flow.FlowTeacherRecipe.steps
        if family in PER_SEED_TEACHER:
            recipe = planted_flow.FlowTeacherRecipe(family=family, seed=seed, steps=steps)
        else:  # one teacher per family, as planted.py's; no encoder dropout, as planted.py's UNet teacher
            recipe = planted_flow.FlowTeacherRecipe(family=family, seed=0, steps=steps, clip_dropout=0.0)
        model_dir, _ = planted_flow.teacher(cache_dir, recipe)
        plain = planted_flow.plant(model_dir, recipe, seed, num_train, num_held_out)
        target, draw_words, channels = (
            planted_flow.TARGET_WORD,
            planted_flow.draw_concept_latents,
            recipe.latent_channels,
        )
    side = recipe.spec.sample_size // 8
    offset = spatial_offset(channels, side, seed=seed)
    index = recipe.words.index(target)

    def draw(generator: torch.Generator, count: int) -> torch.Tensor:
        return draw_words(recipe, torch.full((count,), index), generator) + offset

    # The training latents: the plain plant's, plus the offset (the cache holds unscaled latents).
    cache = plain.latents
    latents = dataclasses.replace(cache, mean=cache.mean + offset / cache.scaling_factor)
    if family == "sd2-v":
        plain_scorer: Any = planted.PlantedScorer(plain)
        roles = ["text_encoder"]
    else:
        roles = FLOW_ROLES.get(family) or [part.role for part in load_model_parts(str(model_dir)).text_encoders]
        plain_scorer = planted_flow.FlowScorer(plain, roles)
    objective = ObjectiveFor(plain_scorer.parts, ObjectiveSettings())((1, channels, side, side))
    spatial = dataclasses.replace(plain, latents=latents, held_out=held_out_of(objective, draw, seed, num_held_out))
    if family == "sd2-v":
        spatial_scorer: Any = planted.PlantedScorer(spatial)
    else:
        spatial_scorer = planted_flow.FlowScorer(spatial, roles)
    return Plant(family, seed, plain, spatial, plain_scorer, spatial_scorer, roles, recipe.spec.sample_size)


class Capture(TrainObserver):
    """Keeps the run's final vectors (by role) and its denoiser (with the LoRA adapters, if any)."""

    def __init__(self) -> None:
        self.vectors: dict[str, torch.Tensor] = {}
        self.denoiser: Optional[torch.nn.Module] = None

    def on_end(self, run: Any, result: Any) -> None:
        self.vectors = {role: v.detach().float().clone() for role, v in run.trainable.vectors_by_role().items()}
        self.denoiser = run.parts.denoiser


def run_one(plant: Plant, setting: str, steps: int, workdir: Path, **overrides: Any) -> dict[str, Any]:
    """Train ``setting`` (with TrainConfig ``overrides``) on the spatial concept and score it."""
    output_dir = workdir / f"{plant.family}-{plant.seed}-{setting}"
    values: dict[str, Any] = dict(
        pretrained_model_name_or_path=str(plant.spatial.model_dir),
        train_data_dir=str(workdir),  # unused: the latents come from the plant
        placeholder_token=PLACEHOLDER,
        initializer_token=planted.INITIAL_WORD if plant.family == "sd2-v" else planted_flow.INITIAL_WORD,
        resolution=plant.resolution,
        seed=plant.seed,
        output_dir=str(output_dir),
        only_save_embeds=True,
        checkpointing_steps=None,
        save_steps=10**9,
        report_to="none",
        eval_samples=64,
        **{key: value for key, value in SETTINGS[setting].items() if key != "steps_factor"},
    )
    values["max_train_steps"] = steps * SETTINGS[setting].get("steps_factor", 1)
    values["eval_steps"] = max(1, values["max_train_steps"] // 4)
    values.update(overrides)
    if plant.family in FLOW_ROLES:
        values["text_encoders"] = plant.roles
    if plant.family.startswith("zh"):
        values["language"] = "en"  # the teacher learned English captions (the tiny Chinese vocabularies hold them)
    capture = Capture()
    started = time.perf_counter()
    train(TrainConfig(**values), show_progress=False, observers=[capture], latent_cache=plant.spatial.latents)
    seconds = time.perf_counter() - started
    record = json.loads((output_dir / "run.json").read_text())
    curve = [(int(step), float(value)) for step, value in record["eval"]["losses"]]
    vectors = {role: capture.vectors[role] for role in plant.roles}
    base = plant.loss(vectors)
    own = plant.loss(vectors, capture.denoiser) if SETTINGS[setting].get("lora_rank") else base
    return {
        "family": plant.family,
        "seed": plant.seed,
        "setting": setting,
        "eval_loss": curve[-1][1],
        "eval_curve": curve,
        "held_out": own,  # fresh latents, the run's denoiser
        "vectors_on_teacher": base,  # fresh latents, the base teacher
        "recovery": plant.recovery(vectors),
        "seconds": seconds,
    }


def _spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one line per family and setting, mean [min, max] over the seeds."""
    lines = [
        "| family | setting | seeds | eval_loss (textinv) | held-out loss, own denoiser | vectors alone on the teacher "
        "| word recovery of the vectors | s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, setting in dict.fromkeys((row["family"], row["setting"]) for row in rows):
        mine = [row for row in rows if row["family"] == family and row["setting"] == setting]
        lines.append(
            f"| {family} | {setting} | {len(mine)} | {_spread([r['eval_loss'] for r in mine], 4)} | "
            f"{_spread([r['held_out'] for r in mine], 4)} | {_spread([r['vectors_on_teacher'] for r in mine], 4)} | "
            f"{_spread([r['recovery'] for r in mine], 2)} | {_spread([r['seconds'] for r in mine], 0)} |"
        )
    return lines


PAIRED_KEYS = ("eval_loss", "held_out", "vectors_on_teacher")


def paired(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: each setting minus ``ti`` on the same family and seed (negative: lower than TI), mean [min, max],
    and on how many seeds it is lower."""
    lines = [
        "| family | setting - ti | eval_loss (textinv) | held-out loss, own denoiser | vectors alone on the teacher |",
        "|---|---|---|---|---|",
    ]
    by_key = {(r["family"], r["seed"], r["setting"]): r for r in rows}
    for family, setting in dict.fromkeys((r["family"], r["setting"]) for r in rows if r["setting"] != "ti"):
        pairs = [
            (by_key[family, seed, setting], by_key[family, seed, "ti"])
            for (fam, seed, name) in by_key
            if fam == family and name == setting and (family, seed, "ti") in by_key
        ]
        if not pairs:
            continue
        cells = []
        for key in PAIRED_KEYS:
            differences = [mine[key] - ti[key] for mine, ti in pairs]
            below = sum(d < 0 for d in differences)
            cells.append(f"{_spread(differences, 4)} ({below}/{len(differences)} lower)")
        lines.append(f"| {family} | {setting} | " + " | ".join(cells) + " |")
    return lines


def header(argv: list[str]) -> list[str]:
    cpu = cpu_name()
    return [
        f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} cores (shared), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread; python {platform.python_version()}",
        "command: OMP_NUM_THREADS=1 python bench/pivotal.py " + " ".join(argv),
    ]


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: each its own plant and training draws")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--train_latents", type=int, default=64)
    parser.add_argument("--held_out", type=int, default=128)
    parser.add_argument("--cache_dir", type=Path, default=Path("~/.cache/textinv-bench").expanduser())
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = header(argv)
    rows: list[dict[str, Any]] = []
    references = []
    with tempfile.TemporaryDirectory(prefix="textinv-pivotal-") as tmp:
        for family in args.families:
            for seed in range(args.seeds):
                plant = make_plant(family, seed, args.cache_dir, args.train_latents, args.held_out)
                scorer = plant.spatial_scorer
                plain = plant.plain_scorer
                references.append(
                    f"- {family} seed {seed}: spatial concept: L(initial word) {scorer.initial_loss:.4f}, "
                    f"L(target word) {scorer.target_loss:.4f}; plain word (recovery's scale): L(initial word) - "
                    f"L(target word) = {plain.initial_loss - plain.target_loss:.4f}"
                )
                for setting in args.settings:
                    rows.append(run_one(plant, setting, args.steps, Path(tmp)))
                    row = rows[-1]
                    print(
                        f"  {family} seed {seed} {setting}: eval {row['eval_loss']:.4f}, held-out {row['held_out']:.4f}, "
                        f"vectors alone {row['vectors_on_teacher']:.4f}, {row['seconds']:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    lines += [
        f"{args.steps} steps, textinv's defaults otherwise; {args.train_latents} training latents, "
        f"{args.held_out} fresh held-out latents per seed; mean [min, max] over seeds {', '.join(map(str, range(args.seeds)))}",
        "",
        *table(rows),
        "",
        "Paired with ti on the same seed (the same plant, training draws and evaluation triples):",
        "",
        *paired(rows),
    ]
    lines += ["", "References (fresh held-out triples, words on the base teacher):", *references]
    lines.append(f"total {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"header": lines[:2], "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

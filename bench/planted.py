"""A planted concept: does training move a placeholder towards a known word's embedding? (issue 8)

A falling training loss on a random model proves little, and a random-weight UNet is no help
either: it is not the denoiser of its own samples, so the word that drew some latents is not the
word that explains them best. Here the answer is known because the model is taught it first.

**The teacher.** A tiny ``sd2-v`` pipeline (seeded random weights, the real CLIP vocabulary, its
random text encoder frozen as drawn, v-prediction) whose UNet is pre-trained here, seeded and on
the CPU, to denoise word-dependent latents. Each word of :data:`CONCEPT_WORDS` has its own
*pattern*: a fixed mean per latent channel. A latent of word ``w`` is ``pattern[w] + variation * z``
(``z`` standard normal per element); its caption is an object template with ``w`` in it ("a photo
of a star"). The pattern is flat over the latent, so the noisy input gives it away at low and
middle noise (64 pixels average the noise out); at high noise only the text tells it, and the
v-prediction target there is about minus the clean latent, so the UNet must read the word.
An epsilon (SD1) teacher carries the clean latent at high noise with weight sqrt(SNR) only (0.07
at t = 999) and did not learn to read the word in a few hundred steps (docs/quality.md "How well it learns").

**The plant.** The training set is drawn from the ``star`` distribution itself (not sampled from
the teacher): textual inversion learns from photos of a concept, not from the model's own
samples, and drawing them directly makes the set exact and cheap, whatever the tiny teacher's
sampling quality. A placeholder that starts from ``shape`` is trained on them with the usual
templates, through ``textinv.train(..., latent_cache=...)``, and scored on held-out (latent,
noise, timestep) triples of the same distribution and templates. With ``L(v)`` the mean
denoising loss there when ``v`` stands in for the word::

    recovery = (L(init) - L(learned)) / (L(init) - L(target))

plus the cosine and the norm ratio between the learned vector and the target row. Every draw is
seeded, so a teacher, a plant and a run are the same for the same seeds (on one machine and thread
count: CPU float sums may round differently elsewhere).

Used by ``bench/learning.py`` (the table in docs/quality.md "How well it learns") and tests/test_learning.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.data.latents import LatentCache
from textinv.data.templates import templates_for
from textinv.events import RunContext, StepState, TrainObserver
from textinv.models.conditioning import TrainableTextEncoders, add_placeholder, predict
from textinv.models.loading import ModelParts, load_model_parts
from textinv.models.tokens import expand_placeholder
from textinv.tiny import TinySpec, build_tiny_pipeline
from textinv.training.loss import loss_target

logger = logging.getLogger(__name__)

TARGET_WORD = "star"
INITIAL_WORD = "shape"
PLACEHOLDER = "<planted>"
# The words the teacher learns (one CLIP token each). More than the two that matter, so the UNet
# has to tell words apart rather than learn "star or not".
CONCEPT_WORDS = ("star", "shape", "circle", "square", "triangle", "heart", "moon", "cross", "cat", "dog", "toy", "cup")
# The widths of the tests' and demo's tiny pipelines: text width 32 (= cross-attention width), 2 text
# layers, UNet channels (32, 64), 64 px so 8x8 latents. docs/quality.md "How well it learns" says why this size.
PLANTED_SPEC = TinySpec()
TEACHER_FORMAT = 1  # bump when the teacher's recipe changes meaning, so old caches are not reused


@dataclass(frozen=True)
class TeacherRecipe:
    """How the teacher UNet is pre-trained (all seeded; the cache key is this, hashed)."""

    seed: int = 0  # the tiny pipeline's weights, the patterns and the pre-training draws
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 5e-3  # AdamW, 20 warm-up steps, then cosine decay to 0
    pattern_scale: float = 1.0  # std of each word's per-channel mean
    variation: float = 0.5  # std of the per-element variation around it
    # Timesteps t = T * u ** (1 / timestep_root), u uniform: 2 draws t with density ~ t, so the noisy
    # steps where only the text tells the pattern come up more often (1 = uniform).
    timestep_root: float = 2.0
    family: str = "sd2-v"  # textinv.tiny family: v-prediction (docs/quality.md "How well it learns" says why)
    words: tuple[str, ...] = CONCEPT_WORDS
    spec: TinySpec = PLANTED_SPEC

    def key(self) -> str:
        text = json.dumps({"format": TEACHER_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def concept_patterns(recipe: TeacherRecipe) -> torch.Tensor:
    """[words, 4]: each word's per-channel latent mean."""
    generator = torch.Generator().manual_seed(recipe.seed + 101)
    return torch.randn(len(recipe.words), 4, generator=generator) * recipe.pattern_scale


def draw_concept_latents(recipe: TeacherRecipe, word_indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[n, 4, side, side] scaled latents of the given words (one draw each)."""
    side = recipe.spec.sample_size // 8
    patterns = concept_patterns(recipe)[word_indices]
    variation = torch.randn(len(word_indices), 4, side, side, generator=generator) * recipe.variation
    return patterns[:, :, None, None] + variation


@dataclass
class TeacherReport:
    seconds: float
    losses: list[float]  # pre-training loss, every step

    def summary(self) -> str:
        def window(values: list[float]) -> float:
            return sum(values) / max(1, len(values))

        return f"pre-training loss {window(self.losses[:20]):.3f} -> {window(self.losses[-20:]):.3f} in {self.seconds:.0f} s"


def pretrain_teacher(model_dir: Path, recipe: TeacherRecipe) -> TeacherReport:
    """Teach the UNet of the pipeline in ``model_dir`` the words' patterns; rewrites its unet/ folder."""
    from diffusers import UNet2DConditionModel

    started = time.perf_counter()
    parts = load_model_parts(str(model_dir))
    unet = UNet2DConditionModel.from_pretrained(str(Path(model_dir) / "unet"))
    scheduler = parts.noise_scheduler
    templates = templates_for("object")
    # The text encoder stays frozen, so every (word, template) caption is encoded once.
    captions = [template.format(word) for word in recipe.words for template in templates]
    with torch.no_grad():
        ids = parts.tokenizer(
            captions,
            padding="max_length",
            max_length=parts.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = parts.text_encoder(ids)[0]
    generator = torch.Generator().manual_seed(recipe.seed + 202)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    warmup = 20

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    unet.train()
    losses = []
    for _ in range(recipe.steps):
        words = torch.randint(len(recipe.words), (recipe.batch_size,), generator=generator)
        picks = torch.randint(len(templates), (recipe.batch_size,), generator=generator)
        latents = draw_concept_latents(recipe, words, generator)
        noise = torch.randn(latents.shape, generator=generator)
        uniform = torch.rand(recipe.batch_size, generator=generator)
        timesteps = (
            (uniform ** (1 / recipe.timestep_root) * scheduler.config.num_train_timesteps)
            .long()
            .clamp(max=scheduler.config.num_train_timesteps - 1)
        )
        prediction = unet(
            scheduler.add_noise(latents, noise, timesteps), timesteps, hidden[words * len(templates) + picks]
        ).sample
        loss = torch.nn.functional.mse_loss(prediction, loss_target(scheduler, latents, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(float(loss.detach()))
    unet.eval()
    unet.save_pretrained(str(Path(model_dir) / "unet"))
    return TeacherReport(time.perf_counter() - started, losses)


def teacher(
    cache_dir: Path,
    recipe: Any = TeacherRecipe(),
    folder_prefix: str = "teacher",
    pretrain: Optional[Callable[[Path, Any], TeacherReport]] = None,
) -> tuple[Path, TeacherReport]:
    """The teacher pipeline folder for ``recipe`` under ``cache_dir`` (built and pre-trained once, by ``pretrain``:
    this module's UNet teacher by default; bench/planted_flow.py passes its flow-matching one)."""
    from textinv.files import atomic_dir

    folder = Path(cache_dir).expanduser() / f"{folder_prefix}-{recipe.key()}"
    record = folder / "teacher.json"
    if not record.is_file():
        with atomic_dir(folder) as tmp:
            model_dir = build_tiny_pipeline(tmp / "model", family=recipe.family, seed=recipe.seed, spec=recipe.spec)
            report = (pretrain or pretrain_teacher)(model_dir, recipe)
            (tmp / "teacher.json").write_text(
                json.dumps({"recipe": dataclasses.asdict(recipe), **dataclasses.asdict(report)})
            )
        logger.info("pre-trained a planted-concept teacher in %s (%s)", folder, report.summary())
    saved = json.loads(record.read_text())
    return folder / "model", TeacherReport(saved["seconds"], saved["losses"])


@dataclass
class HeldOut:
    """Fixed scoring triples: the same noisy latents, noise and timesteps for every vector scored."""

    captions: list[str]  # templates with PLACEHOLDER where the word goes
    noisy: torch.Tensor
    target: torch.Tensor  # what the UNet should predict (the noise, or the velocity for v-prediction)
    timesteps: torch.Tensor


@dataclass
class PlantedConcept:
    model_dir: Path
    latents: LatentCache  # the training set: latents of TARGET_WORD's distribution
    held_out: HeldOut
    target: torch.Tensor  # [dim]: the row of TARGET_WORD
    initial: torch.Tensor  # [dim]: the row of INITIAL_WORD
    seed: int
    recipe: TeacherRecipe


def _word_row(parts: ModelParts, word: str) -> torch.Tensor:
    ids = parts.tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens; the planted word must be one")
    return parts.text_encoder.get_input_embeddings().weight[ids[0]].detach().float().clone()


def _captions(count: int, generator: torch.Generator, word: str) -> list[str]:
    templates = templates_for("object")
    picks = torch.randint(len(templates), (count,), generator=generator)
    return [templates[int(index)].format(word) for index in picks]


def plant(
    model_dir: Path,
    recipe: TeacherRecipe = TeacherRecipe(),
    seed: int = 0,
    num_train: int = 64,
    num_held_out: int = 256,
) -> PlantedConcept:
    """Draw the training latents and held-out triples of TARGET_WORD for the teacher in ``model_dir``."""
    parts = load_model_parts(str(model_dir))
    target_index = torch.full((num_train,), recipe.words.index(TARGET_WORD))
    generator = torch.Generator().manual_seed(seed + 1)
    train_latents = draw_concept_latents(recipe, target_index, generator)
    scaling = float(parts.vae.config.scaling_factor)
    cache = LatentCache(
        mean=(train_latents / scaling).unsqueeze(1),  # [N, 1 flip, C, h, w]; LatentCache.sample scales back
        std=torch.zeros_like(train_latents).unsqueeze(1),  # fixed "images", as a real training set
        scaling_factor=scaling,
    )
    # Held-out: new latents of the same distribution, fresh noise, timesteps drawn uniformly.
    held_generator = torch.Generator().manual_seed(seed + 1_000_003)
    captions = _captions(num_held_out, held_generator, PLACEHOLDER)
    held_latents = draw_concept_latents(
        recipe, torch.full((num_held_out,), recipe.words.index(TARGET_WORD)), held_generator
    )
    noise = torch.randn(held_latents.shape, generator=held_generator)
    timesteps = torch.randint(
        0, parts.noise_scheduler.config.num_train_timesteps, (num_held_out,), generator=held_generator
    )
    scheduler = parts.noise_scheduler
    held_out = HeldOut(
        captions,
        scheduler.add_noise(held_latents, noise, timesteps),
        loss_target(scheduler, held_latents, noise, timesteps),
        timesteps,
    )
    return PlantedConcept(
        Path(model_dir), cache, held_out, _word_row(parts, TARGET_WORD), _word_row(parts, INITIAL_WORD), seed, recipe
    )


@dataclass
class Score:
    recovery: float
    cosine: float  # of the learned vector to the target row (the best of several vectors)
    norm_ratio: float  # |learned| / |target| (of that vector)
    loss: float


class PlantedScorer:
    """L(v): the mean denoising loss on the held-out triples with ``v`` in place of the word.

    ``num_vectors`` > 1 scores a multi-vector placeholder (captions hold all its tokens). L(init)
    and L(target) are always those of one vector (``shape``, ``star``), so recoveries compare.
    """

    def __init__(self, concept: PlantedConcept, num_vectors: int = 1, batch_size: int = 128) -> None:
        self.concept, self.batch_size, self.num_vectors = concept, batch_size, num_vectors
        self.parts = load_model_parts(str(concept.model_dir))
        self.tokens: TrainableTextEncoders = add_placeholder(self.parts, PLACEHOLDER, num_vectors, INITIAL_WORD)
        self.initial_loss = self.loss(concept.initial)
        self.target_loss = self.loss(concept.target)
        if not self.target_loss < self.initial_loss:
            logger.warning(
                "the planted word does not score better than the initial one (%.6f >= %.6f)",
                self.target_loss,
                self.initial_loss,
            )

    @torch.no_grad()
    def per_triple(self, vectors: torch.Tensor) -> torch.Tensor:
        """[held-out]: each triple's loss; ``vectors`` is [dim] (one vector) or [num_vectors, dim]."""
        vectors = vectors.detach().float().reshape(-1, self.tokens.vectors.shape[-1])
        count = vectors.shape[0]
        self.tokens.vectors[:count].copy_(vectors)
        held = self.concept.held_out
        captions = [expand_placeholder(caption, PLACEHOLDER, count) for caption in held.captions]
        losses = []
        for start in range(0, len(captions), self.batch_size):
            end = start + self.batch_size
            prediction = predict(
                self.tokens,
                self.parts,
                captions[start:end],
                held.noisy[start:end],
                held.timesteps[start:end],
                torch.device("cpu"),
            )
            losses.append((prediction.float() - held.target[start:end]).pow(2).flatten(1).mean(1))
        return torch.cat(losses)

    def loss(self, vectors: torch.Tensor) -> float:
        return float(self.per_triple(vectors).double().mean())

    def word_loss(self, word: str) -> float:
        return self.loss(_word_row(self.parts, word))

    def gap(self, worse: torch.Tensor, better: torch.Tensor) -> tuple[float, float]:
        """(mean, standard error) of L(worse) - L(better), paired over the held-out triples."""
        difference = (self.per_triple(worse) - self.per_triple(better)).double()
        return float(difference.mean()), float(difference.std() / math.sqrt(len(difference)))

    def score(self, vectors: torch.Tensor) -> Score:
        learned_loss = self.loss(vectors)
        rows = vectors.detach().float().reshape(-1, self.concept.target.shape[0])
        cosines = torch.nn.functional.cosine_similarity(rows, self.concept.target.unsqueeze(0), dim=1)
        best = int(cosines.argmax())
        return Score(
            recovery=(self.initial_loss - learned_loss) / (self.initial_loss - self.target_loss),
            cosine=float(cosines[best]),
            norm_ratio=float(rows[best].norm() / self.concept.target.norm()),
            loss=learned_loss,
        )


@dataclass
class RecoveryCurve(TrainObserver):
    """Scores the placeholder every ``every`` steps, at every held-out evaluation and at the end (main process)."""

    scorer: PlantedScorer
    every: int
    scores: dict[int, Score] = field(default_factory=dict)
    extra_steps: frozenset[int] = frozenset()  # scored too (finer early: steps to 0.9)

    def on_start(self, run: RunContext) -> None:
        if run.is_main_process and run.start_step == 0:
            self.scores[0] = self.scorer.score(run.trainable.vectors.detach().cpu())  # recovery 0: the initial word

    def on_step(self, run: RunContext, state: StepState) -> None:
        due = state.step % self.every == 0 or state.step in self.extra_steps
        due = due or state.step == state.max_steps or state.eval_loss is not None
        if run.is_main_process and due:
            self.scores[state.step] = self.scorer.score(run.trainable.vectors.detach().cpu())

    def steps_to(self, recovery: float) -> Optional[int]:
        """First scored step at or above ``recovery`` (None if never)."""
        return next((step for step, score in sorted(self.scores.items()) if score.recovery >= recovery), None)


def word_losses(scorer: PlantedScorer, words: Sequence[str]) -> dict[str, float]:
    """L(word) on the held-out triples for each word: the target's should be clearly the lowest."""
    return {word: scorer.word_loss(word) for word in words}

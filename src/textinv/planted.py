"""A planted concept: does training move a placeholder towards a known word's embedding? (issue 8)

A falling training loss on a random model proves little. Here the answer is known: a tiny pipeline
(seeded random weights, the real CLIP vocabulary) draws latents for prompts containing a target
word (``star``); a placeholder that starts from another word (``shape``) is trained on them with
the usual templates, and is scored on held-out (latent, noise, timestep) triples with the same
prompts. With ``L(v)`` the mean denoising loss there when ``v`` stands in for the word::

    recovery = (L(init) - L(learned)) / (L(init) - L(target))

plus the cosine and the norm ratio between the learned vector and the target row. Every draw is
seeded, so a setup and a run are the same for the same seed.

Used by ``bench/learning.py`` (the table in README "How well it learns") and tests/test_learning.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from textinv.conditioning import TrainableTextEncoders, add_placeholder, predict
from textinv.data import LatentCache
from textinv.models import ModelParts, load_model_parts
from textinv.templates import templates_for
from textinv.tiny import TinySpec, build_tiny_pipeline
from textinv.training import RunContext, StepState, TrainObserver

logger = logging.getLogger(__name__)

TARGET_WORD = "star"
INITIAL_WORD = "shape"
PLACEHOLDER = "<planted>"
# The tiny pipeline of the tests and demo (text width 32 = cross-attention width, 64 px so 8x8
# latents): ~0.15 s per batch-16 step on one core. bench/learning.py reports how strongly its
# text encoder routes the word into the UNet and why a larger model was not chosen.
PLANTED_SPEC = TinySpec()
SAMPLING_STEPS = 20  # DDIM steps for drawing the training latents


@dataclass
class HeldOut:
    """Fixed scoring triples: the same noisy latents, noise and timesteps for every vector scored."""

    captions: list[str]  # templates with PLACEHOLDER where the word goes
    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class PlantedConcept:
    model_dir: Path
    latents: LatentCache  # the training set, drawn by the pipeline for prompts with TARGET_WORD
    held_out: HeldOut
    target: torch.Tensor  # [dim]: the row of TARGET_WORD
    initial: torch.Tensor  # [dim]: the row of INITIAL_WORD
    seed: int


def _word_row(parts: ModelParts, word: str) -> torch.Tensor:
    ids = parts.tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens; the planted word must be one")
    return parts.text_encoder.get_input_embeddings().weight[ids[0]].detach().float().clone()


def _captions(count: int, generator: torch.Generator, word: str) -> list[str]:
    templates = templates_for("object")
    picks = torch.randint(len(templates), (count,), generator=generator)
    return [templates[int(index)].format(word) for index in picks]


@torch.no_grad()
def draw_latents(parts: ModelParts, captions: Sequence[str], seeds: Sequence[int], steps: int = SAMPLING_STEPS) -> torch.Tensor:
    """Scaled latents the pipeline itself generates for ``captions`` (DDIM, no guidance), one seed each."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    ids = parts.tokenizer(list(captions), padding="max_length", max_length=parts.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = parts.text_encoder(ids)[0]
    side = int(parts.unet.config.sample_size)
    channels = int(parts.unet.config.in_channels)
    latents = torch.stack([torch.randn(channels, side, side, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    for timestep in scheduler.timesteps:
        latents = scheduler.step(parts.unet(latents, timestep, hidden).sample, timestep, latents).prev_sample
    return latents


def plant(
    workdir: Path,
    seed: int = 0,
    num_train: int = 64,
    num_held_out: int = 256,
    spec: TinySpec = PLANTED_SPEC,
    sampling_steps: int = SAMPLING_STEPS,
) -> PlantedConcept:
    """Build the pipeline in ``workdir``/model, draw its training latents and held-out triples."""
    model_dir = build_tiny_pipeline(Path(workdir) / "model", seed=seed, spec=spec)
    parts = load_model_parts(str(model_dir))
    generator = torch.Generator().manual_seed(seed + 1)
    # Training latents: "images" of the target word, each from its own seed and template.
    train_latents = draw_latents(parts, _captions(num_train, generator, TARGET_WORD), range(num_train), sampling_steps)
    scaling = float(parts.vae.config.scaling_factor)
    cache = LatentCache(
        mean=(train_latents / scaling).unsqueeze(1),  # [N, 1 flip, C, h, w]; LatentCache.sample scales back
        std=torch.zeros_like(train_latents).unsqueeze(1),
        scaling_factor=scaling,
    )
    # Held-out: new latents (other seeds), fresh noise and timesteps drawn uniformly.
    captions = _captions(num_held_out, generator, TARGET_WORD)
    held_latents = draw_latents(parts, captions, range(10_000, 10_000 + num_held_out), sampling_steps)
    noise = torch.randn(held_latents.shape, generator=generator)
    timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (num_held_out,), generator=generator)
    held_out = HeldOut(
        captions=[caption.replace(TARGET_WORD, PLACEHOLDER) for caption in captions],
        noisy=parts.noise_scheduler.add_noise(held_latents, noise, timesteps),
        noise=noise,
        timesteps=timesteps,
    )
    return PlantedConcept(model_dir, cache, held_out, _word_row(parts, TARGET_WORD), _word_row(parts, INITIAL_WORD), seed)


class PlantedScorer:
    """L(v): the mean denoising loss on the held-out triples with ``v`` in place of the word."""

    def __init__(self, concept: PlantedConcept, batch_size: int = 128) -> None:
        self.concept, self.batch_size = concept, batch_size
        self.parts = load_model_parts(str(concept.model_dir))
        self.tokens: TrainableTextEncoders = add_placeholder(self.parts, PLACEHOLDER, 1, INITIAL_WORD)
        self.initial_loss = self.loss(concept.initial)
        self.target_loss = self.loss(concept.target)
        if not self.target_loss < self.initial_loss:
            logger.warning("the planted word does not score better than the initial one (%.6f >= %.6f)", self.target_loss, self.initial_loss)

    @torch.no_grad()
    def loss(self, vector: torch.Tensor) -> float:
        self.tokens.vectors.copy_(vector.detach().reshape(self.tokens.vectors.shape).float())
        held, total = self.concept.held_out, 0.0
        for start in range(0, len(held.captions), self.batch_size):
            end = start + self.batch_size
            prediction = predict(self.tokens, self.parts, held.captions[start:end], held.noisy[start:end], held.timesteps[start:end], torch.device("cpu"))
            total += float((prediction.float() - held.noise[start:end]).pow(2).mean()) * (min(end, len(held.captions)) - start)
        return total / len(held.captions)

    def score(self, vector: torch.Tensor) -> "Score":
        learned_loss = self.loss(vector)
        target = self.concept.target
        vector = vector.detach().float().reshape(-1)
        return Score(
            recovery=(self.initial_loss - learned_loss) / (self.initial_loss - self.target_loss),
            cosine=float(torch.nn.functional.cosine_similarity(vector, target, dim=0)),
            norm_ratio=float(vector.norm() / target.norm()),
            loss=learned_loss,
        )


@dataclass
class Score:
    recovery: float
    cosine: float
    norm_ratio: float
    loss: float


@dataclass
class RecoveryCurve(TrainObserver):
    """Scores the placeholder every ``every`` steps while training (main process)."""

    scorer: PlantedScorer
    every: int
    scores: dict[int, Score] = field(default_factory=dict)

    def on_step(self, run: RunContext, state: StepState) -> None:
        if run.is_main_process and (state.step % self.every == 0 or state.step == state.max_steps):
            self.scores[state.step] = self.scorer.score(run.trainable.vectors.detach().cpu()[0])

    def steps_to(self, recovery: float) -> Optional[int]:
        """First scored step at or above ``recovery`` (None if never)."""
        return next((step for step, score in sorted(self.scores.items()) if score.recovery >= recovery), None)


def routing_strength(concept: PlantedConcept, scorer: PlantedScorer) -> float:
    """How much swapping the initial word for the target changes the UNet's prediction (relative RMS)."""
    held = concept.held_out
    with torch.no_grad():
        outputs = []
        for vector in (concept.initial, concept.target):
            scorer.tokens.vectors.copy_(vector.reshape(scorer.tokens.vectors.shape))
            outputs.append(predict(scorer.tokens, scorer.parts, held.captions[:64], held.noisy[:64], held.timesteps[:64], torch.device("cpu")))
    return float((outputs[0] - outputs[1]).pow(2).mean().sqrt() / outputs[1].pow(2).mean().sqrt())


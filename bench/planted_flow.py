"""A planted concept for the flow-matching families (SD3/3.5, Flux.1): bench/planted.py's idea on a transformer.

**The teacher.** A tiny ``sd3`` or ``flux`` pipeline (``textinv.tiny``: seeded random weights, the real CLIP
vocabulary, the tiny T5 vocabulary) whose transformer is pre-trained here, seeded and on the CPU, with the
rectified-flow objective textinv trains with, on word-dependent latents. Each word of :data:`CONCEPT_WORDS` has
its own *pattern*, a fixed mean per latent channel (16 channels); a latent of word ``w`` is
``pattern[w] + variation * z``, captioned with an object template holding ``w``. Every text encoder stays frozen
as drawn, and the captions are encoded exactly as training encodes them (the family's ``call_encoder`` and
``encode``, padded to the family's lengths), so the transformer learns to read the word from whatever the family
feeds it: SD3's joint CLIP-L + CLIP-G + T5 sequence and both CLIP pooled vectors; Flux's T5 sequence and CLIP-L's
pooled vector. At high noise the velocity target (noise - x0) needs the clean latent, which only the text tells.

Two things make it read T5 too (measured while building this; docs/encoders.md): each encoder's output is replaced
by the empty caption's with probability 0.463, independently (SD3's training recipe; without it the transformer reads
CLIP alone), and the first :attr:`FlowTeacherRecipe.short_steps` steps pad T5 to 32 tokens only (at 256/512 tokens
the word is one position among pads, and 1200 full-length steps taught the tiny transformer nothing from T5). The
last steps use the family's lengths, so the teacher ends on exactly what training feeds it.

**The words.** Every concept word is one token in the CLIP BPE vocabulary *and* in the tiny T5 vocabulary
(``textinv.models.families.tiny_flow.t5_tokenizer``: template words, ``TINY_ENGLISH_WORDS``; "star" would be four
T5 pieces), and none is a word of the object templates. So "the true word" is one row in every encoder.

**The plant and the score** are planted.py's: training latents drawn from :data:`TARGET_WORD`'s distribution, a
placeholder starting from :data:`INITIAL_WORD`, and on held-out (latent, noise, sigma) triples
``recovery = (L(init) - L(learned)) / (L(init) - L(target))``. Here the encoders that learn the word are a choice
(``TrainConfig.text_encoders``), so L is defined per encoder set: the trained encoders get the vectors (init: the
initial word's rows, target: the true word's rows), the others read the caption's bare placeholder text, as they
do in training and when the file is used.

**Any family.** Nothing here is flow-specific but the defaults: the teacher reads the family's ``encode``, calls its
``denoise`` and trains with the objective textinv trains that family with (``ObjectiveFor``), so bench/pivotal.py uses
it for the UNet families too (SD 1.x/2.x, SDXL, the Chinese encoders: 4 latent channels, their DDPM objective; the
concept words are one token in their tiny vocabularies as well). There the encoder dropout is set to 0, as planted.py's
UNet teacher has none.

Used by bench/encoders.py, bench/pivotal.py and tests/test_planted_flow.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import planted
from planted import PLACEHOLDER, HeldOut, TeacherReport, _captions
from textinv.data.latents import LatentCache
from textinv.data.templates import templates_for
from textinv.models.conditioning import TrainableTextEncoders, add_placeholder, predict, tokenize
from textinv.models.families.base import DenoiserCall, EncoderOutput, TextConditioning
from textinv.models.loading import ModelParts, load_model_parts
from textinv.models.objectives import Objective, ObjectiveSettings
from textinv.tiny import TinySpec
from textinv.training.loss import ObjectiveFor

logger = logging.getLogger(__name__)

TARGET_WORD = "toy"
INITIAL_WORD = "dog"
# One token in CLIP's BPE and in the tiny T5 vocabulary, and in no object template.
CONCEPT_WORDS = ("toy", "dog", "cat", "backpack", "beach", "cartoon", "painting", "picture", "red", "art")
FLOW_LATENT_CHANNELS = 16  # SD3/Flux VAEs; the SD 1.x/2.x/XL VAEs have 4
FLOW_TEACHER_FORMAT = 1  # bump when the recipe changes meaning, so old caches are not reused


@dataclass(frozen=True)
class FlowTeacherRecipe:
    """How the teacher transformer is pre-trained (all seeded; the cache key is this, hashed)."""

    family: str = "sd3"  # textinv.tiny family: sd3 or flux
    seed: int = 0  # the pipeline's weights, the patterns and the pre-training draws
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 5e-3  # AdamW, 20 warm-up steps, then cosine decay to 0
    pattern_scale: float = 1.0  # std of each word's per-channel mean
    variation: float = 0.5  # std of the per-element variation around it
    # Each encoder's output is the empty caption's with this probability, independently (SD3's training recipe
    # drops each encoder with 0.463): without it the transformer reads the word from CLIP alone and ignores T5.
    clip_dropout: float = 0.463
    t5_dropout: float = 0.463
    # A curriculum: the first steps pad T5 to this many tokens only, the rest to the family's length (what training
    # feeds). At 256/512 tokens the word is one position among pads, and a tiny transformer pre-trained at that length
    # alone did not learn to read it in 1200 steps; learned on a short sequence, the reading carries over.
    short_t5_length: int = 32
    short_steps: int = 400
    words: tuple[str, ...] = CONCEPT_WORDS
    spec: TinySpec = TinySpec()

    def key(self) -> str:
        text = json.dumps({"format": FLOW_TEACHER_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def latent_side(self) -> int:
        return self.spec.sample_size // 8

    @property
    def latent_channels(self) -> int:
        from textinv.models.families import get_family

        return FLOW_LATENT_CHANNELS if get_family(self.family).objective == "flow" else 4


def concept_patterns(recipe: FlowTeacherRecipe) -> torch.Tensor:
    """[words, channels]: each word's per-channel latent mean."""
    generator = torch.Generator().manual_seed(recipe.seed + 101)
    return torch.randn(len(recipe.words), recipe.latent_channels, generator=generator) * recipe.pattern_scale


def draw_concept_latents(
    recipe: FlowTeacherRecipe, word_indices: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """[n, channels, side, side] latents (as the denoiser sees them: scaled and shifted) of the given words."""
    side, channels = recipe.latent_side, recipe.latent_channels
    patterns = concept_patterns(recipe)[word_indices]
    variation = torch.randn(len(word_indices), channels, side, side, generator=generator) * recipe.variation
    return patterns[:, :, None, None] + variation


def objective_of(parts: ModelParts, recipe: FlowTeacherRecipe) -> Objective:
    """The objective textinv trains this family with at the recipe's size (default settings: u uniform, the
    scheduler's shift; Flux's dynamic shift for this many patches)."""
    return ObjectiveFor(parts, ObjectiveSettings())((1, recipe.latent_channels, recipe.latent_side, recipe.latent_side))


@torch.no_grad()
def encoder_outputs(
    parts: ModelParts, captions: Sequence[str], t5_length: Optional[int] = None
) -> dict[str, EncoderOutput]:
    """{role: output} of every (frozen) text encoder for ``captions``, called as training calls it (T5 padded to
    ``t5_length`` tokens if given, else to the family's length)."""
    outputs = {}
    for part in parts.text_encoders:
        length = t5_length if t5_length is not None and part.kind == "t5" else part.max_length
        ids = tokenize(part.tokenizer, captions, length).input_ids
        outputs[part.role] = parts.family.call_encoder(part.spec, part.text_encoder, ids, None)
    return outputs


def _pick(
    rows: Optional[torch.Tensor], empty: Optional[torch.Tensor], index: torch.Tensor, drop: torch.Tensor
) -> Optional[torch.Tensor]:
    """``rows[index]``, with the empty caption's row where ``drop``."""
    if rows is None or empty is None:
        return None
    chosen = rows[index]
    return torch.where(drop.reshape(-1, *([1] * (chosen.dim() - 1))), empty.expand_as(chosen), chosen)


def drop_encoders(
    parts: ModelParts,
    outputs: dict[str, EncoderOutput],
    empty: dict[str, EncoderOutput],
    index: torch.Tensor,
    probability: dict[str, float],
    generator: torch.Generator,
) -> TextConditioning:
    """The conditioning of captions ``index``, each encoder's output replaced by the empty caption's with
    ``probability[role]``, independently per encoder and example (SD3's training drops each of its three text encoders
    independently, with probability 0.463: Esser et al. 2024, arXiv:2403.03206)."""
    picked = {}
    for role, output in outputs.items():
        drop = torch.rand(len(index), generator=generator) < probability[role]
        picked[role] = EncoderOutput(
            _pick(output.sequence, empty[role].sequence, index, drop),
            _pick(output.pooled, empty[role].pooled, index, drop),
        )
    return parts.family.encode(parts, picked)


def denoise(
    parts: ModelParts, conditioning: TextConditioning, noisy: torch.Tensor, sigmas: torch.Tensor, objective: Objective
) -> torch.Tensor:
    """The family's denoiser call at flow-matching ``sigmas`` (model timesteps as training passes them)."""
    call = DenoiserCall(noisy, objective.model_timesteps(sigmas), parts.vae_scale_factor)
    return parts.family.denoise(parts, conditioning, call)


def pretrain_teacher(model_dir: Path, recipe: FlowTeacherRecipe) -> TeacherReport:
    """Teach the transformer of the pipeline in ``model_dir`` the words' patterns; rewrites its transformer/ folder."""
    started = time.perf_counter()
    parts = load_model_parts(str(model_dir))
    objective = objective_of(parts, recipe)
    templates = templates_for("object")
    # The text encoders stay frozen, so every (word, template) caption is encoded once.
    captions = [t.format(w) for w in recipe.words for t in templates]
    short = (
        encoder_outputs(parts, captions, recipe.short_t5_length),
        encoder_outputs(parts, [""], recipe.short_t5_length),
    )
    full = encoder_outputs(parts, captions), encoder_outputs(parts, [""])
    dropout = {
        part.role: recipe.t5_dropout if part.kind == "t5" else recipe.clip_dropout for part in parts.text_encoders
    }
    transformer = parts.denoiser
    transformer.requires_grad_(True)
    transformer.train()
    generator = torch.Generator().manual_seed(recipe.seed + 202)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    warmup = 20

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    for step in range(recipe.steps):
        outputs, empty = short if step < recipe.short_steps else full
        words = torch.randint(len(recipe.words), (recipe.batch_size,), generator=generator)
        picks = torch.randint(len(templates), (recipe.batch_size,), generator=generator)
        latents = draw_concept_latents(recipe, words, generator)
        noise = torch.randn(latents.shape, generator=generator)
        # Sigmas as training draws them (u uniform on the family's shifted grid).
        sigmas = objective.stratified_timesteps(torch.rand(recipe.batch_size, generator=generator))
        batch = drop_encoders(parts, outputs, empty, words * len(templates) + picks, dropout, generator)
        prediction = denoise(parts, batch, objective.noisy(latents, noise, sigmas), sigmas, objective)
        loss = torch.nn.functional.mse_loss(prediction.float(), objective.target(latents, noise, sigmas))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    transformer.eval()
    transformer.save_pretrained(str(Path(model_dir) / parts.family.denoiser_slot))
    return TeacherReport(time.perf_counter() - started, losses)


def teacher(cache_dir: Path, recipe: FlowTeacherRecipe) -> tuple[Path, TeacherReport]:
    """The teacher pipeline folder for ``recipe`` under ``cache_dir`` (built and pre-trained once)."""
    return planted.teacher(cache_dir, recipe, f"flow-teacher-{recipe.family}", pretrain_teacher)


@dataclass
class FlowConcept:
    """A teacher and one plant: the training latents of TARGET_WORD and the held-out scoring triples."""

    model_dir: Path
    latents: LatentCache  # scaling 1, shift 0: the drawn latents are what the transformer sees
    held_out: HeldOut  # timesteps: the denoiser's (sigma * T), as training passes them
    seed: int
    recipe: FlowTeacherRecipe


def plant(
    model_dir: Path, recipe: FlowTeacherRecipe, seed: int = 0, num_train: int = 64, num_held_out: int = 128
) -> FlowConcept:
    """Draw the training latents and held-out triples of TARGET_WORD for the teacher in ``model_dir``."""
    parts = load_model_parts(str(model_dir))
    objective = objective_of(parts, recipe)
    target = recipe.words.index(TARGET_WORD)
    train_latents = draw_concept_latents(
        recipe, torch.full((num_train,), target), torch.Generator().manual_seed(seed + 1)
    )
    cache = LatentCache(
        mean=train_latents.unsqueeze(1),  # [N, 1 flip, C, h, w]
        std=torch.zeros_like(train_latents).unsqueeze(1),  # fixed "images", as a real training set
        scaling_factor=1.0,
    )
    held_generator = torch.Generator().manual_seed(seed + 1_000_003)
    captions = _captions(num_held_out, held_generator, PLACEHOLDER)
    held_latents = draw_concept_latents(recipe, torch.full((num_held_out,), target), held_generator)
    noise = torch.randn(held_latents.shape, generator=held_generator)
    # Stratified sigmas (one per stratum, shuffled): the whole noise range, evenly.
    fractions = (torch.arange(num_held_out) + torch.rand(num_held_out, generator=held_generator)) / num_held_out
    sigmas = objective.stratified_timesteps(fractions[torch.randperm(num_held_out, generator=held_generator)])
    held_out = HeldOut(
        captions,
        objective.noisy(held_latents, noise, sigmas),
        objective.target(held_latents, noise, sigmas),
        objective.model_timesteps(sigmas),
    )
    return FlowConcept(Path(model_dir), cache, held_out, seed, recipe)


def word_rows(parts: ModelParts, word: str, roles: Sequence[str]) -> dict[str, torch.Tensor]:
    """{role: [dim]}: ``word``'s input-embedding row in each encoder of ``roles`` (it must be one token there)."""
    rows = {}
    for role in roles:
        part = parts.encoder_part(role)
        ids = part.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens for {role}; the planted words must be one")
        rows[role] = part.text_encoder.get_input_embeddings().weight[ids[0]].detach().float().clone()
    return rows


class FlowScorer:
    """L(v): the mean denoising loss on the held-out triples with ``v`` ({role: [dim]}) as the placeholder's vectors
    in the encoders of ``roles``; the other encoders read the bare placeholder text (their outputs cached per caption).
    """

    def __init__(self, concept: FlowConcept, roles: Sequence[str], batch_size: int = 64) -> None:
        self.concept, self.roles, self.batch_size = concept, tuple(roles), batch_size
        self.parts = load_model_parts(str(concept.model_dir))
        self.tokens: TrainableTextEncoders = add_placeholder(
            self.parts, PLACEHOLDER, 1, INITIAL_WORD, text_encoders=list(self.roles)
        )
        self.initial = word_rows(self.parts, INITIAL_WORD, self.roles)
        self.target = word_rows(self.parts, TARGET_WORD, self.roles)
        self.initial_loss = self.loss(self.initial)
        self.target_loss = self.loss(self.target)

    @torch.no_grad()
    def per_triple(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """[held-out]: each triple's loss with ``vectors`` in place of the word."""
        own = self.tokens.vectors_by_role()
        for role in self.roles:
            own[role].copy_(vectors[role].detach().float().reshape(own[role].shape))
        held = self.concept.held_out
        losses = []
        for start in range(0, len(held.captions), self.batch_size):
            end = start + self.batch_size
            prediction = predict(
                self.tokens,
                self.parts,
                held.captions[start:end],
                held.noisy[start:end],
                held.timesteps[start:end],
                torch.device("cpu"),
            )
            losses.append((prediction.float() - held.target[start:end]).pow(2).flatten(1).mean(1))
        return torch.cat(losses)

    def loss(self, vectors: dict[str, torch.Tensor]) -> float:
        return float(self.per_triple(vectors).double().mean())

    def word_loss(self, word: str) -> float:
        return self.loss(word_rows(self.parts, word, self.roles))

    def recovery(self, vectors: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(recovery, L(vectors))."""
        learned = self.loss(vectors)
        return (self.initial_loss - learned) / (self.initial_loss - self.target_loss), learned

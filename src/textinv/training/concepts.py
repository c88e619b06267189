"""Several words in one run (``--concepts FILE``, issue 27): each word's data, vectors, curve and files.

A run is a list of :class:`Concept`; a one-word run has one, named ``""``, whose files keep their usual names.

How batches mix words: **every optimizer step sees every word that has not converged.** For each word the step
draws its own micro-batches (``--train_batch_size`` x ``--gradient_accumulation_steps`` of that word's examples,
from its own stream, images, captions and buckets) and back-propagates that word's mean loss. The gradients add
up; each word's vectors only get the gradient of its own captions (no caption names another word), so with
element-wise optimizers (AdamW, Lion) each word moves as it would in a run of its own with the same examples,
and a step costs one word-step per word. Shared by all: the learning-rate schedule, ``--max_grad_norm``'s clip
(over every vector) and Prodigy's adapted rate. ``--stop_when_converged`` freezes a word once its own held-out
curve has converged (its vectors stop requiring grad, its examples are no longer drawn); the run ends when
every word has.

Files: ``learned_embeds-<name>.*`` per word in every ``--embedding_formats``, its ``-steps-N`` snapshots and its
``learned_embeds-<name>-best.safetensors``; ``<name>`` is the token without angle brackets
(textinv.data.concepts.concept_name). A checkpoint holds every word's vectors and curve.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from textinv.config import TrainConfig, UserError
from textinv.data.concepts import concept_configs, file_names
from textinv.data.images import discover_images
from textinv.events import RunContext
from textinv.models.conditioning import TrainableConcepts, add_placeholder
from textinv.models.tokens import tokenizer_check
from textinv.training import builders, run_dir
from textinv.training.export import embedding_file_name

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Concept:
    """One word of the run, and everything that is its own."""

    config: TrainConfig  # the run's options with this word's (token, images, captions, repeats...)
    name: str  # "" for a one-word run; else the token without angle brackets, in its files' names
    image_paths: list[Path]
    data: Optional[builders.ImageData]
    start_vectors: Optional[dict[str, Any]] = None  # --init_embeddings
    latent_cache: Any = None
    trainable: Any = None  # its TrainableTextEncoders
    stream: Any = None  # its ExampleStream
    evaluation: Any = None  # its HeldOutEvaluation, or None with --eval_steps 0
    run: Optional[RunContext] = None  # the run as its files see it (its config, vectors, record)
    frozen_at: Optional[int] = None  # the step its curve converged at (--stop_when_converged)

    @property
    def weights(self) -> Any:
        return self.data.weights if self.data is not None else None


def read_concepts(config: TrainConfig, latent_cache: Any) -> list[Concept]:
    """Every word's options, images, captions, masks and starting vectors, read and checked before any model loads."""
    configs = concept_configs(config)
    several = len(configs) > 1
    if several and latent_cache is not None:
        raise UserError("ready-made latents train one word; drop --concepts")  # benches only
    if several and config.lora_rank:
        raise UserError(f"--concepts with --lora_rank {config.lora_rank}: pivotal tuning trains one word; drop one")
    concepts = []
    for one, name in zip(configs, file_names(configs)):
        image_paths = discover_images(one.train_data_dir) if latent_cache is None else []
        data = builders.image_data(one, image_paths) if latent_cache is None else None
        start_vectors = None
        if one.init_embeddings:
            start_vectors = builders.starting_vectors_by_encoder(
                one.init_embeddings, one.placeholder_token, one.num_vectors
            )
            one = dataclasses.replace(one, num_vectors=int(next(iter(start_vectors.values())).shape[0]))
        concepts.append(Concept(one, name, list(image_paths), data, start_vectors))
    return concepts


def refuse_several_processes(concepts: Sequence[Concept], num_processes: int) -> None:
    if len(concepts) > 1 and num_processes > 1:
        raise UserError(
            f"--concepts trains several words in one process; this launch has {num_processes}: run it without "
            "accelerate launch / torchrun"
        )


def tokenizer_checks(concepts: Sequence[Concept]) -> Callable[[Any], None]:
    """Every word's tokenizer check (textinv.models.tokens.tokenizer_check), as each tokenizer loads."""
    checks = [
        tokenizer_check(
            c.config.placeholder_token,
            c.config.num_vectors,
            None if c.start_vectors is not None else c.config.initializer_token,
        )
        for c in concepts
    ]

    def check(tokenizer: Any) -> None:
        for one in checks:
            one(tokenizer)

    return check


def identity_of_words(concepts: Sequence[Concept], parts: Any) -> list[dict[str, Any]]:
    """What a resume must keep, word by word: token, vectors, start, images, captions (run.json's identity)."""
    words = []
    for c in concepts:
        word = run_dir.run_identity(c.config, parts, c.image_paths, None)
        word["repeats"] = c.config.repeats
        word["data"] = run_dir.data_identity(c.config, c.data)
        words.append(word)
    return words


def add_words(parts: Any, concepts: Sequence[Concept], text_encoders: Sequence[str]) -> Any:
    """Every word's tokens and trainable vectors; the module that trains them (one word's, or all of them)."""
    for c in concepts:
        c.trainable = add_placeholder(
            parts,
            c.config.placeholder_token,
            c.config.num_vectors,
            c.config.initializer_token,
            c.start_vectors,
            c.config.init_embeddings or "",
            text_encoders,
        )
    return concepts[0].trainable if len(concepts) == 1 else TrainableConcepts([c.trainable for c in concepts])


def word_views(run: RunContext, concepts: Sequence[Concept]) -> None:
    """Each word's view of the run: its options, vectors, stream and a section of run.json of its own."""
    if len(concepts) == 1:
        concepts[0].run = run
        return
    sections = run.record.setdefault("concepts", [{} for _ in concepts])
    for c, section in zip(concepts, sections):
        section.update(
            name=c.name,
            placeholder_token=c.config.placeholder_token,
            initializer_token=c.config.initializer_token,
            num_vectors=c.config.num_vectors,
            train_data_dir=c.config.train_data_dir,
            learnable_property=c.config.learnable_property,
            repeats=c.config.repeats,
            images=len(c.image_paths),
        )
        c.run = dataclasses.replace(
            run, config=c.config, trainable=c.trainable, stream=c.stream, record=section, concept=c.name
        )


def active(concepts: Sequence[Concept]) -> list[Concept]:
    """The words still learning (not frozen by --stop_when_converged)."""
    return [c for c in concepts if c.frozen_at is None]


def freeze(c: Concept, step: int) -> None:
    """Stop ``c``'s vectors where they are: no gradient, so no optimizer moves them; its examples stop too."""
    c.frozen_at = step
    c.trainable.requires_grad_(False)
    if c.run is not None and c.name:
        c.run.record["stop_step"] = step
        c.run.save_record()
    logger.info("%s: %s; it is frozen, the others go on", c.config.placeholder_token, c.evaluation.stop_text())


def held_out_state(concepts: Sequence[Concept]) -> Optional[dict[str, Any]]:
    """The checkpoint's held-out state: the word's curve, or with several words each word's curve and stop step."""
    if len(concepts) == 1:
        return concepts[0].evaluation.state_dict() if concepts[0].evaluation is not None else None
    return {
        "concepts": {
            c.name: {
                "held_out": c.evaluation.state_dict() if c.evaluation is not None else {},
                "frozen_at": -1 if c.frozen_at is None else c.frozen_at,
            }
            for c in concepts
        }
    }


def load_held_out_state(concepts: Sequence[Concept], state: dict[str, Any], step: int) -> None:
    """Continue a checkpoint's curves (and, with several words, the stops it had reached)."""
    if len(concepts) == 1:
        if concepts[0].evaluation is not None:
            concepts[0].evaluation.load_state_dict(state, concepts[0].run, step)
        return
    words = state.get("concepts", {})
    for c in concepts:
        mine = words.get(c.name, {})
        if c.evaluation is not None:
            c.evaluation.load_state_dict(mine.get("held_out", {}), c.run, step)
        frozen_at = int(mine.get("frozen_at", -1))
        if 0 <= frozen_at <= step:
            c.frozen_at = frozen_at
            c.trainable.requires_grad_(False)


def checkpoint_embeddings(concepts: Sequence[Concept], step: int, embedding_of: Callable[..., Any]) -> Any:
    """What a checkpoint writes beside its state: the word's Embedding, or one file per word."""
    if len(concepts) == 1:
        return embedding_of(concepts[0].config, concepts[0].trainable, step)
    return {f"learned_embeds-{c.name}.safetensors": embedding_of(c.config, c.trainable, step) for c in concepts}


def evaluate_due(concepts: Sequence[Concept], step: int, max_steps: int) -> tuple[Optional[float], bool]:
    """Each learning word's eval_loss when due, and their mean (None when none was due); with --stop_when_converged a
    converged word freezes (one word: the run stops). Also says whether every word has now converged."""
    due = [c for c in active(concepts) if c.evaluation is not None and c.evaluation.due(step, max_steps)]
    if not due:
        return None, False
    values = [c.evaluation.evaluate(c.run, step) for c in due]
    converged = [c for c in due if c.evaluation.converged()]
    if not (due[0].config.stop_when_converged and step < max_steps and converged):
        return sum(values) / len(values), False
    if len(concepts) == 1:
        logger.info("%s", concepts[0].evaluation.stop_text())
        return values[0], True
    for c in converged:
        freeze(c, step)
    if not active(concepts):
        logger.info("every word has converged: the run stops at step %d", step)
    return sum(values) / len(values), not active(concepts)


def files_text(concepts: Sequence[Concept], run: RunContext, stop_reason: str) -> str:
    """The closing line's account of each word: its file, its best step and, stopped early, why."""
    texts = []
    for c in concepts:
        path = run.output_dir / embedding_file_name(c.config.embedding_formats[0], concept=c.name)
        evaluation = c.evaluation
        stopped = stop_reason == "converged" or c.frozen_at is not None
        why = f"; {evaluation.stop_text()}" if stopped and evaluation is not None else ""
        best = evaluation.best_text() if evaluation is not None else ""
        texts.append(f"{c.config.placeholder_token + ': ' if c.name else ''}wrote {path}{best}{why}")
    return "; ".join(texts)

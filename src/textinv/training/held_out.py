"""The held-out evaluation: a steady learning curve, the best vectors, and stopping when done (issue 20).

The training loss of textual inversion is dominated by each step's random timestep and noise. Here a
fixed set of (view, timestep, noise) triples is drawn once from the run's seed, its timesteps spread
over the whole range (one per stratum), and every ``--eval_steps`` steps (and at the end) the plain
denoising loss on those same triples is measured with forward passes only: ``eval_loss``. It is a
measurement, not a sample: the same vectors give the same value. It is the plain MSE against the
scheduler's target, whatever loss options training uses (--snr_gamma, --noise_offset, the timestep
draw), so curves of runs with different options compare.

The triples have generators of their own (a stream of the seed the example stream does not use), the
forward passes run under ``torch.no_grad`` and every RNG is restored afterwards, so a run learns the
same vectors with or without it. A checkpoint keeps the curve and the best vectors, so a resumed run
continues the same curve. With ``--lora_rank`` (pivotal tuning) the best step's adapters are kept and written
beside its word too (``pytorch_lora_weights-best.safetensors``, ``learned_embeds_lora-best.safetensors``): the word
is best with the adapters it was evaluated with.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from textinv.config import TrainConfig
from textinv.embeddings import Embedding, save_diffusers
from textinv.events import BEST_TAG, RunContext, best_embedding_file
from textinv.models.conditioning import predict
from textinv.models.objectives import ObjectiveSettings, make_objective
from textinv.training.export import embedding_of, write_embedding, write_lora_files
from textinv.training.file_metadata import run_file_metadata
from textinv.training.loss import LossSettings, ObjectiveFor

logger = logging.getLogger(__name__)

# The example stream seeds its order with [seed, 0, epoch] and its examples with [seed, 1, index].
HELD_OUT_STREAM = 2


@dataclass
class HeldOutSet:
    """The fixed triples: noisy latents, what the UNet should predict there, the timesteps and captions."""

    captions: list[str]
    noisy: Any  # [n, C, h, w]; with aspect-ratio buckets a list of [C, h, w] of their buckets' sizes
    target: Any  # as noisy
    timesteps: torch.Tensor  # [n] the denoiser's timesteps, one in each of n equal strata of the objective's range
    weights: Optional[list[Optional[torch.Tensor]]] = (
        None  # per triple [1, h, w] mask weights (--alpha_mask, --mask_dir)
    )
    original_sizes: Optional[list[Optional[tuple[int, int]]]] = None  # with buckets: SDXL's time ids

    def __len__(self) -> int:
        return len(self.captions)


def build_held_out(
    latents: Any,
    objective_for: Any,
    templates: Sequence[str],
    placeholder_text: str,
    seed: int,
    count: int,
    random_flip: bool,
    captioner: Any = None,
    weights: Any = None,
    original_sizes: Optional[Sequence[tuple[int, int]]] = None,
) -> HeldOutSet:
    """Draw ``count`` triples from ``seed``: views in turn (each image, then its mirror), a template
    each, a latent sample and noise each, and timesteps stratified over the range in a shuffled order.
    With a ``captioner`` (textinv.data.captions) each caption is the image's, as written (no tag shuffling
    or dropout); with ``weights`` (textinv.data.masks.LossWeights) each triple is weighted by its mask.
    ``objective_for`` gives the training objective for a latent shape (textinv.training.loss.ObjectiveFor); a noise
    scheduler stands for its DDPM objective. The triples' timesteps are what the denoiser is called with.
    """
    if hasattr(objective_for, "config"):  # a scheduler
        scheduler = objective_for
        objective_for = lambda shape: make_objective(scheduler, ObjectiveSettings())  # noqa: E731
    num_timesteps = int(objective_for((1, 1)).num_train_timesteps)
    strata = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, HELD_OUT_STREAM]))).permutation(count)
    flips = 2 if random_flip and latents.num_flips > 1 else 1
    captions, clean, noises, timesteps, masks = [], [], [], [], []
    for index in range(count):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, HELD_OUT_STREAM, index])))
        image_index, flip = index % latents.num_images, (index // latents.num_images) % flips == 1
        template_index = int(rng.integers(len(templates)))
        if captioner is not None:
            captions.append(captioner.caption(image_index, template_index))
        else:
            captions.append(templates[template_index].format(placeholder_text))
        if weights is not None:
            masks.append(weights.for_example(image_index, flip))
        timesteps.append(min(num_timesteps - 1, int((strata[index] + rng.random()) * num_timesteps / count)))
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        latent = latents.sample(image_index, flip, generator).float()
        clean.append(latent)
        noises.append(torch.randn(latent.shape, generator=generator))
    # One stratum index each; the objective puts it on its own scale (DDPM: the index; flow matching: the shifted
    # noise level of that grid point). The midpoint keeps float rounding from moving an index.
    fractions = (torch.tensor(timesteps, dtype=torch.float64) + 0.5) / num_timesteps
    sizes = [original_sizes[i % latents.num_images] for i in range(count)] if original_sizes is not None else None
    held_weights = masks if weights is not None else None
    if len({latent.shape for latent in clean}) == 1:
        objective = objective_for(clean[0].shape)
        timestep_t = objective.stratified_timesteps(fractions)
        latent_t, noise_t = torch.stack(clean), torch.stack(noises)
        noisy = objective.noisy(latent_t, noise_t, timestep_t)
        target = objective.target(latent_t, noise_t, timestep_t).float()
        return HeldOutSet(captions, noisy, target, objective.model_timesteps(timestep_t), held_weights, sizes)
    noisy_list, target_list, model_steps = [], [], []  # buckets: each triple at its own size
    for latent, noise, fraction in zip(clean, noises, fractions):
        objective = objective_for(latent.shape)
        one = objective.stratified_timesteps(fraction.reshape(1))
        noisy_list.append(objective.noisy(latent[None], noise[None], one)[0])
        target_list.append(objective.target(latent[None], noise[None], one)[0].float())
        model_steps.append(objective.model_timesteps(one))
    return HeldOutSet(captions, noisy_list, target_list, torch.cat(model_steps), held_weights, sizes)


def _pick(values: Any, chunk: list[int]) -> torch.Tensor:
    return values[chunk] if isinstance(values, torch.Tensor) else torch.stack([values[i] for i in chunk])


def _same_shape_chunks(held: HeldOutSet, indices: list[int], batch_size: int) -> list[list[int]]:
    """``indices`` in batches of ``batch_size``, each of one latent shape (one bucket), in order."""
    if isinstance(held.noisy, torch.Tensor):
        return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    by_shape: dict[Any, list[int]] = {}
    for index in indices:
        by_shape.setdefault(tuple(held.noisy[index].shape), []).append(index)
    return [
        group[start : start + batch_size] for group in by_shape.values() for start in range(0, len(group), batch_size)
    ]


@torch.no_grad()
def held_out_sum(
    model: Any, parts: Any, held: HeldOutSet, device: torch.device, batch_size: int, rank: int = 0, world: int = 1
) -> float:
    """The sum (float64) of the per-triple MSE over this process's share of the triples (every ``world``-th)."""
    mine = list(range(rank, len(held), world))
    total = 0.0
    for chunk in _same_shape_chunks(held, mine, batch_size):
        noisy = _pick(held.noisy, chunk)
        sizes = [held.original_sizes[i] for i in chunk] if held.original_sizes else []
        captions = [held.captions[i] for i in chunk]
        prediction = predict(
            model, parts, captions, noisy, held.timesteps[chunk], device, original_sizes=sizes if any(sizes) else None
        )
        squared = (prediction.float() - _pick(held.target, chunk).to(device)).pow(2)
        weights = [held.weights[i] for i in chunk] if held.weights is not None else []
        if any(weight is not None for weight in weights):  # each triple's mask-weighted mean (0 when all masked)
            ones = torch.ones((1, *squared.shape[-2:]))
            weight = torch.stack([ones if w is None else w for w in weights]).to(device).expand_as(squared)
            errors = (squared * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-12)
        else:
            errors = squared.flatten(1).mean(1)
        total += float(errors.double().sum())
    return total


def convergence_step(history: Sequence[tuple[int, float]], margin: float, patience: int) -> Optional[int]:
    """The step of the first evaluation at which :func:`has_converged` holds for the history up to it."""
    for end in range(1, len(history) + 1):
        if has_converged(history[:end], margin, patience):
            return history[end - 1][0]
    return None


def has_converged(history: Sequence[tuple[int, float]], margin: float, patience: int) -> bool:
    """True when the last ``patience`` evaluations together gained less than ``margin`` of what
    training had gained before them: ``best_before - best_recent < margin * (first - best_before)``.

    Relative to the gain so far, not to the loss itself: a denoising loss is mostly the noise no word
    can explain, so the part a word can improve is a small, model-dependent share of it. No gain at
    all (or a worse value) before the recent evaluations counts as converged once they do not improve.
    """
    if len(history) <= patience:
        return False
    values = [value for _, value in history]
    before, recent = values[:-patience], values[-patience:]
    best_before = min(before)
    gain = best_before - min(recent)
    return gain <= 0 or gain < margin * (values[0] - best_before)


class HeldOutEvaluation:
    """The run's held-out curve: evaluates when due, keeps the best vectors (and with ``lora``, the run's
    :class:`~textinv.training.lora.LoraAdapters`, the best step's adapters), and says when it has converged."""

    def __init__(
        self, config: TrainConfig, held: HeldOutSet, device: torch.device, lora: Any = None, concept: str = ""
    ) -> None:
        self.config, self.held, self.device, self.lora = config, held, device, lora
        self.best_file = best_embedding_file(concept)  # one word of several (--concepts): its name is in it
        self.history: list[tuple[int, float]] = []
        self.best_step: Optional[int] = None
        self.best_loss = math.inf
        self.best_vectors: dict[str, torch.Tensor] = {}
        self.best_lora: dict[str, dict[str, torch.Tensor]] = {}  # with lora: LoraAdapters.state_dict() at best_step
        self.seconds = 0.0

    @classmethod
    def for_run(
        cls,
        config: TrainConfig,
        parts: Any,
        latents: Any,
        stream: Any,
        device: torch.device,
        weights: Any = None,
        lora: Any = None,
        concept: str = "",
        max_steps: Optional[int] = None,
    ) -> Optional[HeldOutEvaluation]:
        """The evaluation ``config`` asks for (``--eval_steps`` > 0), or None; ``lora``: the run's adapters;
        ``concept``: the word's name when the run trains several (--concepts).

        A run of at most ``--eval_steps`` steps (``max_steps``) gets none: its curve would be the start and the end,
        and the two evaluations cost ~2 x --eval_samples forward passes, more than a short run's steps (issue 29).
        """
        if not config.eval_steps:
            return None
        if max_steps is not None and max_steps <= config.eval_steps:
            logger.info(
                "no held-out evaluation: %d steps is not more than --eval_steps %d (a curve needs a point between "
                "the start and the end)%s",
                max_steps,
                config.eval_steps,
                f"; --eval_steps {max_steps - 1} or lower to measure one" if max_steps > 1 else "",
            )
            return None
        held = build_held_out(
            latents,
            ObjectiveFor(parts, LossSettings.from_config(config)),
            stream.templates,
            stream.placeholder_text,
            stream.seed,
            config.eval_samples,
            stream.random_flip,
            stream.captioner,
            weights,
            stream.original_sizes,
        )
        return cls(config, held, device, lora, concept)

    def due(self, step: int, max_steps: int) -> bool:
        """At the end, and an interval after the last evaluation: --eval_steps, growing with the step past
        --eval_steps / --eval_spacing (textinv.held_out_options). Only the curve decides, so a resume keeps the steps."""
        last = self.history[-1][0] if self.history else 0
        return step == max_steps or step >= last + self.config.evaluation_interval(last)

    def evaluate(self, run: RunContext, step: int) -> float:
        """eval_loss of the current vectors (the same on every process); records it and keeps the best."""
        started = time.perf_counter()
        accelerator = run.accelerator
        fork_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):  # nothing here may move the training's random state
            total = held_out_sum(
                run.trainable,
                run.parts,
                self.held,
                self.device,
                self.config.train_batch_size,
                accelerator.process_index,
                accelerator.num_processes,
            )
        if accelerator.num_processes > 1:
            total = float(
                accelerator.reduce(torch.tensor([total], dtype=torch.float64, device=self.device), reduction="sum")[0]
            )
        value = total / len(self.held)
        self.history.append((step, value))
        if value < self.best_loss:
            self.best_step, self.best_loss = step, value
            self.best_vectors = {
                name: v.detach().float().cpu().clone() for name, v in run.trainable.vectors_by_encoder().items()
            }
            write_embedding(run, step, self.best_file)
            if self.lora is not None:  # the adapters this eval_loss was measured with, beside the word
                self.best_lora = self.lora.state_dict()
                write_lora_files(
                    run, self.lora, embedding_of(run.config, run.trainable, step), BEST_TAG, self.best_lora
                )
        self.seconds += time.perf_counter() - started
        self.update_record(run)
        return value

    def converged(self) -> bool:
        return has_converged(self.history, self.config.convergence_margin, self.config.convergence_patience)

    def stop_text(self) -> str:
        step, patience = self.history[-1][0], self.config.convergence_patience
        return (
            f"stopped at step {step}: eval_loss gained less than {self.config.convergence_margin:g} of its gain so far "
            f"over the last {patience} evaluations (--stop_when_converged); "
            f"best {self.best_loss:.5f} at step {self.best_step}"
        )

    def best_text(self) -> str:
        if self.best_step is None:
            return ""
        return f"; lowest eval_loss {self.best_loss:.5f} at step {self.best_step} ({', '.join(self.best_files())})"

    def best_files(self) -> list[str]:
        """The names of the best step's files: its word's, and with --lora_rank its LoRA's (none before a best)."""
        if self.best_step is None:
            return []
        if self.lora is None:
            return [self.best_file]
        from textinv.training.lora import lora_file_names

        return [self.best_file, *lora_file_names(BEST_TAG)]

    def update_record(self, run: RunContext) -> None:
        """run.json: the curve, the best step and the evaluation's own time."""
        run.record["eval"] = {
            "samples": len(self.held),
            "every": self.config.eval_steps,
            "losses": [[step, value] for step, value in self.history],
            "best_step": self.best_step,
            "best_loss": self.best_loss if self.best_step is not None else None,
            "best_file": self.best_file if self.best_step is not None else None,
        }
        if self.lora is not None:  # pivotal tuning: the best step's LoRA files
            run.record["eval"]["best_lora_files"] = self.best_files()[1:] or None
        run.record.setdefault("timings", {})["eval_seconds"] = round(self.seconds, 3)
        run.save_record()

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "samples": len(self.held),
            "history": [[step, value] for step, value in self.history],
            "best_step": -1 if self.best_step is None else self.best_step,
            "best_loss": self.best_loss,
            "best_vectors": dict(self.best_vectors),
            **({"best_lora": dict(self.best_lora)} if self.lora is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any], run: RunContext, step: int) -> None:
        """Continue a checkpoint's curve (up to its ``step``); rewrite the best file from its best vectors."""
        if not state:
            return
        if int(state.get("samples", -1)) != len(self.held):
            logger.warning("--eval_samples changed since the checkpoint: the eval_loss curve starts afresh")
            return
        self.history = [(int(s), float(v)) for s, v in state["history"] if int(s) <= step]
        best_step = int(state["best_step"])
        if best_step >= 0 and best_step <= step:
            self.best_step, self.best_loss = best_step, float(state["best_loss"])
            self.best_vectors = {name: tensor.float() for name, tensor in state["best_vectors"].items()}
            if self.lora is not None:
                self.best_lora = dict(state.get("best_lora") or {})
            if run.is_main_process:  # the files may hold a later step of the stopped run: back to the checkpoint's best
                self.rewrite_best_files(run)
        self.update_record(run)

    def rewrite_best_files(self, run: RunContext) -> None:
        """Write the best step's files again from the kept vectors (and adapters), as :meth:`evaluate` wrote them."""
        roles = {part.name: part.role for part in run.parts.text_encoders}  # the files key vectors by role
        vectors = {roles.get(name, name): tensor for name, tensor in self.best_vectors.items()}
        metadata = run_file_metadata(self.config, run.parts.family)  # ModelSpec keys, as every embedding file has
        best = Embedding(self.config.placeholder_token, vectors, self.best_step, file_metadata=metadata)
        save_diffusers(best, run.output_dir / self.best_file)
        if self.lora is None:
            return
        if self.best_lora:
            write_lora_files(run, self.lora, best, BEST_TAG, self.best_lora)
            return
        logger.warning(  # a checkpoint written before the best step's adapters were kept
            "the checkpoint does not hold the adapters of step %d (the lowest eval_loss): no best LoRA files until a "
            "lower eval_loss",
            self.best_step,
        )
        for name in self.best_files()[1:]:
            (run.output_dir / name).unlink(missing_ok=True)

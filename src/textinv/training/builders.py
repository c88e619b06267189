"""The parts the recipe sets up before its first step: image data, latents, the example stream, starting
vectors, optimizer, schedule."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import TrainConfig, UserError
from textinv.data.buckets import assign_buckets
from textinv.data.captions import Captioner, TagRules, build_captioner
from textinv.data.examples import ExampleStream
from textinv.data.images import load_sized_views, upright_size
from textinv.data.latents import LatentsEachStep, LazyLatentCache
from textinv.data.masks import LossWeights, latent_weights, load_masks
from textinv.embeddings import read_embeddings
from textinv.models.loading import ModelParts
from textinv.models.tokens import expand_placeholder
from textinv.training import optimizers
from textinv.training.norms import apply_norm_rule, median_row_norm

logger = logging.getLogger(__name__)


def processes_share_cpu() -> bool:
    """True for a multi-process launch (torchrun / accelerate) on a machine without CUDA.

    accelerate only picks its CPU (gloo) back-end when asked to, and would otherwise run each
    process as a separate single-process job; GPUs keep accelerate's own choice (NCCL).
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    return launched_processes > 1 and not torch.cuda.is_available()


@dataclass
class ImageData:
    """What the images give training besides their pixels (issue 17): captions, view sizes, buckets, masks."""

    captioner: Captioner
    sizes: list[tuple[int, int]]  # each view's (height, width)
    bucket_of: Optional[list[int]] = None  # each image's bucket index, with --enable_bucket
    original_sizes: Optional[list[tuple[int, int]]] = None  # each image's (height, width), with --enable_bucket
    masks: Optional[list[Any]] = None  # greyscale mask images, with --alpha_mask / --mask_dir
    weights: Optional[LossWeights] = None  # the masks at latent size, once the VAE's factor is known

    def record(self) -> dict[str, Any]:
        """For run.json and the run identity: the caption source, the buckets, the masks' digest."""
        shown: dict[str, Any] = {"captions": self.captioner.record()}
        if self.bucket_of is not None:
            shown["image_buckets"] = [f"{w}x{h}" for h, w in self.sizes]
        if self.masks is not None and any(mask is not None for mask in self.masks):
            digest = hashlib.sha256()
            for mask in self.masks:
                digest.update(b"-" if mask is None else mask.tobytes())
            shown["masks_sha256"] = digest.hexdigest()
        return shown


def image_data(config: TrainConfig, image_paths: Sequence[Path]) -> ImageData:
    """Each image's captions, view size (its bucket with --enable_bucket, else the training size) and mask,
    read and checked before any model loads."""
    rules = TagRules(
        config.shuffle_caption, config.keep_tokens, config.caption_tag_dropout_rate, config.caption_dropout_rate
    )
    placeholder_text = expand_placeholder(config.placeholder_token, config.placeholder_token, config.num_vectors)
    captioner = build_captioner(
        image_paths, placeholder_text, config.placeholder_token, config.caption_extension, config.template_file, rules
    )
    masks = load_masks(image_paths, config.mask_dir, config.alpha_mask)
    if not config.enable_bucket:
        sizes = [(config.image_height, config.image_width)] * len(image_paths)
        return ImageData(captioner, sizes, masks=masks)
    originals = [upright_size(path) for path in image_paths]
    area = config.image_height * config.image_width
    sizes = assign_buckets(originals, area, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps)
    distinct = sorted(set(sizes))
    logger.info("buckets: %s", ", ".join(f"{w}x{h} ({sizes.count((h, w))} image(s))" for h, w in distinct))
    return ImageData(captioner, sizes, [distinct.index(size) for size in sizes], originals, masks)


def check_sizes_for_family(config: TrainConfig, family: Any, data: Optional[ImageData]) -> None:
    """Image sides must be multiples of what the family's denoiser can take (SD3's and Flux's 2x2 latent patches
    make it 16 px); training sizes and every bucket are checked before any image is encoded."""
    multiple = family.resolution_multiple
    sizes = {(config.image_height, config.image_width)} | set(data.sizes if data is not None else [])
    for height, width in sorted(sizes):
        if height % multiple or width % multiple:
            fix = (
                "--bucket_reso_steps 64"
                if config.enable_bucket
                else f"--resolution {max(multiple, height // multiple * multiple)}"
            )
            raise UserError(
                f"a {family.title} model needs image sides that are multiples of {multiple} px, and this run has "
                f"{width}x{height}; use {fix}"
            )


def load_latents(
    config: TrainConfig, parts: ModelParts, image_paths: Sequence[Path], device: torch.device, data: ImageData
) -> Any:
    """The latent cache, each view encoded when first drawn (or, with ``--no_cache_latents``, a source
    that encodes every step); also the masks' latent-size weights (``data.weights``)."""
    # Buckets resize whole images (no crop); otherwise masks are cropped as their images are.
    crop = config.center_crop and not config.enable_bucket
    views = load_sized_views(image_paths, data.sizes, crop, config.interpolation, config.dataloader_num_workers)
    if data.masks is not None:
        data.weights = latent_weights(data.masks, data.sizes, crop, config.interpolation, parts.vae_scale_factor)
    parts.vae.to(device)
    deterministic = config.latent_sampling == "deterministic"
    if config.cache_latents:
        return LazyLatentCache(parts.vae, views, config.random_flip, deterministic)  # lets the VAE go once full
    return LatentsEachStep(parts.vae, views, config.random_flip, deterministic)  # keeps the VAE


def example_stream(
    config: TrainConfig, latents: Any, templates: Sequence[str], data: Optional[ImageData], seed: int
) -> ExampleStream:
    """The run's example stream: which view, flip, caption (caption files, template file, tag rules) and bucket."""
    placeholder_text = expand_placeholder(config.placeholder_token, config.placeholder_token, config.num_vectors)
    return ExampleStream(
        num_images=latents.num_images,
        repeats=config.repeats,
        templates=templates,
        placeholder_text=placeholder_text,
        random_flip=config.random_flip and latents.num_flips > 1,
        seed=seed,
        captioner=data.captioner.using_templates(templates) if data is not None else None,
        bucket_of=data.bucket_of if data is not None else None,
        batch_size=config.train_batch_size,
        original_sizes=data.original_sizes if data is not None else None,
    )


# What a step costs on a CPU, per example and UNet parameter: fitted to an SD 1.5-sized UNet (860M parameters)
# on this project's 2-core CPU, 3.60 s a step at 256 px and 10.95 s at 512 px (batch 1, fp32, two threads;
# bench/user_speed.py, 2026-12-03, docs/speed.md).
_CPU_SECONDS_PER_PARAMETER = 1.34e-9
_CPU_SECONDS_PER_PARAMETER_AND_LATENT_PIXEL = 2.784e-12
_CPU_THREADS_MEASURED = 2


def cpu_step_estimate(
    config: TrainConfig, parts: ModelParts, device: torch.device, num_processes: int = 1, max_steps: int = 0
) -> Optional[str]:
    """On a CPU, one line on what a step will cost (from the UNet's size, the image size and the batch) and, given
    ``max_steps``, the whole run; None on a GPU or when a step takes under a second."""
    if device.type != "cpu":
        return None
    parameters = sum(p.numel() for p in parts.unet.parameters())
    latent_pixels = (config.image_height // parts.vae_scale_factor) * (config.image_width // parts.vae_scale_factor)
    per_example = parameters * (
        _CPU_SECONDS_PER_PARAMETER + _CPU_SECONDS_PER_PARAMETER_AND_LATENT_PIXEL * latent_pixels
    )
    examples = config.train_batch_size * config.gradient_accumulation_steps  # per process
    seconds = examples * per_example * _CPU_THREADS_MEASURED / max(1, torch.get_num_threads() // max(1, num_processes))
    if seconds < 1.0:
        return None
    advice = f"; --train_batch_size 1 makes a step about {examples}x cheaper" if examples > 1 else ""
    whole = f", {max_steps} steps about {_duration_text(seconds * max_steps)}" if max_steps else ""
    return (
        f"on this CPU a step of {examples} example(s) at {config.image_width}x{config.image_height} px will take "
        f"about {_duration_text(seconds)}{whole} (estimated from the UNet's size){advice}"
    )


def _duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def schedule_length(config: TrainConfig, epoch_length: int, num_processes: int) -> int:
    """Optimizer steps of the run: ``--max_train_steps``, else ``--num_train_epochs`` worth of examples."""
    per_update = config.examples_per_update(num_processes)
    return config.max_train_steps or math.ceil(config.num_train_epochs * epoch_length / per_update)


def parameter_groups(config: TrainConfig, trainable: Any, lora: Any) -> Any:
    """What the optimizer trains: the token vectors; T5's (SD3, Flux) in a group of their own at --t5_learning_rate; with
    --lora_rank the adapters at --lora_learning_rate. The first group's rate is the one logged as the run's."""
    t5_parts = [p for p in trainable.parts.text_encoders if p.kind == "t5" and p.name in trainable.tokens]
    if lora is None and not t5_parts:
        return trainable.parameters()  # one group, as before T5 and LoRA existed
    t5_vectors = [word.tokens[part.name].vectors for word in trainable.each() for part in t5_parts]
    others = [vectors for vectors in trainable.parameters() if all(vectors is not t5 for t5 in t5_vectors)]
    groups: list[dict[str, Any]] = [{"params": others}] if others else []
    if t5_parts:
        groups.append({"params": t5_vectors, "lr": t5_learning_rate(config, trainable, t5_parts[0]), "name": "t5"})
    if lora is not None:
        groups.append({"params": list(lora.parameters()), "lr": lora.settings["learning_rate"], "name": "lora"})
    return groups


def t5_learning_rate(config: TrainConfig, trainable: Any, t5_part: Any) -> float:
    """--t5_learning_rate, else --learning_rate scaled by the ratio of T5's and the first encoder's (CLIP-L's)
    median vocabulary-row norms: a step then moves a T5 vector as far, relative to T5's words, as a CLIP one."""
    if config.t5_learning_rate is not None:
        return config.t5_learning_rate
    t5, clip = (median_row_norm(trainable, part) for part in (t5_part, trainable.parts.text_encoders[0]))
    ratio = float(t5 / clip)
    rate = config.resolved_learning_rate * ratio
    logger.info("T5's vectors: learning rate %.3g (--learning_rate x %.1f, T5's vs CLIP-L's row norms)", rate, ratio)
    return rate


def run_optimizer(config: TrainConfig, trainable: Any, lora: Any, num_processes: int) -> torch.optim.Optimizer:
    """The run's optimizer over :func:`parameter_groups`. The norm rule (--preserve_embedding_norm,
    --max_embedding_norm) holds from the start: the starting vectors are brought under it first, so step 0's eval_loss
    (and a best file of step 0) has them at the rule's norm too."""
    apply_norm_rule(config.embedding_norm_settings, trainable)
    return make_optimizer(config, parameter_groups(config, trainable, lora), num_processes)


def make_optimizer(config: TrainConfig, parameters: Any, num_processes: int) -> torch.optim.Optimizer:
    """The --optimizer (AdamW by default) on the token vectors (and LoRA adapters); ``--scale_lr`` multiplies every
    rate by the examples per update (textinv.training.optimizers)."""
    return optimizers.make_optimizer(config, parameters, num_processes)


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    # Stepped once per optimizer update, so warm-up and length are in updates (the reference
    # scripts step per micro-batch and multiply both by the accumulation steps instead).
    schedule, warmup = optimizers.schedule_for(config)  # a schedule-free optimizer: constant, its own warm-up
    return get_scheduler(
        schedule,
        optimizer=optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def starting_vectors_by_encoder(path: str, placeholder_token: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """The ``[n, dim]`` vectors, by text encoder (SDXL files have two), of the token in an embedding file of any format
    (``--init_embeddings``).

    A file of several tokens must hold one named ``placeholder_token``. ``num_vectors`` other than
    1 (the default) must agree with the file; otherwise the file's count wins.
    """

    embeddings = read_embeddings(path)
    if len(embeddings) > 1:
        named = [embedding for embedding in embeddings if embedding.token == placeholder_token]
        if not named:
            tokens = ", ".join(embedding.token for embedding in embeddings)
            raise UserError(
                f"--init_embeddings {path!r} holds several tokens ({tokens}); name the one to start from "
                "with --placeholder_token, or convert it alone first (textinv convert --token)"
            )
        embeddings = named
    embedding = embeddings[0]
    vectors = next(iter(embedding.vectors.values()))  # every encoder has the same count (read_embeddings checks)
    if num_vectors not in (1, vectors.shape[0]):
        raise UserError(
            f"--init_embeddings {path!r} has {vectors.shape[0]} vectors but --num_vectors is {num_vectors}; "
            f"drop --num_vectors or set it to {vectors.shape[0]}"
        )
    logger.info("starting %s from %s (%s, %d vector(s))", placeholder_token, path, embedding.token, vectors.shape[0])
    return {name: tensor.detach().to(torch.float32).clone() for name, tensor in embedding.vectors.items()}

"""The training loop: noise, predict, loss, step, save. Read it top to bottom in :func:`train`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from textinv.config import TrainConfig, UserError
from textinv.data import (
    Example,
    ExampleStream,
    LatentCache,
    discover_images,
    encode_latent_cache,
    load_views,
)
from textinv.embeddings import TEXT_ENCODER, Embedding, save_diffusers
from textinv.files import atomic_dir, atomic_write, atomic_write_json, check_writable_dir, previous_run_markers
from textinv.models import ModelParts, load_model_parts
from textinv.templates import templates_for
from textinv.tokens import (
    TrainableTokens,
    add_placeholder_token,
    check_new_token,
    expand_placeholder,
    initializer_ids,
)

logger = logging.getLogger(__name__)

EMBEDDING_FILE = "learned_embeds.safetensors"
RUN_FILE = "run.json"


@dataclass
class TrainResult:
    output_dir: Path
    embedding_path: Path
    embedding: Embedding
    steps: int
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)


def train(config: TrainConfig, show_progress: bool = True) -> TrainResult:
    """Learn the placeholder token's vectors from ``config.train_data_dir``; write them to output_dir."""
    from accelerate import Accelerator

    config.validate()
    output_dir = Path(config.output_dir).expanduser()
    accelerator = Accelerator()
    if accelerator.is_main_process:
        _claim_output_dir(output_dir, config.overwrite_output_dir)
    seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
    torch.manual_seed(seed)  # only for anything a library draws; our own draws use explicit generators
    device = accelerator.device

    # Cheap checks first: a missing image folder should not cost a model load.
    image_paths = discover_images(config.train_data_dir)
    parts = load_model_parts(config.pretrained_model_name_or_path, config.revision, config.tokenizer_name)
    logger.info("training on %d image(s) from %s", len(image_paths), config.train_data_dir)

    # --- latents: every view through the VAE once, then the VAE leaves memory -----------------
    views = load_views(
        image_paths,
        config.image_height,
        config.image_width,
        config.center_crop,
        config.interpolation,
        config.dataloader_num_workers,
    )
    parts.vae.to(device)
    latent_cache = encode_latent_cache(parts.vae, views, config.random_flip)
    parts.vae = None
    del views

    # --- the placeholder token: the only trainable tensor -------------------------------------
    tokenizer, text_encoder = parts.tokenizer, parts.text_encoder
    check_new_token(tokenizer, config.placeholder_token, config.num_vectors)
    init_ids = initializer_ids(tokenizer, config.initializer_token, config.num_vectors)
    initial_vectors = text_encoder.get_input_embeddings().weight[init_ids].detach().clone()
    placeholder_ids = add_placeholder_token(tokenizer, text_encoder, config.placeholder_token, initial_vectors)
    text_encoder.to(device)
    parts.unet.to(device)
    trainable = TrainableTokens(text_encoder, placeholder_ids[0], initial_vectors).to(device)

    # --- schedule --------------------------------------------------------------------------------
    stream = ExampleStream(
        num_images=len(image_paths),
        repeats=config.repeats,
        templates=templates_for(config.learnable_property),
        placeholder_text=expand_placeholder(config.placeholder_token, config.placeholder_token, config.num_vectors),
        random_flip=config.random_flip,
        seed=seed,
    )
    num_processes = accelerator.num_processes
    examples_per_update = config.train_batch_size * config.gradient_accumulation_steps * num_processes
    max_steps = config.max_train_steps or math.ceil(config.num_train_epochs * stream.epoch_length / examples_per_update)
    learning_rate = config.learning_rate * (examples_per_update if config.scale_lr else 1)
    optimizer = torch.optim.AdamW(
        trainable.parameters(),
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = _lr_scheduler(config, optimizer, max_steps)
    model = accelerator.prepare(trainable)

    run_record = _run_record(config, seed, parts, len(image_paths), max_steps, learning_rate, device)
    if accelerator.is_main_process:
        atomic_write_json(output_dir / RUN_FILE, run_record)
    logger.info(
        "%d steps, %d example(s) per step (batch %d x accumulation %d x %d process(es)), lr %.3g, %s",
        max_steps,
        examples_per_update,
        config.train_batch_size,
        config.gradient_accumulation_steps,
        num_processes,
        learning_rate,
        parts.prediction_type,
    )

    # --- the loop --------------------------------------------------------------------------------
    losses: list[float] = []
    saved: list[Path] = []
    progress = _Progress(max_steps, enabled=show_progress and accelerator.is_main_process)
    started = time.perf_counter()
    for step in range(1, max_steps + 1):
        step_loss = 0.0
        for micro in range(config.gradient_accumulation_steps):
            first = (step - 1) * examples_per_update + (micro * num_processes + accelerator.process_index) * config.train_batch_size
            examples = [stream[index] for index in range(first, first + config.train_batch_size)]
            is_last_micro = micro == config.gradient_accumulation_steps - 1
            with accelerator.no_sync(model) if not is_last_micro else contextlib.nullcontext():
                loss = denoising_loss(model, parts, tokenizer, latent_cache, examples, device)
                accelerator.backward(loss / config.gradient_accumulation_steps)
            step_loss += loss.detach().item() / config.gradient_accumulation_steps
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable.parameters(), config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        progress.update(step, step_loss, lr_scheduler.get_last_lr()[0])

        if accelerator.is_main_process and step % config.save_steps == 0 and step < max_steps:
            snapshot = output_dir / f"learned_embeds-steps-{step}.safetensors"
            saved.append(save_diffusers(_embedding(config, trainable, step), snapshot))
    progress.close()
    elapsed = time.perf_counter() - started

    # --- outputs ---------------------------------------------------------------------------------
    embedding = _embedding(config, trainable, max_steps)
    embedding_path = output_dir / EMBEDDING_FILE
    if accelerator.is_main_process:
        saved.append(save_diffusers(embedding, embedding_path))
        if not config.only_save_embeds:
            trainable.write_into_encoder()
            saved.extend(save_pipeline(parts, output_dir))
        run_record.update(
            status="completed",
            steps_done=max_steps,
            train_seconds=round(elapsed, 3),
            seconds_per_step=round(elapsed / max_steps, 4),
            final_loss=losses[-1],
            outputs=[str(p.relative_to(output_dir)) for p in saved],
        )
        atomic_write_json(output_dir / RUN_FILE, run_record)
    trainable.detach_hook()
    accelerator.wait_for_everyone()
    logger.info("learned %s in %d steps (%.1f s); wrote %s", config.placeholder_token, max_steps, elapsed, embedding_path)
    return TrainResult(output_dir, embedding_path, embedding, max_steps, losses, saved)


def denoising_loss(
    model: Any,
    parts: ModelParts,
    tokenizer: Any,
    latent_cache: LatentCache,
    examples: Sequence[Example],
    device: torch.device,
) -> torch.Tensor:
    """Mean-squared error of the UNet's prediction for a batch of examples.

    Each example's random draws (latent sample, noise, timestep) come from its own generator, in
    that order, so they depend only on the example, not on batch layout or process count.
    """
    scheduler = parts.noise_scheduler
    latents, noises, timesteps = [], [], []
    for example in examples:
        generator = torch.Generator().manual_seed(example.noise_seed)
        latent = latent_cache.sample(example.image_index, example.flipped, generator)
        latents.append(latent)
        noises.append(torch.randn(latent.shape, generator=generator))
        timesteps.append(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator))
    latents_t, noise_t, timesteps_t = torch.stack(latents), torch.stack(noises), torch.cat(timesteps)
    noisy = scheduler.add_noise(latents_t, noise_t, timesteps_t)
    if scheduler.config.prediction_type == "epsilon":
        target = noise_t
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents_t, noise_t, timesteps_t)
    elif scheduler.config.prediction_type == "sample":
        target = latents_t
    else:
        raise UserError(f"the model's scheduler has prediction_type {scheduler.config.prediction_type!r}, which textinv cannot train")
    input_ids = tokenizer(
        [example.caption for example in examples],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    encoder_hidden_states = model(input_ids.to(device))
    unet_dtype = parts.unet.dtype
    prediction = parts.unet(
        noisy.to(device, unet_dtype),
        timesteps_t.to(device),
        encoder_hidden_states.to(unet_dtype),
    ).sample
    return F.mse_loss(prediction.float(), target.to(device).float())


def save_pipeline(parts: ModelParts, output_dir: Path) -> list[Path]:
    """Write the full pipeline: the base model's parts, with the new tokenizer and text encoder.

    Parts other than tokenizer/text_encoder are copied from the base folder (not re-saved from
    memory, so they stay byte-identical). model_index.json goes last: it marks the pipeline complete.
    """
    source = Path(parts.source)
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    written = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        target = output_dir / name
        with atomic_dir(target) as tmp:
            if name == "tokenizer":
                parts.tokenizer.save_pretrained(tmp)
            elif name == "text_encoder":
                parts.text_encoder.save_pretrained(tmp)
            else:
                shutil.copytree(source / name, tmp, dirs_exist_ok=True)
        written.append(target)
    written.append(atomic_write(output_dir / "model_index.json", lambda tmp: shutil.copyfile(source / "model_index.json", tmp)))
    return written


def _embedding(config: TrainConfig, trainable: TrainableTokens, step: int) -> Embedding:
    return Embedding(
        token=config.placeholder_token,
        vectors={TEXT_ENCODER: trainable.vectors.detach().float().cpu().clone()},
        step=step,
    )


def _claim_output_dir(output_dir: Path, overwrite: bool) -> None:
    check_writable_dir(output_dir, "--output_dir")
    markers = previous_run_markers(output_dir)
    if markers and not overwrite:
        raise UserError(
            f"--output_dir {str(output_dir)!r} already holds another run's results ({', '.join(markers)}); "
            "choose a new --output_dir, or pass --overwrite_output_dir to replace them"
        )
    if markers:
        for stale in output_dir.glob("learned_embeds-steps-*"):
            stale.unlink()
        logger.warning("--overwrite_output_dir: replacing the previous results in %s", output_dir)


def _lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    # Stepped once per optimizer update, so warm-up and length are in updates (the reference
    # scripts step per micro-batch and multiply both by the accumulation steps instead).
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def _run_record(
    config: TrainConfig,
    seed: int,
    parts: ModelParts,
    num_images: int,
    max_steps: int,
    learning_rate: float,
    device: torch.device,
) -> dict[str, Any]:
    import accelerate
    import diffusers
    import transformers

    import textinv

    return {
        "status": "running",
        "config": config.to_dict(),
        "seed": seed,
        "model": {"source": parts.source, "family": parts.family, "prediction_type": parts.prediction_type},
        "num_images": num_images,
        "max_train_steps": max_steps,
        "effective_learning_rate": learning_rate,
        "device": str(device),
        "versions": {
            "textinv": textinv.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
    }


class _Progress:
    """A tqdm bar on a terminal; plain log lines (about 20 a run) otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.bar = None
        self.started = time.perf_counter()
        self.every = max(1, total // 20)
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.started
            per_step = elapsed / step
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.3f s/step ETA %.0f s",
                step,
                self.total,
                loss,
                lr,
                per_step,
                per_step * (self.total - step),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

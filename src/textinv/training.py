"""The training loop: noise, predict, loss, step, checkpoint, save. Read :func:`train` top to bottom.

Observers (:class:`TrainObserver`) see the run start, every step and the end; progress display,
logs and validation hook in there instead of into the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from textinv import checkpoints, speed
from textinv.conditioning import TrainableTextEncoders, add_placeholder, predict
from textinv.config import TrainConfig, TrainingInterrupted, UserError
from textinv.data import (
    Example,
    ExampleStream,
    LatentCache,
    LatentsEachStep,
    discover_images,
    encode_latent_cache,
    load_views,
)
from textinv.embeddings import Embedding, save_diffusers
from textinv.files import atomic_dir, atomic_write, atomic_write_json, check_writable_dir, previous_run_markers
from textinv.models import ModelParts, load_model_parts
from textinv.templates import choose_language, templates_for
from textinv.tokens import expand_placeholder

logger = logging.getLogger(__name__)

EMBEDDING_FILE = "learned_embeds.safetensors"
RUN_FILE = "run.json"
# Settings a resumed run must share with the run it continues (else it is another run).
IDENTITY_KEYS = ("model", "placeholder_token", "num_vectors", "initializer_token", "init_embeddings", "images", "learnable_property", "language")
# What a run.json written before a key existed meant by its absence.
IDENTITY_DEFAULTS = {"language": "en"}


class TrainingDiverged(UserError):
    """The loss or the vectors stopped being finite."""


@dataclass
class StepState:
    step: int
    max_steps: int
    loss: float
    lr: float
    step_seconds: float


@dataclass
class TrainResult:
    output_dir: Path
    embedding_path: Path
    embedding: Embedding
    steps: int
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)


@dataclass
class RunContext:
    """What observers may look at (and what the loop shares with its helpers)."""

    config: TrainConfig
    output_dir: Path
    parts: ModelParts
    trainable: TrainableTextEncoders  # every text encoder's placeholder vectors (.vectors: the first's)
    accelerator: Any
    stream: ExampleStream
    max_steps: int
    seed: int
    record: dict[str, Any]
    stop_requested: Optional[int] = None  # a signal number, once asked to stop

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        self.stop_requested = signum


class TrainObserver:
    """Override what you need; every hook runs on every process (check ``run.is_main_process``)."""

    def on_start(self, run: RunContext) -> None:
        pass

    def on_step(self, run: RunContext, state: StepState) -> None:
        pass

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        pass


def train(
    config: TrainConfig,
    show_progress: bool = True,
    observers: Sequence[TrainObserver] = (),
    latent_cache: Optional[LatentCache] = None,
) -> TrainResult:
    """Learn the placeholder token's vectors; write them (and checkpoints) to output_dir.

    ``latent_cache`` replaces the images of ``train_data_dir`` with ready-made latents
    (benchmarks that plant a concept use it).
    """
    from accelerate import Accelerator

    config.validate()
    # Validation, logs, model card, hub (issue 6): built now so a missing tracker or token fails before the model loads.
    from textinv.observers import observers_from_config

    observers = [*observers, *observers_from_config(config)]
    output_dir = Path(config.output_dir).expanduser()
    wants_fp16 = config.mixed_precision == "fp16" and torch.cuda.is_available()
    accelerator = Accelerator(cpu=_processes_share_cpu(), mixed_precision="fp16" if wants_fp16 else "no")
    speed.check_precision(config, accelerator.device)
    resume_dir = _prepare_output_dir(config, output_dir, accelerator)
    device = accelerator.device

    # Cheap checks first: a missing image folder should not cost a model load.
    image_paths = discover_images(config.train_data_dir) if latent_cache is None else []
    start_vectors = None
    if config.init_embeddings:
        start_vectors = starting_vectors_by_encoder(config.init_embeddings, config.placeholder_token, config.num_vectors)
        config = dataclasses.replace(config, num_vectors=int(next(iter(start_vectors.values())).shape[0]))
    parts = load_model_parts(config.pretrained_model_name_or_path, config.revision, config.tokenizer_name)
    language = choose_language(config.language, config.pretrained_model_name_or_path, parts.family)
    identity = _run_identity(config, parts, image_paths, latent_cache)
    identity["language"] = language  # the templates change the examples, so a resume must keep them
    previous_record = _check_resume_identity(output_dir, identity) if resume_dir else None

    # --- latents: every view through the VAE once, then the VAE leaves memory -----------------
    if latent_cache is None:
        views = load_views(
            image_paths,
            config.image_height,
            config.image_width,
            config.center_crop,
            config.interpolation,
            config.dataloader_num_workers,
        )
        parts.vae.to(device)
        if config.cache_latents:
            latent_cache = encode_latent_cache(parts.vae, views, config.random_flip)
        else:
            latent_cache = LatentsEachStep(parts.vae, views, config.random_flip)  # keeps the VAE
        del views
    parts.vae = None
    num_images = latent_cache.num_images

    # --- the placeholder token: the only trainable tensors, [n, dim] per text encoder -----------
    trainable = add_placeholder(
        parts, config.placeholder_token, config.num_vectors, config.initializer_token, start_vectors, config.init_embeddings or ""
    )
    tokenizer = parts.tokenizer
    for part in parts.text_encoders:
        part.text_encoder.to(device)
        speed.apply_to_text_encoder(config, part.text_encoder)
    parts.unet = speed.apply_to_unet(config, parts.unet.to(device), device)
    trainable.to(device)

    # --- schedule --------------------------------------------------------------------------------
    resume_state, resume_rng = (None, None)
    if resume_dir is not None:
        resume_state, resume_rng = checkpoints.read_checkpoint(resume_dir, accelerator.process_index)
    seed = _choose_seed(config, previous_record, resume_state)
    stream = ExampleStream(
        num_images=num_images,
        repeats=config.repeats,
        templates=templates_for(config.learnable_property, language),
        placeholder_text=expand_placeholder(config.placeholder_token, config.placeholder_token, config.num_vectors),
        random_flip=config.random_flip and latent_cache.num_flips > 1,
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
    if accelerator.mixed_precision == "fp16":
        optimizer = accelerator.prepare(optimizer)  # steps through accelerate's loss scaler
    losses: list[float] = []
    start_step = 0
    if resume_state is not None:
        trainable.load_vectors(resume_state.vectors_by_encoder)
        optimizer.load_state_dict(resume_state.optimizer)
        lr_scheduler.load_state_dict(resume_state.lr_scheduler)
        losses = list(resume_state.losses)
        start_step = resume_state.step
        if resume_rng is not None:
            checkpoints.set_rng_state(resume_rng)
        logger.info("resuming from %s at step %d of %d", resume_dir, start_step, max_steps)
    else:
        torch.manual_seed(seed)  # only for anything a library draws; our draws use explicit generators
    model = accelerator.prepare(trainable)

    record = _run_record(config, seed, parts, identity, max_steps, learning_rate, device, num_processes)
    if previous_record is not None:
        record["resumed"] = previous_record.get("resumed", []) + [{"from_step": start_step, "at": _now()}]
    if accelerator.is_main_process:
        atomic_write_json(output_dir / RUN_FILE, record)
    run = RunContext(config, output_dir, parts, trainable, accelerator, stream, max_steps, seed, record)
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
    all_observers = [_Progress(show_progress), *observers]
    for observer in all_observers:
        observer.on_start(run)

    # --- the loop --------------------------------------------------------------------------------
    loss_settings = LossSettings.from_config(config)
    saved: list[Path] = []
    started = time.perf_counter()
    with _stop_on_signals(run):
        for step in range(start_step + 1, max_steps + 1):
            step_started = time.perf_counter()
            last_good = {name: vectors.detach().clone() for name, vectors in trainable.vectors_by_encoder().items()}
            step_loss = torch.zeros((), device=device)
            for micro in range(config.gradient_accumulation_steps):
                offset = (micro * num_processes + accelerator.process_index) * config.train_batch_size
                first = (step - 1) * examples_per_update + offset
                examples = [stream[index] for index in range(first, first + config.train_batch_size)]
                is_last_micro = micro == config.gradient_accumulation_steps - 1
                with accelerator.no_sync(model) if not is_last_micro else contextlib.nullcontext():
                    loss = denoising_loss(model, parts, tokenizer, latent_cache, examples, device, loss_settings)
                    accelerator.backward(loss / config.gradient_accumulation_steps)
                step_loss += loss.detach() / config.gradient_accumulation_steps
            mean_loss = float(accelerator.reduce(step_loss, reduction="mean")) if num_processes > 1 else float(step_loss)
            if not math.isfinite(mean_loss):
                _stop_diverged(run, f"the loss became {mean_loss} at step {step}", step - 1, optimizer, lr_scheduler, losses)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not trainable.all_finite():
                trainable.load_vectors(last_good)
                _stop_diverged(run, f"the token vectors became non-finite at step {step}", step - 1, optimizer, lr_scheduler, losses)
            losses.append(mean_loss)
            state = StepState(step, max_steps, mean_loss, lr_scheduler.get_last_lr()[0], time.perf_counter() - step_started)
            for observer in all_observers:
                observer.on_step(run, state)

            if accelerator.is_main_process and step % config.save_steps == 0 and step < max_steps:
                snapshot = output_dir / f"learned_embeds-steps-{step}.safetensors"
                saved.append(save_diffusers(_embedding(config, trainable, step), snapshot))
            stop = _agreed_stop(run)
            if (config.checkpointing_steps and step % config.checkpointing_steps == 0 and step < max_steps) or stop:
                checkpoint = _save_checkpoint(run, step, optimizer, lr_scheduler, losses)
                if stop:
                    _write_embedding(run, step)
                    _finish_record(run, "interrupted", step, losses, started, saved)
                    raise TrainingInterrupted(step, max_steps, stop, str(checkpoint))
    elapsed = time.perf_counter() - started

    # --- outputs ---------------------------------------------------------------------------------
    embedding = _embedding(config, trainable, max_steps)
    embedding_path = output_dir / EMBEDDING_FILE
    if accelerator.is_main_process:
        saved.append(save_diffusers(embedding, embedding_path))
        if not config.only_save_embeds:
            for part in parts.text_encoders:
                part.text_encoder.to(dtype=torch.float32)  # the saved pipeline keeps the base model's precision
            trainable.write_into_encoder()
            saved.extend(save_pipeline(parts, output_dir))
    record["vectors_sha256_by_rank"] = _vectors_digest_by_rank(run)
    if accelerator.is_main_process:
        _finish_record(run, "completed", max_steps, losses, started, saved, elapsed)
    trainable.detach_hook()
    accelerator.wait_for_everyone()
    result = TrainResult(output_dir, embedding_path, embedding, max_steps, losses, saved)
    for observer in all_observers:
        observer.on_end(run, result)
    logger.info("learned %s in %d steps (%.1f s); wrote %s", config.placeholder_token, max_steps, elapsed, embedding_path)
    return result


def starting_vectors_by_encoder(path: str, placeholder_token: str, num_vectors: int) -> dict[str, torch.Tensor]:
    """The ``[n, dim]`` vectors, by text encoder (SDXL files have two), of the token in an embedding file of any format
    (``--init_embeddings``).

    A file of several tokens must hold one named ``placeholder_token``. ``num_vectors`` other than
    1 (the default) must agree with the file; otherwise the file's count wins.
    """
    from textinv.embeddings import read_embeddings

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


@dataclass(frozen=True)
class LossSettings:
    """How :func:`denoising_loss` draws timesteps and weights examples (TrainConfig, issue 8)."""

    timestep_sampling: str = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    snr_gamma: Optional[float] = None

    @classmethod
    def from_config(cls, config: TrainConfig) -> "LossSettings":
        return cls(config.timestep_sampling, config.timestep_logit_mean, config.timestep_logit_std, config.snr_gamma)


def draw_timestep(generator: torch.Generator, num_train_timesteps: int, settings: LossSettings) -> torch.Tensor:
    """One timestep, shape [1], drawn from ``generator`` as ``settings`` say (one draw from it either way)."""
    if settings.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (1,), generator=generator)
    if settings.timestep_sampling == "logit_normal":
        logit = torch.randn((1,), generator=generator) * settings.timestep_logit_std + settings.timestep_logit_mean
        return (torch.sigmoid(logit) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    raise UserError(f"--timestep_sampling {settings.timestep_sampling!r} is not one of: uniform, logit_normal")


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example loss weights of min-SNR-gamma (Hang et al. 2023), for the scheduler's target.

    SNR(t) = alpha_bar / (1 - alpha_bar). The weight min(SNR, gamma) is for an x0 target; an epsilon
    target's error is the x0 error times SNR, a velocity target's times (SNR + 1), hence the division.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)[timesteps.long()]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1.0)
    else:  # "sample": the target is x0 itself
        weights = clipped
    return weights.float()


def loss_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, by the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise UserError(f"the model's scheduler has prediction_type {kind!r}, which textinv cannot train")


def denoising_loss(
    model: Any,
    parts: ModelParts,
    tokenizer: Any,
    latent_cache: LatentCache,
    examples: Sequence[Example],
    device: torch.device,
    settings: LossSettings = LossSettings(),
) -> torch.Tensor:
    """Mean-squared error of the UNet's prediction for a batch of examples (min-SNR weighted if asked).

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
        timesteps.append(draw_timestep(generator, scheduler.config.num_train_timesteps, settings))
    latents_t, noise_t, timesteps_t = torch.stack(latents), torch.stack(noises), torch.cat(timesteps)
    noisy = scheduler.add_noise(latents_t, noise_t, timesteps_t)
    target = loss_target(scheduler, latents_t, noise_t, timesteps_t)
    # Text conditioning and the UNet call, as the model family's pipeline does it (textinv.conditioning).
    prediction = predict(model, parts, [example.caption for example in examples], noisy, timesteps_t, device, tokenizer)
    if settings.snr_gamma is None:
        return F.mse_loss(prediction.float(), target.to(device).float())
    per_example = F.mse_loss(prediction.float(), target.to(device).float(), reduction="none").flatten(1).mean(1)
    return (per_example * min_snr_weights(scheduler, timesteps_t, settings.snr_gamma).to(device)).mean()


def save_pipeline(parts: ModelParts, output_dir: Path) -> list[Path]:
    """Write the full pipeline: the base model's parts, with the new tokenizer(s) and text encoder(s).

    Other parts are copied from the base folder (not re-saved from memory, so they stay
    byte-identical). model_index.json goes last: it marks the pipeline complete.
    """
    source = Path(parts.source)
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    # Every tokenizer and text encoder holds the new token (SDXL: both pairs).
    changed: dict[str, Any] = {}
    for part in parts.text_encoders:
        changed[part.tokenizer_name] = part.tokenizer
        changed[part.name] = part.text_encoder
    written = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        target = output_dir / name
        with atomic_dir(target) as tmp:
            if name in changed:
                changed[name].save_pretrained(tmp)
            else:
                shutil.copytree(source / name, tmp, dirs_exist_ok=True)
        written.append(target)
    written.append(atomic_write(output_dir / "model_index.json", lambda tmp: shutil.copyfile(source / "model_index.json", tmp)))
    return written


# --- output dir, resume, identity ------------------------------------------------------------------
def _processes_share_cpu() -> bool:
    """True for a multi-process launch (torchrun / accelerate) on a machine without CUDA.

    accelerate only picks its CPU (gloo) back-end when asked to, and would otherwise run each
    process as a separate single-process job; GPUs keep accelerate's own choice (NCCL).
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    return launched_processes > 1 and not torch.cuda.is_available()


def _prepare_output_dir(config: TrainConfig, output_dir: Path, accelerator: Any) -> Optional[Path]:
    """Check output_dir may be written; returns the checkpoint to resume from, if any."""
    if accelerator.is_main_process:
        check_writable_dir(output_dir, "--output_dir")
    accelerator.wait_for_everyone()
    if config.resume_from_checkpoint:
        checkpoint = checkpoints.resolve_checkpoint(config.resume_from_checkpoint, output_dir)
        if accelerator.is_main_process:
            _remove_stale_temporaries(output_dir)
        return checkpoint
    markers = previous_run_markers(output_dir) + [p.name for p in checkpoints.list_checkpoints(output_dir)][:2]
    if markers and not config.overwrite_output_dir:
        raise UserError(
            f"--output_dir {str(output_dir)!r} already holds another run's results ({', '.join(markers)}); "
            "choose a new --output_dir, pass --resume_from_checkpoint latest to continue it, "
            "or --overwrite_output_dir to replace it"
        )
    if markers and accelerator.is_main_process:
        for stale in output_dir.glob("learned_embeds-steps-*"):
            stale.unlink()
        for old in checkpoints.list_checkpoints(output_dir):
            shutil.rmtree(old)
        _remove_stale_temporaries(output_dir)
        logger.warning("--overwrite_output_dir: replacing the previous results in %s", output_dir)
    return None


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files/folders a killed run left behind (names made by textinv.files)."""
    for leftover in output_dir.glob(".*"):
        if leftover.name.endswith(".tmp") or ".old-" in leftover.name:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _run_identity(config: TrainConfig, parts: ModelParts, image_paths: Sequence[Path], latents: Optional[LatentCache]) -> dict[str, Any]:
    images: Any
    if latents is not None:
        images = {"latents_sha256": hashlib.sha256(latents.mean.numpy().tobytes()).hexdigest()}
    else:
        images = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in image_paths)
    identity = {
        "model": str(Path(parts.source).resolve()),
        "placeholder_token": config.placeholder_token,
        "num_vectors": config.num_vectors,
        "initializer_token": config.initializer_token,
        "init_embeddings": config.init_embeddings,
        "images": images,
        "learnable_property": config.learnable_property,
    }
    return json.loads(json.dumps(identity))  # the form it takes in run.json (lists, not tuples)


def _check_resume_identity(output_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    try:
        previous = json.loads((output_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(
            f"cannot resume: {str(output_dir / RUN_FILE)!r} is missing or damaged, so the run's settings are unknown"
        ) from None
    before = previous.get("identity", {})
    for key in IDENTITY_KEYS:
        earlier = before.get(key, IDENTITY_DEFAULTS.get(key))
        if earlier != identity[key]:
            shown = "the training images differ" if key == "images" else f"{key} was {earlier!r}, now {identity[key]!r}"
            raise UserError(
                f"cannot resume: {shown}; this is another run. Use the original settings, "
                "or start fresh in a new --output_dir"
            )
    return previous


def _choose_seed(config: TrainConfig, previous: Optional[dict[str, Any]], resume: Optional[checkpoints.CheckpointState]) -> int:
    if resume is not None:
        if config.seed is not None and config.seed != resume.seed:
            raise UserError(f"cannot resume: --seed {config.seed} differs from the run's seed {resume.seed}; drop --seed or use {resume.seed}")
        return resume.seed
    return config.seed if config.seed is not None else secrets.randbelow(2**31)


# --- stopping: signals, divergence -------------------------------------------------------------------
@contextlib.contextmanager
def _stop_on_signals(run: RunContext) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if run.stop_requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop_requested = signum
        logger.warning("%s received: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    # A signal the launcher set to be ignored (background jobs of a non-interactive shell ignore
    # SIGINT) stays ignored: whoever started us asked for that.
    watched = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, ask_to_stop) for sig in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _agreed_stop(run: RunContext) -> int:
    """The stop signal if any process was asked to stop (all processes stop at the same step)."""
    requested = run.stop_requested or 0
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([requested], device=run.accelerator.device)
        requested = int(run.accelerator.reduce(flag, reduction="sum").item() and max(requested, signal.SIGTERM))
    return requested


def _stop_diverged(run: RunContext, what: str, good_step: int, optimizer: Any, lr_scheduler: Any, losses: list[float]) -> None:
    where = ""
    if good_step > 0:
        checkpoint = _save_checkpoint(run, good_step, optimizer, lr_scheduler, losses)
        _write_embedding(run, good_step)
        where = f"; the last good vectors (step {good_step}) are in {run.output_dir / EMBEDDING_FILE} and {checkpoint}"
    _finish_record(run, "diverged", good_step, losses, None, [])
    raise TrainingDiverged(
        f"{what}{where}. Lower --learning_rate (e.g. by 10x), turn on --max_grad_norm 1.0, or train in fp32"
    )


def _save_checkpoint(run: RunContext, step: int, optimizer: Any, lr_scheduler: Any, losses: list[float]) -> Path:
    """Every process writes its RNG state into the staging folder; the main process renames it."""
    accelerator = run.accelerator
    target = run.output_dir / f"checkpoint-{step}"
    staging = run.output_dir / f".checkpoint-{step}.staging.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    checkpoints.write_rng_state(staging, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = checkpoints.CheckpointState(
            step=step,
            vectors=run.trainable.vectors.detach().cpu().clone(),
            vectors_by_encoder={name: v.detach().cpu().clone() for name, v in run.trainable.vectors_by_encoder().items()},
            optimizer=optimizer.state_dict(),
            lr_scheduler=lr_scheduler.state_dict(),
            losses=losses[:step],
            seed=run.seed,
        )
        with atomic_dir(target) as folder:
            for rng_file in staging.iterdir():
                os.replace(rng_file, folder / rng_file.name)
            checkpoints.write_state(folder, state)
            save_diffusers(_embedding(run.config, run.trainable, step), folder / EMBEDDING_FILE)
        shutil.rmtree(staging, ignore_errors=True)
        checkpoints.prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit)
        logger.info("saved %s", target)
    accelerator.wait_for_everyone()
    return target


def _write_embedding(run: RunContext, step: int) -> None:
    if run.is_main_process:
        save_diffusers(_embedding(run.config, run.trainable, step), run.output_dir / EMBEDDING_FILE)


def _vectors_digest_by_rank(run: RunContext) -> list[str]:
    """A digest of the final vectors from every process (they must agree under DDP)."""
    vectors = torch.cat([v.detach().float().flatten() for v in run.trainable.vectors_by_encoder().values()])
    gathered = run.accelerator.gather(vectors.unsqueeze(0)) if run.accelerator.num_processes > 1 else vectors.unsqueeze(0)
    return [hashlib.sha256(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in gathered]


def _embedding(config: TrainConfig, trainable: TrainableTextEncoders, step: int) -> Embedding:
    return Embedding(
        token=config.placeholder_token,
        vectors={name: v.detach().float().cpu().clone() for name, v in trainable.vectors_by_encoder().items()},
        step=step,
    )


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


# --- run record (run.json) ----------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _run_record(
    config: TrainConfig,
    seed: int,
    parts: ModelParts,
    identity: dict[str, Any],
    max_steps: int,
    learning_rate: float,
    device: torch.device,
    num_processes: int,
) -> dict[str, Any]:
    import accelerate
    import diffusers
    import transformers

    import textinv

    config_record = config.to_dict()
    if config_record.get("hub_token"):
        config_record["hub_token"] = "<redacted>"  # a secret: run.json is uploaded with --push_to_hub
    return {
        "status": "running",
        "config": config_record,
        "identity": identity,
        "seed": seed,
        "model": {"source": parts.source, "family": parts.family, "prediction_type": parts.prediction_type},
        "max_train_steps": max_steps,
        "effective_learning_rate": learning_rate,
        "device": str(device),
        "num_processes": num_processes,
        "versions": {
            "textinv": textinv.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "started_at": _now(),
        "pid": os.getpid(),
    }


def _finish_record(
    run: RunContext,
    status: str,
    step: int,
    losses: list[float],
    started: Optional[float],
    saved: list[Path],
    elapsed: Optional[float] = None,
) -> None:
    if not run.is_main_process:
        return
    record = run.record
    record.update(status=status, steps_done=step, finished_at=_now())
    if losses:
        record.update(final_loss=losses[-1], best_loss=min(losses))
    if elapsed is None and started is not None:
        elapsed = time.perf_counter() - started
    if elapsed is not None:
        record.update(train_seconds=round(elapsed, 3))
        timings = record.setdefault("timings", {})  # observers add theirs (validation_seconds...)
        timings["train_seconds"] = round(elapsed, 3)
        steps_this_session = step - record.get("resumed", [{}])[-1].get("from_step", 0)
        if steps_this_session > 0:
            timings["seconds_per_step"] = round(elapsed / steps_this_session, 4)
    record["outputs"] = sorted({*record.get("outputs", []), *(str(p.relative_to(run.output_dir)) for p in saved)})
    atomic_write_json(run.output_dir / RUN_FILE, record)


def add_outputs(run: RunContext, paths: Sequence[Path], persist: bool = False) -> None:
    """List files an observer wrote under run.json's "outputs" (written at the end of the run,
    or at once with ``persist``, for files written after it ended, such as the model card)."""
    if not run.is_main_process:
        return
    names = {str(Path(p).relative_to(run.output_dir)) if Path(p).is_relative_to(run.output_dir) else str(p) for p in paths}
    run.record["outputs"] = sorted({*run.record.get("outputs", []), *names})
    if persist:
        atomic_write_json(run.output_dir / RUN_FILE, run.record)


class _Progress(TrainObserver):
    """A tqdm bar on a terminal; plain log lines (about 20 a run) otherwise. Main process only.

    Both show the step, loss, learning rate, seconds per step and the time left; seconds per step
    is wall time (validation rounds included), so the estimate is what the run will really take.
    """

    LINES_PER_RUN = 20

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.started = time.perf_counter()
        self.first_step = 0
        self.every = 1

    def on_start(self, run: RunContext) -> None:
        self.enabled = self.enabled and run.is_main_process
        self.every = max(1, math.ceil(run.max_steps / self.LINES_PER_RUN))
        self.started = time.perf_counter()

    def on_step(self, run: RunContext, state: StepState) -> None:
        if not self.enabled:
            return
        if not self.first_step:
            self.first_step = state.step
            self.started = time.perf_counter() - state.step_seconds
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                # initial=: a resumed run's bar starts where it stopped.
                self.bar = tqdm(
                    total=state.max_steps,
                    initial=state.step - 1,
                    desc="train",
                    unit="step",
                    dynamic_ncols=True,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}",
                )
        done = state.step - self.first_step + 1
        per_step = (time.perf_counter() - self.started) / done
        eta = clock_text(per_step * (state.max_steps - state.step))
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {state.loss:.4f} lr {state.lr:.2e} {per_step:.3f} s/step ETA {eta}", refresh=False)
            self.bar.update(1)
        elif state.step % self.every == 0 or state.step == state.max_steps:
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.3f s/step ETA %s",
                state.step,
                state.max_steps,
                state.loss,
                state.lr,
                per_step,
                eta,
            )

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        if self.bar is not None:
            self.bar.close()


def clock_text(seconds: float) -> str:
    """``h:mm:ss`` for a duration (the CLI's progress line and the web page's ETA)."""
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

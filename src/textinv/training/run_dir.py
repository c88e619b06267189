"""The run's folder: may it be written, is a resume the same run, and run.json.

A run never writes into an output_dir holding another run's results unless told to
(``--overwrite_output_dir``); a resume must share the settings of :data:`IDENTITY_KEYS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import TrainConfig, UserError
from textinv.cpu_threads import ThreadChoice, apply_cpu_threads, choose_cpu_threads
from textinv.data.latents import LatentCache
from textinv.events import RUN_FILE, RunContext
from textinv.files import atomic_write_json, check_writable_dir, refuse_another_runs_results
from textinv.models.loading import ModelParts
from textinv.training import checkpoints

logger = logging.getLogger(__name__)

# Settings a resumed run must share with the run it continues (else it is another run).
IDENTITY_KEYS = (
    "model",
    "placeholder_token",
    "num_vectors",
    "initializer_token",
    "init_embeddings",
    "images",
    "text_encoders",
    "lora",
    "learnable_property",
    "language",
    "noise_offset",  # issue 15: another noise, another run
    "data",  # issue 17: captions, buckets, masks, latent sampling
    "optimizer",  # issue 27: another optimizer's state cannot continue this one's
    "embedding_norm",  # issue 27: --preserve_embedding_norm / --max_embedding_norm
)
# What a run.json written before a key existed meant by its absence.
IDENTITY_DEFAULTS: dict[str, Any] = {
    "language": "en",
    "noise_offset": 0.0,
    "data": None,
    "text_encoders": None,
    "lora": None,
    "optimizer": "adamw",
    "embedding_norm": None,
}


def prepare_output_dir(config: TrainConfig, output_dir: Path, accelerator: Any) -> Optional[Path]:
    """Check output_dir may be written; returns the checkpoint to resume from, if any."""
    if accelerator.is_main_process:
        check_writable_dir(output_dir, "--output_dir")
    accelerator.wait_for_everyone()
    if config.resume_from_checkpoint:
        checkpoint = checkpoints.resolve_checkpoint(config.resume_from_checkpoint, output_dir)
        if accelerator.is_main_process:
            _remove_stale_temporaries(output_dir)
        return checkpoint
    markers = refuse_another_runs_results(output_dir, config.overwrite_output_dir)
    if markers and accelerator.is_main_process:
        # Snapshots, best files and every LoRA file: a run without --lora_rank writes none that would replace them, and
        # `generate --lora <folder>` would pair the old adapters with the new word.
        tagged = ("learned_embeds-*", "pytorch_lora_weights*", "learned_embeds_lora*")  # -steps-N, -best, -<concept>
        for stale in [path for pattern in tagged for path in output_dir.glob(pattern)]:
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


def run_identity(
    config: TrainConfig, parts: ModelParts, image_paths: Sequence[Path], latents: Optional[LatentCache]
) -> dict[str, Any]:
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
        "noise_offset": config.noise_offset,
        # Which encoders learn the word (issue 25); every one of the model's when not given.
        "text_encoders": sorted(config.text_encoders) or None,
        "lora": config.lora_settings,  # pivotal tuning (issue 26): None for plain textual inversion
        "optimizer": config.optimizer,
        "embedding_norm": config.embedding_norm_settings,  # None without a norm rule
    }
    return json.loads(json.dumps(identity))  # the form it takes in run.json (lists, not tuples)


def data_identity(config: TrainConfig, data: Any) -> Optional[dict[str, Any]]:
    """The data options in force and what they read (caption source and digest, buckets, masks' digest);
    None when every data option is off, as in runs from before they existed."""
    options = config.data_features()
    if options is None:
        return None
    read = data.record() if data is not None else {}
    return json.loads(json.dumps({"options": options, **read}))


def check_resume_identity(output_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
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
            shown = (
                "the training images differ"
                if key == "images"
                else "the data options or what they read (captions, buckets, masks) differ"
                if key == "data"
                else f"{key} was {earlier!r}, now {identity[key]!r}"
            )
            raise UserError(
                f"cannot resume: {shown}; this is another run. Use the original settings, "
                "or start fresh in a new --output_dir"
            )
    return previous


def choose_seed(
    config: TrainConfig, previous: Optional[dict[str, Any]], resume: Optional[checkpoints.CheckpointState]
) -> int:
    if resume is not None:
        if config.seed is not None and config.seed != resume.seed:
            raise UserError(
                f"cannot resume: --seed {config.seed} differs from the run's seed {resume.seed}; drop --seed or use {resume.seed}"
            )
        return resume.seed
    return config.seed if config.seed is not None else secrets.randbelow(2**31)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_record(
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
        "model": {"source": parts.source, "family": parts.family.name, "prediction_type": parts.prediction_type},
        "max_train_steps": max_steps,
        "effective_learning_rate": learning_rate,
        "optimizer": config.optimizer_settings,  # the arguments it was built with (before --scale_lr), its schedule
        "embedding_norm": config.embedding_norm_settings,
        "device": str(device),
        "num_processes": num_processes,
        "torch_threads": torch.get_num_threads(),  # CPU runs are bit-identical at the same thread count only
        "versions": {
            "textinv": textinv.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "started_at": now(),
        "pid": os.getpid(),
    }


def finish_record(
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
    record.update(status=status, steps_done=step, finished_at=now())
    if losses:
        # The training loss is each step's draw: its minimum is no "best" (that is eval's best_loss, held out).
        record.update(final_loss=losses[-1], lowest_train_loss=min(losses))
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


def choose_threads(
    config: TrainConfig, output_dir: Path, resuming: bool, device: torch.device
) -> Optional[ThreadChoice]:
    """On a CPU, set torch's thread count (textinv.cpu_threads): --cpu_threads, OMP_NUM_THREADS, a resumed run's, or
    the free cores; one log line. None elsewhere."""
    if device.type != "cpu":
        return None
    resumed = None
    if resuming:
        try:
            resumed = json.loads((output_dir / RUN_FILE).read_text(encoding="utf-8")).get("torch_threads")
        except (OSError, ValueError):
            resumed = None  # check_resume_identity says what is wrong with run.json
    choice = choose_cpu_threads(config.cpu_threads, resumed, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    apply_cpu_threads(choice)
    logger.info("%s", choice.text())
    return choice


def tokens_text(recipe: Any) -> str:
    return ", ".join(word.config.placeholder_token for word in recipe.concepts)


def time_text(recipe: Any, loop_seconds: float, evaluation_seconds: float, validation_seconds: float) -> str:
    """The closing line's times, adding up to the whole run's (issue 28): loading (model, images, the set-up before the
    first step), the steps, the held-out evaluations (the one before the first step included) and validation rounds."""
    total = time.perf_counter() - recipe.created
    loading = recipe.started - recipe.created - recipe.setup_evaluation_seconds
    steps = loop_seconds - (evaluation_seconds - recipe.setup_evaluation_seconds) - validation_seconds
    parts = [
        ("loading", loading),
        ("steps", steps),
        ("evaluation", evaluation_seconds),
        ("validation", validation_seconds),
    ]
    shown = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts if seconds > 0 or name == "steps")
    return f"{total:.1f} s in all: {shown}"


def warn_if_threads_differ(previous: Optional[dict[str, Any]], device: torch.device) -> None:
    """A CPU run resumed with another torch thread count sums in another order: say it will not be bit-identical."""
    before = (previous or {}).get("torch_threads")
    if device.type == "cpu" and before is not None and before != torch.get_num_threads():
        logger.warning(
            "the run used %d CPU threads and this resume uses %d: the vectors will differ slightly (about 1e-6 of the largest entry) from an "
            "uninterrupted run; set OMP_NUM_THREADS=%d for bit-identical ones",
            before,
            torch.get_num_threads(),
            before,
        )


def vectors_digest_by_rank(run: RunContext) -> list[str]:
    """A digest of the final vectors from every process (they must agree under DDP)."""
    accelerator = run.accelerator
    vectors = torch.cat([v.detach().float().flatten() for v in run.trainable.vectors_by_encoder().values()])
    gathered = accelerator.gather(vectors.unsqueeze(0)) if accelerator.num_processes > 1 else vectors.unsqueeze(0)
    return [hashlib.sha256(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in gathered]

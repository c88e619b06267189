"""What the page does, without the page: :class:`ServerState` holds one training job behind a lock, writes the
trained embedding in the format asked for, reads uploaded embeddings and generates images.

A job trains one word, or several at once (``<cat-toy> <my-style>`` in the placeholder field: textinv.serve.words
lays the job out for ``--concepts``); downloads and generation then use every word's file.

Safe to call from several request threads at once; a test drives it directly (tests/test_serve.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from textinv.config import TrainConfig, UserError
from textinv.data.concepts import concept_configs
from textinv.serve.captions import STORED_SUFFIX, gather_captions, split_uploads, write_captions
from textinv.serve.checks import check_model_folder
from textinv.serve.exports import EXPORT_FORMATS, export_format, export_formats_for, export_words, token_slug
from textinv.serve.jobs import JobSnapshot, TrainingJob, TrainRequest
from textinv.serve.uploads import UploadLimits, safe_stem, store_embedding_file, store_images
from textinv.serve.words import (
    IMAGES_DIR,
    Word,
    assign_images,
    parse_words,
    store_word_images,
    validation_prompts,
    write_concepts_file,
)

logger = logging.getLogger(__name__)

# The formats' names stay importable from here (the page's and the tests' imports).
__all__ = ["EXPORT_FORMATS", "GenerateRequest", "LoadedEmbedding", "ServerState", "export_formats_for", "token_slug"]

TINY_MODEL_DIR = "models/tiny-sd1"
LORA_FILE = "pytorch_lora_weights.safetensors"  # a pivotal-tuning run's adapters, beside its word (issue 26)
MAX_STEPS = 100_000


# --- a model's image size ----------------------------------------------------------------------------
def native_resolution(model_dir: Path) -> int:
    """The image side the model was made for: the UNet's sample size times the VAE's downscaling."""
    try:
        unet = json.loads((model_dir / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((model_dir / "vae" / "config.json").read_text(encoding="utf-8"))
        sample = unet["sample_size"]
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        size = int(sample) * 2 ** max(len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1, 0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError):
        return 512  # SD 1.x's size: a safe guess when the configs say nothing usable
    # Fuzzing found an empty block_out_channels (a size of 4.0) and negative sizes: also nothing usable.
    return size if 8 <= size <= 8192 else 512


# --- the server's state: one job at a time, exports, generation ------------------------------------
@dataclass(frozen=True)
class LoadedEmbedding:
    """An embedding file a person uploaded, copied into the server's folder and read once."""

    path: Path
    tokens: tuple[str, ...]
    format: str
    family: str
    num_vectors: int

    def describe(self) -> str:
        return f"loaded {', '.join(self.tokens)} ({self.format}, {self.family}, {self.num_vectors} vector(s))"


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    model: str = ""  # empty: the server's default model
    embedding: Optional[LoadedEmbedding] = None  # None: the embedding trained last, if any
    token: str = ""  # load the uploaded embedding under this name instead of its own
    num_images: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0


@dataclass
class GenerateOutcome:
    images: list[Any]
    paths: list[Path]
    message: str


class ServerState:
    """Everything the page does, without the page: safe to call from several request threads at once."""

    def __init__(
        self,
        work_dir: Path,
        default_model: Optional[Path] = None,
        limits: UploadLimits = UploadLimits(),
        device: Optional[str] = None,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.device = device
        self._default_model = default_model
        self._job_lock = threading.Lock()  # one training job at a time: check-and-start happens under it
        self._model_lock = threading.Lock()  # the tiny pipeline is built once
        self._generate_lock = threading.Lock()  # one pipeline in memory, used by one request at a time
        self._job: Optional[TrainingJob] = None
        self._pipeline: Any = None
        self._pipeline_key: Optional[tuple[Any, ...]] = None
        self._tokens: tuple[str, ...] = ()  # the tokens loaded into that pipeline
        self._names = itertools.count(1)

    @property
    def downloads_dir(self) -> Path:
        """The only folder whose files the page hands to browsers (exports, generated images)."""
        return self.work_dir / "downloads"

    # --- models -----------------------------------------------------------------------------------
    def default_model(self) -> Path:
        """The --model folder, or the tiny demo pipeline built once into the work folder (nothing is downloaded)."""
        with self._model_lock:
            if self._default_model is None:
                from textinv.tiny import build_tiny_pipeline

                path = self.work_dir / TINY_MODEL_DIR
                if not (path / "model_index.json").is_file():
                    shutil.rmtree(path, ignore_errors=True)  # a build that was cut short
                    logger.info("building the tiny demo pipeline in %s", path)
                    build_tiny_pipeline(path, seed=0)
                self._default_model = path
            return self._default_model

    def resolve_model(self, text: str) -> Path:
        return check_model_folder(text) if text and text.strip() else self.default_model()

    # --- training -----------------------------------------------------------------------------------
    def _refuse_if_busy(self) -> None:
        job = self._job
        if job is not None and job.active:
            snap = job.snapshot()
            raise UserError(
                f"a training job is already running ({snap.job_id}, step {snap.step}/{snap.max_steps}); "
                "stop it or wait for it to finish before starting another"
            )

    def start(self, request: TrainRequest) -> TrainingJob:
        """Check the form, store the images and their captions, and start training in a thread (refused while
        a job runs)."""
        self._refuse_if_busy()  # before any work: the common case of a second click
        placeholder = request.placeholder_token.strip()
        initializer = request.initializer_token.strip()
        if not placeholder:
            raise UserError("type a placeholder token, the new word to learn, e.g. <cat-toy>")
        if not initializer:
            raise UserError("type an initializer word: one word close to your object or style, e.g. toy or painting")
        words = parse_words(placeholder, initializer)  # [] for one word: the form as it always was
        if words and request.lora_rank:
            raise UserError(
                f"the LoRA (rank {request.lora_rank}) trains with one word, and the placeholder field holds "
                f"{len(words)}; train one word, or set the LoRA rank to 0"
            )
        steps = int(request.max_train_steps or 0)
        if not 1 <= steps <= MAX_STEPS:
            raise UserError(f"steps must be between 1 and {MAX_STEPS}, not {steps}")
        if not float(request.learning_rate or 0) > 0:
            raise UserError(f"the learning rate must be > 0 (e.g. 5e-3), not {request.learning_rate}")
        model_dir = self.resolve_model(request.model)
        job_id = f"job-{next(self._names):03d}"
        folder = self.work_dir / "jobs" / f"{job_id}-{secrets.token_hex(3)}"  # random part: never reuse an old folder
        uploads, caption_files = split_uploads(request.images)
        owners = assign_images(uploads, words, self.limits) if words else []  # each image's word, by its file name
        captions = gather_captions(caption_files, request.captions, [name for _, name in uploads], self.limits)
        try:
            if words:
                images = store_word_images(uploads, owners, words, folder / IMAGES_DIR, self.limits)
            else:
                images = store_images(uploads, folder / IMAGES_DIR, self.limits)
            write_captions(images, captions)
            config = self._train_config(request, placeholder, initializer, steps, model_dir, folder, bool(captions))
            if words:
                config = self._words_config(config, request, words, owners, captions, folder, job_id)
            config.validate()
            with self._job_lock:
                self._refuse_if_busy()  # again, atomically: two clicks may both have passed the first check
                counts = [owners.count(number) for number in range(len(words))]
                job = TrainingJob(job_id, config, folder, len(images), len(captions), words, counts)
                self._job = job
                self.release_pipeline()  # training needs the GPU memory the generation pipeline holds
                job.launch()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        logger.info(
            "%s: %d image(s) (%d with a caption)%s, %d steps at %d px on %s, into %s",
            job_id,
            len(images),
            len(captions),
            f" for {job.tokens_text}" if words else "",
            steps,
            config.resolution,
            model_dir,
            config.output_dir,
        )
        return job

    def _train_config(
        self,
        request: TrainRequest,
        placeholder: str,
        initializer: str,
        steps: int,
        model_dir: Path,
        folder: Path,
        captioned: bool = False,
    ) -> TrainConfig:
        prompt = request.validation_prompt.replace("{token}", placeholder).strip()
        every = int(request.validation_steps or 0) or max(1, steps // 5)
        return TrainConfig(
            pretrained_model_name_or_path=str(model_dir),
            train_data_dir=str(folder / IMAGES_DIR),
            placeholder_token=placeholder,
            initializer_token=initializer,
            learnable_property=request.learnable_property,
            resolution=native_resolution(model_dir),
            max_train_steps=steps,  # batch, schedule and the held-out evaluation: TrainConfig's, as `textinv train`
            learning_rate=float(request.learning_rate),
            seed=int(request.seed),
            output_dir=str(folder / "output"),
            only_save_embeds=True,  # the page generates from the base model plus the embedding
            checkpoints_total_limit=2,
            report_to="none",
            validation_prompt=[prompt] if prompt else [],
            validation_steps=every if prompt else None,
            num_validation_images=int(request.num_validation_images),
            validation_num_inference_steps=int(request.validation_num_inference_steps),
            # Captions are stored as NN-stem.txt beside the images; without any, TrainConfig's default (None).
            caption_extension=STORED_SUFFIX if captioned else None,
            lora_rank=int(request.lora_rank or 0),
            optimizer=request.optimizer or "adamw",
            preserve_embedding_norm=bool(request.preserve_embedding_norm),
        )

    @staticmethod
    def _words_config(
        config: TrainConfig,
        request: TrainRequest,
        words: list[Word],
        owners: list[int],
        captions: dict[int, str],
        folder: Path,
        job_id: str,
    ) -> TrainConfig:
        """A several-word job's config: the one-word form's options for every word, each word's own (token, start,
        images, captions) in concepts.toml; the file is read now, as training will, so a mistake is said before
        anything starts."""
        concepts = write_concepts_file(folder, words, owners, captions, job_id)
        config = dataclasses.replace(
            config,
            concepts=str(concepts),
            placeholder_token="",  # each [[concept]] gives its own
            train_data_dir="",
            initializer_token=None,
            caption_extension=None,  # set by the words with captions
            validation_prompt=validation_prompts(request.validation_prompt, words),
        )
        concept_configs(config)
        return config

    def stop(self) -> JobSnapshot:
        with self._job_lock:
            job = self._job
            if job is None or not job.active:
                raise UserError("no training is running")
            job.request_stop()
            return job.snapshot()

    def resume(self) -> JobSnapshot:
        """Continue the last stopped job from its latest checkpoint, with the same settings."""
        from textinv.training.checkpoints import list_checkpoints

        with self._job_lock:
            job = self._job
            if job is None:
                raise UserError("nothing to resume: start a training first")
            if job.active:
                raise UserError(f"{job.job_id} is still running; there is nothing to resume")
            if job.status != "stopped":
                raise UserError(
                    f"nothing to resume: {job.job_id} {job.status}, it was not stopped; start a new training"
                )
            if not list_checkpoints(job.output_dir):
                raise UserError(f"{job.job_id} has no checkpoint to resume from; start a new training")
            self.release_pipeline()
            job.launch(resume=True)
            return job.snapshot()

    def release_pipeline(self) -> None:
        """Drop the generation pipeline (after a generation in progress ends) and give its GPU memory back."""
        with self._generate_lock:
            if self._pipeline is None:
                return
            self._pipeline, self._pipeline_key, self._tokens = None, None, ()
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("released the generation pipeline for training")

    def snapshot(self) -> Optional[JobSnapshot]:
        job = self._job
        return None if job is None else job.snapshot()

    def shutdown(self, timeout: float = 120.0) -> None:
        """On server exit: ask a running job to stop, so it leaves a resumable checkpoint."""
        job = self._job
        if job is not None and job.active:
            logger.info("stopping %s before exiting (it writes a checkpoint)", job.job_id)
            job.request_stop()
            if not job.join(timeout):
                logger.warning("%s did not stop within %.0f s; resume it from its last checkpoint", job.job_id, timeout)

    # --- downloads --------------------------------------------------------------------------------------
    def trained_embeddings(self) -> tuple[str, tuple[Path, ...]]:
        """(job id, every word's file) of the last job, once it is done or stopped: one file, or one per word."""
        snap = self.snapshot()
        if snap is None:
            raise UserError("no embedding yet: train one first (or load an embedding file to generate with)")
        if snap.active:
            raise UserError(f"{snap.job_id} is still training; its embedding is ready when it is done or stopped")
        if not snap.embeddings:
            raise UserError(f"{snap.job_id} wrote no embedding (it {snap.status} before its first step)")
        return snap.job_id, snap.embeddings

    def trained_embedding(self) -> tuple[str, Path]:
        """(job id, embedding file) of the last job; a several-word job's first word."""
        job_id, files = self.trained_embeddings()
        return job_id, files[0]

    def export(self, format_key: str) -> Path:
        """The trained embedding written in one of :data:`EXPORT_FORMATS` under the downloads folder (a several-word
        job's first word: :meth:`export_all` writes them all)."""
        return self.export_all(format_key)[0]

    def export_all(self, format_key: str) -> list[Path]:
        """Every trained word's file written in one of :data:`EXPORT_FORMATS`, under the downloads folder."""
        chosen = export_format(format_key)
        job_id, sources = self.trained_embeddings()
        return export_words(sources, chosen, self.downloads_dir / job_id)

    # --- generation ----------------------------------------------------------------------------------
    def load_embedding(self, source: str | os.PathLike[str], original_name: str) -> LoadedEmbedding:
        """Store an uploaded embedding file (any format textinv reads) and describe it."""
        from textinv.embeddings import describe

        name = f"upload-{next(self._names):03d}-{safe_stem(original_name, 'embedding')}"
        path = store_embedding_file(source, original_name, self.work_dir / "embeddings", self.limits, name=name)
        info = describe(path)
        tokens = info["tokens"]
        families = "/".join(sorted({entry["family"] for entry in tokens}))
        return LoadedEmbedding(
            path, tuple(e["token"] for e in tokens), info["format"], families, tokens[0]["num_vectors"]
        )

    def generate(self, request: GenerateRequest) -> GenerateOutcome:
        """Images from ``request.prompt`` with the uploaded embedding, else the trained one (if any)."""
        from textinv.embeddings import load_embeddings
        from textinv.inference.generation import generate, load_lora, load_pipeline

        if not request.prompt.strip():
            raise UserError("type a prompt")
        if not 1 <= int(request.num_images) <= 8:
            raise UserError("images: between 1 and 8")
        if not 1 <= int(request.num_inference_steps) <= 200:
            raise UserError("sampling steps: between 1 and 200")
        model_dir = self.resolve_model(request.model)
        paths: tuple[Path, ...] = ()  # the embedding files to load: an upload, or every word trained last
        rename = request.token.strip() or None
        if request.embedding is not None:
            paths = (request.embedding.path,)
        else:
            snap = self.snapshot()
            if snap is not None and snap.embeddings:
                paths, rename = snap.embeddings, None
        stamps = tuple(path.stat().st_mtime_ns for path in paths)
        # A trained run's LoRA (pivotal tuning) goes with its word; an uploaded embedding comes alone.
        lora = paths[0].parent / LORA_FILE if paths and request.embedding is None else None
        lora = lora if lora is not None and lora.is_file() else None
        key = (str(model_dir), tuple(map(str, paths)), stamps, rename, self.device, str(lora))
        with self._generate_lock:
            if key != self._pipeline_key:
                self._pipeline, self._pipeline_key = None, None  # free the old one before loading
                pipe = load_pipeline(str(model_dir), device=self.device)
                tokens = [token for path in paths for token in load_embeddings(pipe, path, token=rename)]
                if lora is not None:
                    load_lora(pipe, lora, load_words=False)
                self._pipeline, self._pipeline_key, self._tokens = pipe, key, tuple(tokens)
            tokens = list(self._tokens)
            # {token} in the prompt stands for the embedding's word, as in the validation prompt; for a several-word
            # job's words, all of them in order (a prompt can name each word itself too).
            named = tokens[0] if len(paths) == 1 else " ".join(tokens)
            prompt = request.prompt.replace("{token}", named) if tokens else request.prompt
            result = generate(
                self._pipeline,
                prompt,
                num_images=int(request.num_images),
                num_inference_steps=int(request.num_inference_steps),
                guidance_scale=float(request.guidance_scale),
                seed=int(request.seed),
                output_dir=self.downloads_dir / "images",
            )
        with_what = f"with {', '.join(tokens)}" if tokens else "without an embedding (train one or load a file)"
        message = f"{len(result.images)} image(s) of '{prompt}' {with_what}, seed {result.seeds[0]}"
        if tokens and not any(token in prompt for token in tokens):
            message += f"; note: the prompt does not contain {tokens[0] if len(paths) == 1 else ' or '.join(tokens)}"
        return GenerateOutcome(result.images, result.paths, message)

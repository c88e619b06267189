"""``textinv serve``: a local web page to train a token, watch it learn, download it and generate with it.

The page is a thin Gradio layer (:func:`build_app`) over plain classes that a test can drive without
a browser: :class:`ServerState` (one training job at a time, exports, generation), :class:`TrainingJob`
(a :func:`textinv.training.train` call in a thread, watched through a :class:`TrainObserver`) and
:mod:`textinv.web_uploads` (what a browser sends). Training, formats and generation are the very
functions the CLI calls; nothing here trains or writes a file format of its own.

The page can start work on this machine and read model folders on it, so it listens on the
loopback address unless ``--allow_remote`` says otherwise; analytics and share tunnels are off.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from textinv.config import TrainConfig, TrainingInterrupted, UserError, first_line
from textinv.training import EMBEDDING_FILE, TrainObserver, clock_text
from textinv.validation import GRID_FILE, VALIDATION_DIR
from textinv.web_uploads import UploadLimits, safe_stem, store_embedding_file, store_images

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
TINY_MODEL_DIR = "models/tiny-sd1"
MAX_STEPS = 100_000
MAX_ERROR_CHARS = 400
ACTIVE = ("starting", "running", "stopping")


# --- rules of the command line ----------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless asked for explicitly; warn when it is."""
    if not host or not host.strip():
        raise UserError("--host is empty; give an address such as 127.0.0.1")
    if is_loopback(host):
        return
    if not allow_remote:
        raise UserError(
            f"--host {host} is reachable from other machines, and the page can start training and read model "
            "folders here; pass --allow_remote as well if that is what you want"
        )
    logger.warning(
        "warning: serving on %s: anyone who can reach this address can train, read model folders and use the CPU/GPU "
        "(there is no login); prefer 127.0.0.1 with an SSH tunnel",
        host,
    )


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} must be between 1 and 65535")


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Whitespace (newlines included) folded to single spaces, cut to ``limit`` characters."""
    folded = " ".join(str(text).split())
    return folded if len(folded) <= limit else folded[: limit - 3] + "..."


def render_error(error: BaseException) -> str:
    """What the page shows for a failure: one line. Unexpected ones are logged with their traceback."""
    if isinstance(error, UserError):
        return one_line("error: " + str(error))
    logger.error("internal error in the web page", exc_info=error)
    return one_line(f"internal error: {type(error).__name__}: {first_line(error)} (the server log has the details)")


def check_model_folder(text: str) -> Path:
    """A local diffusers pipeline folder, or a one-line UserError (a hub id is never downloaded here)."""
    from textinv.models import check_pipeline_dir

    shown = text.strip()
    path = Path(shown).expanduser()
    if not path.exists():
        raise UserError(
            f"model folder {shown!r} does not exist; give a local diffusers pipeline folder (with model_index.json), "
            "or leave the field empty for the tiny demo model"
        )
    if not path.is_dir():
        raise UserError(f"model {shown!r} is a file; give a diffusers pipeline folder (with model_index.json)")
    check_pipeline_dir(path)  # one line naming what is missing or unsupported
    return path.resolve()


def native_resolution(model_dir: Path) -> int:
    """The image side the model was made for: the UNet's sample size times the VAE's downscaling."""
    try:
        unet = json.loads((model_dir / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((model_dir / "vae" / "config.json").read_text(encoding="utf-8"))
        sample = unet["sample_size"]
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 512  # SD 1.x's size: a safe guess when the configs say nothing usable


def token_slug(token: str) -> str:
    """A file-name stem for a token: ``<cat-toy>`` -> ``cat-toy`` (the web UI names the word by the file)."""
    return safe_stem(token.replace(".", "-"), "embedding")


# --- embedding formats to download -----------------------------------------------------------------
@dataclass(frozen=True)
class ExportFormat:
    key: str
    writer_format: str  # textinv.embeddings.write_embedding's format name
    suffix: str
    label: str
    two_encoders: bool = False  # SDXL's layout; the others hold one text encoder's vectors


EXPORT_FORMATS: dict[str, ExportFormat] = {
    f.key: f
    for f in (
        ExportFormat("diffusers", "diffusers", ".safetensors", "diffusers .safetensors"),
        ExportFormat("diffusers-bin", "diffusers", ".bin", "diffusers .bin (torch file)"),
        ExportFormat("a1111", "a1111", ".pt", "AUTOMATIC1111 .pt"),
        ExportFormat("a1111-safetensors", "a1111", ".safetensors", "AUTOMATIC1111 .safetensors"),
        ExportFormat("sdxl", "sdxl", ".safetensors", "SDXL .safetensors (clip_l + clip_g)", two_encoders=True),
        ExportFormat("pdparams", "pdparams", ".pdparams", "ppdiffusers .pdparams"),
    )
}


def export_formats_for(embedding: Any) -> list[ExportFormat]:
    """The formats that can hold this embedding: SDXL's for two text encoders, the others for one."""
    two = len(embedding.vectors) == 2
    return [f for f in EXPORT_FORMATS.values() if f.two_encoders == two]


# --- one training run in a thread -------------------------------------------------------------------
@dataclass(frozen=True)
class TrainRequest:
    """What the training form sends; ``images`` are (file the web framework stored, name the browser gave)."""

    images: Sequence[tuple[str, str]]
    placeholder_token: str
    initializer_token: str
    learnable_property: str = "object"
    model: str = ""  # empty: the server's default model
    max_train_steps: int = 200
    learning_rate: float = 5e-3
    validation_prompt: str = "a photo of {token}"  # empty: no validation images
    validation_steps: int = 0  # 0: five rounds per run
    num_validation_images: int = 2
    validation_num_inference_steps: int = 25
    seed: int = 0


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a job's progress, for the page to show."""

    job_id: str
    status: str
    step: int
    max_steps: int
    losses: tuple[float, ...]
    seconds_per_step: Optional[float]
    eta_seconds: Optional[float]
    message: str
    token: str
    grid: Optional[Path]
    grid_version: int
    embedding: Optional[Path]

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def progress_line(self) -> str:
        loss = f" · loss {self.losses[-1]:.4f}" if self.losses else ""
        if self.status == "starting":
            return f"{self.job_id}: starting (loading the model, encoding the images)"
        if self.status in ("running", "stopping"):
            speed = f" · {self.seconds_per_step:.2f} s/step" if self.seconds_per_step else ""
            eta = f" · ETA {clock_text(self.eta_seconds)}" if self.eta_seconds is not None else ""
            doing = "stopping after this step" if self.status == "stopping" else "running"
            return f"{self.job_id}: {doing} · step {self.step}/{self.max_steps}{loss}{speed}{eta}"
        if self.status == "done":
            return f"{self.job_id}: done · step {self.step}/{self.max_steps}{loss} · {self.token} learned"
        if self.status == "stopped":
            return f"{self.job_id}: stopped at step {self.step}/{self.max_steps}{loss} · Resume continues from the checkpoint"
        return f"{self.job_id}: failed · {self.message}"


class TrainingJob:
    """One training run (and its resumes), executed by :func:`textinv.training.train` in a thread."""

    def __init__(self, job_id: str, config: TrainConfig, folder: Path) -> None:
        self.job_id = job_id
        self.config = config
        self.folder = folder
        self.output_dir = Path(config.output_dir)
        self._lock = threading.Lock()  # the training thread writes, page requests read
        self.status = "starting"
        self.message = ""
        self.step = 0
        self.max_steps = int(config.max_train_steps or 0)
        self.losses: list[float] = []
        self._run: Any = None  # the RunContext, once training has started
        self._stop_requested = False
        self._session_started: Optional[float] = None
        self._session_first_step = 0
        self._thread: Optional[threading.Thread] = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def launch(self, resume: bool = False) -> None:
        """Start (or resume from the latest checkpoint) in a new thread. The caller holds the server's lock."""
        config = dataclasses.replace(self.config, resume_from_checkpoint="latest") if resume else self.config
        with self._lock:
            self.status, self.message = "starting", ""
            self._run, self._stop_requested, self._session_started = None, False, None
        self._thread = threading.Thread(target=self._work, args=(config,), name=f"textinv-{self.job_id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to stop after its current step; it then writes a resumable checkpoint."""
        with self._lock:
            self._stop_requested = True
            if self._run is not None:
                self._run.request_stop()
            if self.status == "running":
                self.status = "stopping"

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the thread; True once it has ended."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            now = time.perf_counter()
            per_step = eta = None
            if self._session_started is not None and self.step >= self._session_first_step:
                # Wall time per step (validation rounds included), as the CLI's progress line reports it.
                per_step = (now - self._session_started) / (self.step - self._session_first_step + 1)
                eta = per_step * (self.max_steps - self.step) if self.status in ACTIVE else None
            grid = self.output_dir / VALIDATION_DIR / GRID_FILE
            try:
                grid_version = grid.stat().st_mtime_ns
            except OSError:
                grid, grid_version = None, 0
            embedding = self.output_dir / EMBEDDING_FILE
            usable = not (self.status in ACTIVE) and embedding.is_file()
            return JobSnapshot(
                self.job_id,
                self.status,
                self.step,
                self.max_steps,
                tuple(self.losses),
                per_step,
                eta,
                self.message,
                self.config.placeholder_token,
                grid,
                grid_version,
                embedding if usable else None,
            )

    # --- called from the training thread --------------------------------------------------------
    def _attach(self, run: Any) -> None:
        with self._lock:
            self._run = run
            self.max_steps = run.max_steps
            self.status = "stopping" if self._stop_requested else "running"
            if self._stop_requested:  # Stop was pressed while the model was loading
                run.request_stop()

    def _record_step(self, step: int, max_steps: int, loss: float, step_seconds: float) -> None:
        with self._lock:
            if self._session_started is None:
                self._session_started = time.perf_counter() - step_seconds
                self._session_first_step = step
            del self.losses[step - 1 :]  # a resumed run redoes the steps after its checkpoint
            self.losses.append(loss)
            self.step, self.max_steps = step, max_steps

    def _finish(self, status: str, message: str) -> None:
        with self._lock:
            self.status, self.message, self._run = status, message, None
        logger.info("%s %s: %s", self.job_id, status, message)

    def _work(self, config: TrainConfig) -> None:
        from textinv.training import train

        try:
            result = train(config, show_progress=False, observers=[_JobObserver(self)])
        except TrainingInterrupted as stopped:
            self._finish("stopped", f"stopped after step {stopped.step} of {stopped.max_steps}; the checkpoint is kept")
        except Exception as error:  # UserError and faults alike become one line on the page
            self._finish("failed", render_error(error))
        else:
            self._finish("done", f"learned {config.placeholder_token} in {result.steps} steps")


class _JobObserver(TrainObserver):
    """Feeds a :class:`TrainingJob` from inside the training loop (main process: the page is single-process)."""

    def __init__(self, job: TrainingJob) -> None:
        self.job = job

    def on_start(self, run: Any) -> None:
        self.job._attach(run)

    def on_step(self, run: Any, state: Any) -> None:
        self.job._record_step(state.step, state.max_steps, state.loss, state.step_seconds)


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
        """Check the form, store the images, and start training in a thread (refused while a job runs)."""
        self._refuse_if_busy()  # before any work: the common case of a second click
        placeholder = request.placeholder_token.strip()
        initializer = request.initializer_token.strip()
        if not placeholder:
            raise UserError("type a placeholder token, the new word to learn, e.g. <cat-toy>")
        if not initializer:
            raise UserError("type an initializer word: one word close to your object or style, e.g. toy or painting")
        steps = int(request.max_train_steps or 0)
        if not 1 <= steps <= MAX_STEPS:
            raise UserError(f"steps must be between 1 and {MAX_STEPS}, not {steps}")
        if not float(request.learning_rate or 0) > 0:
            raise UserError(f"the learning rate must be > 0 (e.g. 5e-3), not {request.learning_rate}")
        model_dir = self.resolve_model(request.model)
        job_id = f"job-{next(self._names):03d}"
        folder = self.work_dir / "jobs" / f"{job_id}-{secrets.token_hex(3)}"  # random part: never reuse an old folder
        try:
            images = store_images(request.images, folder / "images", self.limits)
            config = self._train_config(request, placeholder, initializer, steps, model_dir, folder)
            config.validate()
            with self._job_lock:
                self._refuse_if_busy()  # again, atomically: two clicks may both have passed the first check
                job = TrainingJob(job_id, config, folder)
                self._job = job
                job.launch()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        logger.info(
            "%s: %d image(s), %d steps at %d px on %s, into %s",
            job_id,
            len(images),
            steps,
            config.resolution,
            model_dir,
            config.output_dir,
        )
        return job

    def _train_config(
        self, request: TrainRequest, placeholder: str, initializer: str, steps: int, model_dir: Path, folder: Path
    ) -> TrainConfig:
        prompt = request.validation_prompt.replace("{token}", placeholder).strip()
        every = int(request.validation_steps or 0) or max(1, steps // 5)
        return TrainConfig(
            pretrained_model_name_or_path=str(model_dir),
            train_data_dir=str(folder / "images"),
            placeholder_token=placeholder,
            initializer_token=initializer,
            learnable_property=request.learnable_property,
            resolution=native_resolution(model_dir),
            train_batch_size=1,
            max_train_steps=steps,
            learning_rate=float(request.learning_rate),
            lr_warmup_steps=0,
            seed=int(request.seed),
            output_dir=str(folder / "output"),
            only_save_embeds=True,  # the page generates from the base model plus the embedding
            checkpoints_total_limit=2,
            report_to="none",
            validation_prompt=[prompt] if prompt else [],
            validation_steps=every if prompt else None,
            num_validation_images=int(request.num_validation_images),
            validation_num_inference_steps=int(request.validation_num_inference_steps),
        )

    def stop(self) -> JobSnapshot:
        with self._job_lock:
            job = self._job
            if job is None or not job.active:
                raise UserError("no training is running")
            job.request_stop()
            return job.snapshot()

    def resume(self) -> JobSnapshot:
        """Continue the last stopped job from its latest checkpoint, with the same settings."""
        from textinv.checkpoints import list_checkpoints

        with self._job_lock:
            job = self._job
            if job is None:
                raise UserError("nothing to resume: start a training first")
            if job.active:
                raise UserError(f"{job.job_id} is still running; there is nothing to resume")
            if job.status != "stopped":
                raise UserError(f"nothing to resume: {job.job_id} {job.status}, it was not stopped; start a new training")
            if not list_checkpoints(job.output_dir):
                raise UserError(f"{job.job_id} has no checkpoint to resume from; start a new training")
            job.launch(resume=True)
            return job.snapshot()

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
    def trained_embedding(self) -> tuple[str, Path]:
        """(job id, embedding file) of the last job, once it is done or stopped."""
        snap = self.snapshot()
        if snap is None:
            raise UserError("no embedding yet: train one first (or load an embedding file to generate with)")
        if snap.active:
            raise UserError(f"{snap.job_id} is still training; its embedding is ready when it is done or stopped")
        if snap.embedding is None:
            raise UserError(f"{snap.job_id} wrote no embedding (it {snap.status} before its first step)")
        return snap.job_id, snap.embedding

    def export(self, format_key: str) -> Path:
        """The trained embedding written in one of :data:`EXPORT_FORMATS`, under the downloads folder."""
        from textinv.embeddings import read_embeddings, write_embedding

        chosen = EXPORT_FORMATS.get(format_key)
        if chosen is None:
            raise UserError(f"unknown format {format_key!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
        job_id, source = self.trained_embedding()
        embedding = read_embeddings(source)[0]
        fitting = export_formats_for(embedding)
        if chosen not in fitting:
            raise UserError(
                f"{chosen.label} does not fit this {embedding.family} embedding "
                f"({len(embedding.vectors)} text encoder(s)); choose {' or '.join(f.label for f in fitting)}"
            )
        # One folder per format: the same token name with different suffixes or layouts never collide.
        target = self.downloads_dir / job_id / chosen.key / f"{token_slug(embedding.token)}{chosen.suffix}"
        written = write_embedding(embedding, target, chosen.writer_format)
        logger.info("exported %s as %s: %s", embedding.token, chosen.key, written)
        return written

    # --- generation ----------------------------------------------------------------------------------
    def load_embedding(self, source: str | os.PathLike[str], original_name: str) -> LoadedEmbedding:
        """Store an uploaded embedding file (any format textinv reads) and describe it."""
        from textinv.embeddings import describe

        name = f"upload-{next(self._names):03d}-{safe_stem(original_name, 'embedding')}"
        path = store_embedding_file(source, original_name, self.work_dir / "embeddings", self.limits, name=name)
        info = describe(path)
        tokens = info["tokens"]
        families = "/".join(sorted({entry["family"] for entry in tokens}))
        return LoadedEmbedding(path, tuple(e["token"] for e in tokens), info["format"], families, tokens[0]["num_vectors"])

    def generate(self, request: GenerateRequest) -> GenerateOutcome:
        """Images from ``request.prompt`` with the uploaded embedding, else the trained one (if any)."""
        from textinv.embeddings import load_embeddings
        from textinv.generation import generate, load_pipeline

        if not request.prompt.strip():
            raise UserError("type a prompt")
        if not 1 <= int(request.num_images) <= 8:
            raise UserError("images: between 1 and 8")
        if not 1 <= int(request.num_inference_steps) <= 200:
            raise UserError("sampling steps: between 1 and 200")
        model_dir = self.resolve_model(request.model)
        embedding_path: Optional[Path] = None
        rename = request.token.strip() or None
        if request.embedding is not None:
            embedding_path = request.embedding.path
        else:
            snap = self.snapshot()
            if snap is not None and snap.embedding is not None:
                embedding_path, rename = snap.embedding, None
        stamp = embedding_path.stat().st_mtime_ns if embedding_path is not None else None
        key = (str(model_dir), str(embedding_path), stamp, rename, self.device)
        with self._generate_lock:
            if key != self._pipeline_key:
                self._pipeline, self._pipeline_key = None, None  # free the old one before loading
                pipe = load_pipeline(str(model_dir), device=self.device)
                tokens = load_embeddings(pipe, embedding_path, token=rename) if embedding_path is not None else []
                self._pipeline, self._pipeline_key, self._tokens = pipe, key, tuple(tokens)
            tokens = self._tokens
            # {token} in the prompt stands for the embedding's word, as in the validation prompt.
            prompt = request.prompt.replace("{token}", tokens[0]) if tokens else request.prompt
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
            message += f"; note: the prompt does not contain {tokens[0]}"
        return GenerateOutcome(result.images, result.paths, message)


# --- the page ----------------------------------------------------------------------------------------
def _guard(action: Callable[[], tuple[Any, ...]], outputs: int) -> tuple[Any, ...]:
    """Run a page action; any failure becomes one line in the message box and the other outputs stay."""
    import gradio as gr

    try:
        return action()
    except Exception as error:
        return (render_error(error),) + tuple(gr.skip() for _ in range(outputs - 1))


def _uploads(files: Any) -> list[tuple[str, str]]:
    """Gradio's uploaded paths; the browser's file name is the last part of each (a name, never a path to use)."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files or [])
    return [(str(path), Path(str(path)).name) for path in paths]


def build_app(state: ServerState) -> Any:
    """The Gradio page: every handler calls one ServerState method and shows its result or its error line."""
    import gradio as gr
    import pandas as pd

    def start(files: Any, prop: str, placeholder: str, initializer: str, model: str, steps: Any, lr: Any,
              vprompt: str, vsteps: Any, vsampling: Any, seed: Any) -> str:  # fmt: skip
        def action() -> tuple[Any, ...]:
            request = TrainRequest(
                images=_uploads(files),
                placeholder_token=placeholder or "",
                initializer_token=initializer or "",
                learnable_property=prop or "object",
                model=model or "",
                max_train_steps=int(steps or 0),
                learning_rate=float(lr or 0),
                validation_prompt=vprompt or "",
                validation_steps=int(vsteps or 0),
                validation_num_inference_steps=int(vsampling or 25),
                seed=int(seed or 0),
            )
            job = state.start(request)
            return (f"started {job.job_id}: {len(request.images)} image(s), {request.max_train_steps} steps",)

        return _guard(action, 1)[0]  # one output: Gradio takes the value itself, not a tuple

    def stop() -> str:
        return _guard(lambda: (f"{state.stop().job_id}: stopping after the current step, then saving a checkpoint",), 1)[0]

    def resume() -> str:
        return _guard(lambda: (f"{state.resume().job_id}: resuming from its latest checkpoint",), 1)[0]

    def poll(seen: Optional[dict[str, Any]]) -> tuple[Any, ...]:
        seen = dict(seen or {})
        snap = state.snapshot()
        if snap is None:
            return "no training yet", gr.skip(), gr.skip(), seen
        # Send the plot and the grid only when they changed: re-sending redraws them every second.
        loss_key = f"{snap.job_id}:{len(snap.losses)}"
        plot: Any = gr.skip()
        if seen.get("loss") != loss_key and snap.losses:
            plot = pd.DataFrame({"step": range(snap.step - len(snap.losses) + 1, snap.step + 1), "loss": snap.losses})
            seen["loss"] = loss_key
        grid: Any = gr.skip()
        grid_key = f"{snap.job_id}:{snap.grid_version}"
        if seen.get("grid") != grid_key and snap.grid is not None:
            grid = _read_image(snap.grid)
            seen["grid"] = grid_key
        return snap.progress_line(), plot, grid, seen

    def export(key: str) -> tuple[Any, ...]:
        def action() -> tuple[Any, ...]:
            path = state.export(key)
            return f"wrote {path.name} as {EXPORT_FORMATS[key].label}; download it below", str(path)

        return _guard(action, 2)

    def load_file(path: Any) -> tuple[Any, ...]:
        if not path:
            return "using the embedding trained above", None

        def action() -> tuple[Any, ...]:
            loaded = state.load_embedding(path, Path(str(path)).name)
            return f"{loaded.describe()}; put {loaded.tokens[0]} (or {{token}}) in the prompt", loaded

        return _guard(action, 2)

    def generate(prompt: str, model: str, loaded: Optional[LoadedEmbedding], token: str, steps: Any, seed: Any,
                 count: Any) -> tuple[Any, ...]:  # fmt: skip
        def action() -> tuple[Any, ...]:
            outcome = state.generate(
                GenerateRequest(
                    prompt=prompt or "",
                    model=model or "",
                    embedding=loaded,
                    token=token or "",
                    num_images=int(count or 1),
                    num_inference_steps=int(steps or 25),
                    seed=int(seed or 0),
                )
            )
            return outcome.message, outcome.images

        return _guard(action, 2)

    with gr.Blocks(title="textinv", analytics_enabled=False) as app:
        gr.Markdown(
            "# textinv\nTeach Stable Diffusion a new word from 3-5 images: train it here, watch it learn, "
            "download it in the format your tool reads, and generate with it."
        )
        gr.Markdown("## 1 · Train")
        with gr.Row():
            with gr.Column():
                files = gr.File(
                    label="Training images (3-5; PNG, JPEG, WebP or BMP)",
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    elem_id="train-images",
                )
                prop = gr.Radio(["object", "style"], value="object", label="What it learns", elem_id="learnable-property")
                placeholder = gr.Textbox(label="Placeholder token", placeholder="<cat-toy>", elem_id="placeholder-token")
                initializer = gr.Textbox(
                    label="Initializer word", placeholder="toy", info="one word close to it", elem_id="initializer-token"
                )
            with gr.Column():
                model = gr.Textbox(
                    label="Model folder",
                    placeholder="empty: the tiny demo model",
                    info="a local diffusers pipeline folder (with model_index.json)",
                    elem_id="model-folder",
                )
                steps = gr.Number(label="Steps", value=200, precision=0, minimum=1, elem_id="steps")
                lr = gr.Number(label="Learning rate", value=5e-3, minimum=0, step=1e-4, elem_id="learning-rate")
                with gr.Accordion("Validation images and seed", open=False):
                    vprompt = gr.Textbox(
                        label="Validation prompt",
                        value="a photo of {token}",
                        info="{token} is your placeholder; empty: no validation images",
                        elem_id="validation-prompt",
                    )
                    vsteps = gr.Number(
                        label="Validation every N steps (0: five times a run)", value=0, precision=0, minimum=0, elem_id="validation-steps"
                    )
                    vsampling = gr.Number(
                        label="Validation sampling steps", value=25, precision=0, minimum=1, elem_id="validation-sampling-steps"
                    )
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
        with gr.Row():
            start_button = gr.Button("Start training", variant="primary", elem_id="start")
            stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            resume_button = gr.Button("Resume", elem_id="resume")
        train_message = gr.Textbox(label="Message", interactive=False, elem_id="train-message")
        progress = gr.Textbox(label="Progress", interactive=False, elem_id="train-progress")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", height=320, elem_id="loss-plot")
            grid = gr.Image(
                label="Validation images (a row per round)", type="pil", format="png", interactive=False, elem_id="validation-grid"
            )

        gr.Markdown("## 2 · Download the embedding")
        with gr.Row():
            fmt = gr.Dropdown(
                [(f.label, f.key) for f in EXPORT_FORMATS.values()], value="diffusers", label="Format", elem_id="export-format"
            )
            export_button = gr.Button("Write the file", elem_id="export")
        export_message = gr.Textbox(label="Message", interactive=False, elem_id="export-message")
        download = gr.File(label="Embedding file", interactive=False, height=90, elem_id="download")

        gr.Markdown("## 3 · Generate")
        with gr.Row():
            embedding_file = gr.File(
                label="Embedding file (optional; else the one trained above)",
                file_types=[".safetensors", ".pt", ".bin", ".pdparams", ".png"],
                type="filepath",
                elem_id="embedding-file",
            )
            token = gr.Textbox(label="Load it as token (optional)", placeholder="<my-word>", elem_id="embedding-token")
        prompt = gr.Textbox(label="Prompt", value="a photo of {token}", info="{token} is the embedding's word", elem_id="prompt")
        with gr.Row():
            gen_steps = gr.Number(label="Sampling steps", value=25, precision=0, minimum=1, elem_id="sampling-steps")
            gen_seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="generate-seed")
            count = gr.Number(label="Images", value=2, precision=0, minimum=1, maximum=8, elem_id="num-images")
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        generate_message = gr.Textbox(label="Message", interactive=False, elem_id="generate-message")
        gallery = gr.Gallery(
            label="Images", columns=4, height=360, preview=False, object_fit="contain", format="png", elem_id="gallery"
        )

        loaded = gr.State(None)  # this tab's uploaded embedding
        seen = gr.State({})  # what this tab already shows (plot, grid)
        timer = gr.Timer(0.5)  # progress, loss and grid refresh twice a second

        form = [files, prop, placeholder, initializer, model, steps, lr, vprompt, vsteps, vsampling, seed]
        start_button.click(start, form, [train_message])
        stop_button.click(stop, None, [train_message])
        resume_button.click(resume, None, [train_message])
        timer.tick(poll, [seen], [progress, loss_plot, grid, seen], show_progress="hidden")
        export_button.click(export, [fmt], [export_message, download])
        embedding_file.change(load_file, [embedding_file], [generate_message, loaded])
        generate_button.click(generate, [prompt, model, loaded, token, gen_steps, gen_seed, count], [generate_message, gallery])
    return app


def _read_image(path: Path) -> Any:
    """A copy of an image file in memory (the grid is rewritten in place while training)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()


# --- starting the server ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: Optional[str] = None
    allow_remote: bool = False
    work_dir: Optional[str] = None


def quiet_web_framework(work_dir: Path) -> None:
    """Before Gradio is imported: no analytics or version checks, uploads cached in the server's folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(work_dir / "gradio-uploads"))


def launch_options(options: ServeOptions, state: ServerState) -> dict[str, Any]:
    """Gradio's launch() arguments: no share tunnel, no run history, monitoring or MCP; uploads capped."""
    return dict(
        server_name=options.host,
        server_port=options.port,
        share=False,
        inbrowser=False,
        show_error=False,  # failures are shown as one line by the handlers themselves
        max_file_size=state.limits.max_request_bytes,
        allowed_paths=[str(state.downloads_dir)],
        enable_monitoring=False,
        run_history=False,
        mcp_server=False,
        pwa=False,
        ssr_mode=False,
        footer_links=[],
        quiet=True,  # its banner suggests share=True; serve() logs the address itself
    )


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, ``docker stop``) ends the server as Ctrl-C does: a running job checkpoints first."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def serve(options: ServeOptions) -> None:
    """Check the options, build the page and serve it until interrupted (then stop a running job cleanly)."""
    check_host(options.host, options.allow_remote)
    check_port(options.port)
    default_model = check_model_folder(options.model) if options.model else None
    work_dir = Path(options.work_dir).expanduser() if options.work_dir else Path(tempfile.mkdtemp(prefix="textinv-serve-"))
    state = ServerState(work_dir, default_model)
    state.downloads_dir.mkdir(parents=True, exist_ok=True)
    quiet_web_framework(state.work_dir)
    app = build_app(state)
    logger.info("work folder (uploads, runs, downloads): %s", state.work_dir)
    state.default_model()  # the tiny pipeline is built now, not on the first click
    shown_host = f"[{options.host}]" if ":" in options.host else options.host
    logger.info(
        "serving http://%s:%d/ (Ctrl-C stops it; a running training is stopped with a checkpoint)", shown_host, options.port
    )
    _stop_on_sigterm()
    try:
        app.launch(**launch_options(options, state))
    except OSError as error:
        if re.search(r"port|address", str(error), re.IGNORECASE):
            raise UserError(f"cannot listen on {options.host}:{options.port} ({first_line(error)}); choose another --port") from None
        raise
    finally:
        state.shutdown()

"""textinv: Textual Inversion for Stable Diffusion — train a new word's embedding, then use it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from textinv.config import TrainConfig, UserError

if TYPE_CHECKING:
    from textinv.data.latents import LatentCache
    from textinv.events import TrainObserver, TrainResult
    from textinv.inference.generation import GenerationResult
    from textinv.tiny import TinySpec

__version__ = "0.1.0"
__all__ = ["TrainConfig", "UserError", "train", "load_embeddings", "generate", "build_tiny_pipeline"]


# The functions below import their modules on first call, so that `import textinv` (and
# `textinv --help`) do not pay for torch. Each has the signature and docstring of the function it calls
# (tests/test_api.py compares them), so help() and editors show the real parameters. The packages are
# `training` and `inference`, not `train` and `generate`, because a submodule named like a package
# attribute replaces it on import.


def train(
    config: TrainConfig,
    show_progress: bool = True,
    observers: Sequence[TrainObserver] = (),
    latent_cache: Optional[LatentCache] = None,
) -> TrainResult:
    """Learn a placeholder token from images; write its embedding (and checkpoints) to ``config.output_dir``.

    The observers ``config`` asks for (validation images, logs, model card, hub upload) watch the run, then any
    ``observers`` given (:class:`textinv.events.TrainObserver`). ``latent_cache`` replaces the images of
    ``train_data_dir`` with ready-made latents (benchmarks that plant a concept use it).

    Progress, with ``show_progress=True`` (the default):

    - on a terminal (stderr is a TTY): a progress bar with the step, loss, learning rate and time left;
    - otherwise (a pipe, a file, a notebook): a line about every 5% of the run, e.g.
      ``step 40/200 loss 0.1234 lr 5.00e-03 0.052 s/step ETA 0:00:08``, logged by ``textinv.observers.progress``
      at INFO: when your program configures logging, that configuration decides where the lines go (and
      whether INFO shows); when nothing is configured, they are written to stderr.

    ``show_progress=False`` shows neither. Returns a :class:`textinv.events.TrainResult` (``.summary`` is
    the one-line report ``textinv train`` prints).
    """
    from textinv.observers import observers_from_config
    from textinv.training import train as run_training

    config.validate()  # before building observers: they read the config
    watching = [*observers_from_config(config, show_progress), *observers]
    return run_training(config, observers=watching, latent_cache=latent_cache)


def generate(
    model: str | Any,
    prompt: str,
    embeddings: Sequence[str | Path] = (),
    negative_prompt: Optional[str] = None,
    num_images: int = 1,
    num_inference_steps: int = 50,
    guidance_scale: Optional[float] = None,
    seed: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    output_dir: Optional[str | Path] = None,
    device: Optional[str] = None,
    replace: bool = False,
    token: Optional[str] = None,
    lora: Optional[str | Path] = None,
    lora_scale: float = 1.0,
    cpu_threads: Optional[int] = None,
) -> GenerationResult:
    """Generate ``num_images`` images; image ``i`` uses seed ``seed + i`` so each is reproducible alone.

    ``model`` is a pipeline folder / hub id, or an already loaded pipeline (SD 1.x/2.x/XL, SD3, Flux...;
    ``guidance_scale`` None keeps the pipeline's own default). With ``output_dir`` the
    images are written as PNG (never over an existing file). ``token`` loads the one embedding file's
    token under that name (when the pipeline already has the file's own). ``lora`` adds a LoRA at weight
    ``lora_scale`` (:func:`load_lora`: a pivotal-tuning run's folder loads its word too). On a CPU torch uses
    ``cpu_threads`` threads, else OMP_NUM_THREADS or the free cores (textinv.cpu_threads), and the caller's count after.
    """
    from textinv.inference.generation import generate as run_generation

    return run_generation(
        model,
        prompt,
        embeddings=embeddings,
        negative_prompt=negative_prompt,
        num_images=num_images,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        height=height,
        width=width,
        output_dir=output_dir,
        device=device,
        replace=replace,
        token=token,
        lora=lora,
        lora_scale=lora_scale,
        cpu_threads=cpu_threads,
    )


def load_embeddings(
    pipe: Any,
    path: str | Path,
    token: Optional[str] = None,
    replace: bool = False,
) -> list[str]:
    """Add the token(s) of an embedding file (any format) to a pipeline's tokenizer(s) and text encoder(s).

    Each role's vectors go to the encoder the pipeline's family keeps that role in (SDXL's clip_g in
    ``text_encoder_2``, Flux's t5xxl in ``text_encoder_2``, SD3's in ``text_encoder_3``), each with its own number of
    vectors (``token``, ``token_1``...); a file holding some of a multi-encoder family's roles leaves the other
    tokenizers untouched. ``token`` renames the (single) token in the file; a token the pipeline already has is
    replaced only with ``replace=True``. Every check runs before the pipeline changes. Returns the tokens loaded.
    """
    from textinv.embeddings import load_embeddings as load

    return load(pipe, path, token=token, replace=replace)


def build_tiny_pipeline(
    output_dir: str | Path,
    family: str = "sd1",
    seed: int = 0,
    spec: Optional[TinySpec] = None,
) -> Path:
    """Write a tiny diffusers pipeline folder of ``family`` with weights drawn from ``seed``; ``spec`` sets its
    widths (None: :class:`TinySpec`'s, small enough for ~0.05 s/step at 64 px). Returns the folder."""
    from textinv.tiny import build_tiny_pipeline as build

    return build(output_dir, family=family, seed=seed, spec=spec)

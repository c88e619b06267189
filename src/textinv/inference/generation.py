"""Pipelines with embeddings loaded, and image generation."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import UserError, first_line
from textinv.cpu_threads import apply_cpu_threads, choose_cpu_threads, thread_count_kept
from textinv.files import atomic_write, unique_path

logger = logging.getLogger(__name__)


def pick_device(requested: Optional[str] = None) -> torch.device:
    """``requested`` if given, else the best available: cuda, then mps, then cpu."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise UserError(f"--device {requested!r} is not a device name; use cpu, cuda, cuda:1 or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested!r}: CUDA is not available on this machine; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {requested!r}: MPS is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_pipeline(
    model: str,
    embeddings: Sequence[str | Path] = (),
    device: Optional[str] = None,
    replace: bool = False,
    token: Optional[str] = None,
    lora: Optional[str | Path] = None,
    lora_scale: float = 1.0,
) -> Any:
    """A diffusers pipeline from a folder or hub id, with each embedding file's token(s) added
    (``token`` renames the token of a single embedding file) and a LoRA (``lora``, see :func:`load_lora`)."""
    from textinv.embeddings import load_embeddings
    from textinv.models.loading import load_pipeline_folder, resolve_model_dir

    path = resolve_model_dir(model)
    target = pick_device(device)
    # Half precision only where it is fast and supported; CPU stays float32.
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    try:
        pipe = load_pipeline_folder(path, dtype)  # the class model_index.json names: SD, SDXL, AltDiffusion...
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the pipeline in {str(path)!r}: {first_line(error)}") from None
    for embedding_file in embeddings:
        load_embeddings(pipe, embedding_file, token=token, replace=replace)
    if lora is not None:
        load_lora(pipe, lora, lora_scale, load_words=not embeddings)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(target)


def load_lora(pipe: Any, source: str | Path, scale: float = 1.0, load_words: bool = True) -> list[str]:
    """Load a LoRA into ``pipe`` at weight ``scale`` (pivotal tuning, issue 26); returns the words it also loaded.

    ``source`` is a run folder or a file: diffusers' ``pytorch_lora_weights.safetensors`` (the run folder's word
    file ``learned_embeds.safetensors`` is loaded beside it when ``load_words``), or a kohya-layout file whose
    ``bundle_emb.*`` words are loaded with it (``learned_embeds_lora.safetensors``)."""
    from safetensors.torch import load_file

    from textinv.embeddings import load_embeddings
    from textinv.embeddings.bundle import is_bundle

    path = Path(source).expanduser()
    words: list[str] = []
    if path.is_dir():
        word_file, path = path / "learned_embeds.safetensors", path / "pytorch_lora_weights.safetensors"
        if load_words and word_file.is_file():
            words = load_embeddings(pipe, word_file)
    if not path.is_file():
        raise UserError(f"--lora {str(source)!r}: no such LoRA file; give a run folder or a .safetensors LoRA file")
    try:
        state = load_file(str(path))
    except Exception as error:  # not a safetensors file, truncated...
        raise UserError(f"--lora {str(source)!r} is not a LoRA safetensors file ({first_line(error)})") from None
    if is_bundle(state):
        words = load_embeddings(pipe, path)
        state = {key: value for key, value in state.items() if not key.startswith("bundle_emb.")}
        # The same adapters in diffusers' layout (a run folder): every pipeline reads that one. A tagged bundle
        # (learned_embeds_lora-best / -steps-N.safetensors) has its own: the run's last adapters are another step's.
        rest = (
            path.name[len("learned_embeds_lora") :] if path.name.startswith("learned_embeds_lora") else ".safetensors"
        )
        beside = path.parent / f"pytorch_lora_weights{rest}"
        if beside.is_file():
            state = load_file(str(beside))
    try:
        pipe.load_lora_weights(state, adapter_name="textinv")
        pipe.set_adapters(["textinv"], adapter_weights=[scale])
    except (ValueError, KeyError, AttributeError) as error:
        raise UserError(f"--lora {str(source)!r} does not fit this pipeline: {first_line(error)}") from None
    logger.info("loaded the LoRA %s at weight %g%s", path, scale, f" with {', '.join(words)}" if words else "")
    return words


@dataclass
class GenerationResult:
    images: list[Any]
    seeds: list[int]
    paths: list[Path] = field(default_factory=list)


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
    if token is not None and len(embeddings) != 1:
        raise UserError(f"--token renames the token of one embedding file; {len(embeddings)} --embeddings given")
    if num_images < 1:
        raise UserError(f"--num_images {num_images} must be >= 1")
    if num_inference_steps < 1:
        raise UserError(f"--num_inference_steps {num_inference_steps} must be >= 1")
    if cpu_threads is not None and cpu_threads < 1:
        raise UserError(f"--cpu_threads {cpu_threads} must be >= 1")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"{name} {value} must be a positive multiple of 8")
    if not prompt or not prompt.strip():
        raise UserError("--prompt must not be empty")
    pipe = (
        model
        if not isinstance(model, (str, Path))
        else load_pipeline(
            str(model), embeddings, device, replace=replace, token=token, lora=lora, lora_scale=lora_scale
        )
    )
    if not isinstance(model, (str, Path)):
        from textinv.embeddings import load_embeddings

        for embedding_file in embeddings:
            load_embeddings(pipe, embedding_file, token=token, replace=replace)
        if lora is not None:
            load_lora(pipe, lora, lora_scale, load_words=not embeddings)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    seeds = [seed + index for index in range(num_images)]
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    from textinv.models.families import prompt_arguments
    from textinv.models.tokens import expand_loaded_tokens

    prompts = prompt_arguments(pipe, prompt, expand_loaded_tokens)  # SD3: each tokenizer spells the word its way
    # None: the pipeline's own guidance (SD 1.x/2.x/XL 7.5, SD3 7.0, Flux 3.5).
    guidance = {"guidance_scale": guidance_scale} if guidance_scale is not None else {}
    with thread_count_kept():
        if torch.device(pipe.device).type == "cpu":  # the free cores, as training (textinv.cpu_threads)
            choice = choose_cpu_threads(cpu_threads)
            apply_cpu_threads(choice)
            logger.info("%s", choice.text())
        output = pipe(
            **{name: [text] * num_images for name, text in prompts.items()},
            negative_prompt=[negative_prompt] * num_images if negative_prompt else None,
            num_inference_steps=num_inference_steps,
            generator=generators,
            height=height,
            width=width,
            **guidance,
        )
    result = GenerationResult(images=list(output.images), seeds=seeds)
    if output_dir is not None:
        result.paths = save_images(result.images, seeds, prompt, Path(output_dir))
    return result


def save_images(images: Sequence[Any], seeds: Sequence[int], prompt: str, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:60] or "image"
    paths = []
    for image, seed in zip(images, seeds):
        path = unique_path(output_dir / f"{slug}-seed{seed}.png")
        paths.append(atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG")))  # type: ignore[misc]
        logger.debug("wrote %s", path)  # the CLI prints the paths
    return paths

"""Validation images while training: the same prompts and seeds at every round, so rounds compare.

A round samples every ``--validation_prompt`` ``--num_validation_images`` times (image ``i`` with
seed ``run seed + i``, as ``textinv generate --seed`` does, so any image can be made again) and writes

    validation/step-000010/prompt0-seed42.png ...   one PNG per prompt and seed
    validation/progress.png                         all rounds so far: per prompt, rows = steps,
                                                    columns = seeds, labelled (rewritten atomically)
    validation/prompts.json                         prompt index -> prompt text

The pipeline is built from the frozen parts training already holds (the text encoder sees the
trainable vectors through its forward hook); only the VAE, freed after the latents were cached, is
loaded again, and it stays on the CPU between rounds. Under several processes every process samples
a contiguous share of the seeds (:func:`image_share`), so none waits a whole round in a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import DEFAULT_VALIDATION_STEPS, TrainConfig
from textinv.events import RunContext, StepState, TrainObserver, TrainResult, add_outputs, add_timing
from textinv.files import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
GRID_FILE = "progress.png"
PROMPTS_FILE = "prompts.json"
# The grid shows at most this many rounds per prompt (evenly spaced, always the first and the
# latest) and tiles of at most this many pixels a side, so it stays viewable on long runs.
MAX_GRID_ROWS = 12
MAX_TILE_SIDE = 256
_ROUND_DIR = re.compile(r"^step-(\d+)$")
_IMAGE_FILE = re.compile(r"^prompt(\d+)-seed(\d+)\.png$")

# Called with (step, prompt index, prompt, images, seeds) after each prompt of a round.
ImageSink = Callable[[int, int, str, Sequence[Any], Sequence[int]], None]


def validation_interval(config: TrainConfig, epoch_length: int, examples_per_step: int) -> int:
    """Steps between rounds: --validation_steps, else --validation_epochs in steps, else the default."""
    if config.validation_steps is not None:
        return config.validation_steps
    if config.validation_epochs is not None:
        return max(1, math.ceil(config.validation_epochs * epoch_length / examples_per_step))
    return DEFAULT_VALIDATION_STEPS


def round_dir(output_dir: Path, step: int) -> Path:
    return output_dir / VALIDATION_DIR / f"step-{step:06d}"


def image_name(prompt_index: int, seed: int) -> str:
    return f"prompt{prompt_index}-seed{seed}.png"


class Validation(TrainObserver):
    """Samples the validation prompts every ``interval`` steps and at the last step: with several processes
    each samples its share of the seeds, and the main process writes them all.

    Without prompts it only forgets the rounds an earlier run left in output_dir, so that the model
    card never shows another run's images.
    """

    def __init__(self, config: TrainConfig, image_sink: Optional[ImageSink] = None) -> None:
        self.config = config
        self.prompts = list(config.validation_prompt)
        self.image_sink = image_sink
        self.enabled = bool(self.prompts)
        self.is_main = True
        self.interval = DEFAULT_VALIDATION_STEPS
        self.pipeline: Any = None
        self.first_step: Optional[int] = None

    def on_start(self, run: RunContext) -> None:
        self.is_main = run.is_main_process
        if not self.enabled:
            return
        config = self.config
        words = [word["placeholder_token"] for word in run.record.get("concepts", [])]  # --concepts
        unnamed = [word for word in words if not any(word in prompt for prompt in self.prompts)]
        if unnamed and self.is_main:
            logger.warning("no --validation_prompt names %s: its progress is not shown", ", ".join(unnamed))
        examples_per_step = config.examples_per_update(run.accelerator.num_processes)
        self.interval = validation_interval(config, run.stream.epoch_length, examples_per_step)
        # Every process samples its share of the seeds: none waits in a collective for a whole round
        # (a long SDXL round would pass the collective timeout), and the round takes 1/N of the time.
        self.pipeline = build_validation_pipeline(run)
        if not self.is_main:
            return
        folder = run.output_dir / VALIDATION_DIR
        prompts_file = atomic_write_json(folder / PROMPTS_FILE, {str(i): p for i, p in enumerate(self.prompts)})
        add_outputs(run, [prompts_file])
        logger.info(
            "validation: %d prompt(s) x %d image(s) every %d steps, into %s",
            len(self.prompts),
            config.num_validation_images,
            self.interval,
            folder,
        )

    def on_step(self, run: RunContext, state: StepState) -> None:
        if self.first_step is None and self.is_main:
            self.first_step = state.step
            self._drop_rounds_from(run.output_dir, state.step)
        if self.enabled and (state.step % self.interval == 0 or state.step == state.max_steps):
            self.run_round(run, state.step)

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        self.pipeline = None  # lets the reloaded VAE go

    def run_round(self, run: RunContext, step: int) -> list[Path]:
        """Sample every prompt, each process its share of the seeds; the main process writes the PNGs and the
        grid and returns the files written (the others return nothing)."""
        from accelerate.utils import gather_object

        from textinv.inference.generation import generate

        started = time.perf_counter()
        config, pipeline = self.config, self.pipeline
        device, processes = run.accelerator.device, run.accelerator.num_processes
        first, count = image_share(config.num_validation_images, run.accelerator.process_index, processes)
        written: list[Path] = []
        folder = round_dir(run.output_dir, step)
        # Sampling must not move the training's random state (resume and reproducibility rely on it).
        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            pipeline.vae.to(device)
            try:
                for prompt_index, prompt in enumerate(self.prompts):
                    mine: list[tuple[int, Any]] = []
                    if count:
                        result = generate(
                            pipeline,
                            prompt,
                            num_images=count,
                            num_inference_steps=config.validation_num_inference_steps,
                            guidance_scale=config.validation_guidance_scale,
                            seed=run.seed + first,  # image i has seed run seed + i, whichever process makes it
                            height=config.image_height,
                            width=config.image_width,
                        )
                        mine = list(zip(result.seeds, result.images))
                    shares = gather_object(mine) if processes > 1 else mine  # in process order: seeds ascending
                    if not self.is_main:
                        continue
                    seeds, images = [seed for seed, _ in shares], [image for _, image in shares]
                    for image, seed in zip(images, seeds):
                        path = folder / image_name(prompt_index, seed)
                        written.append(atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG")))  # type: ignore[misc]
                    if self.image_sink is not None:
                        self.image_sink(step, prompt_index, prompt, images, seeds)
            finally:
                pipeline.vae.to("cpu")
        if not self.is_main:
            return []
        grid = write_progress_grid(run.output_dir, self.prompts)
        if grid is not None:
            written.append(grid)
        add_outputs(run, written)
        add_timing(run, "validation_seconds", time.perf_counter() - started)  # the progress line shows it apart
        logger.debug("validation images of step %d in %s", step, folder)  # debug: a tqdm bar is on screen
        return written

    def _drop_rounds_from(self, output_dir: Path, first_step: int) -> None:
        """Forget rounds a previous run made at or after this run's first step.

        A fresh run starts at step 1 (every old round goes: --overwrite_output_dir allowed replacing
        them); a resumed run redoes the steps after its checkpoint, and so their rounds.
        """
        dropped = False
        for step, folder in list_rounds(output_dir):
            if step >= first_step:
                shutil.rmtree(folder)
                dropped = True
        if dropped and write_progress_grid(output_dir, self.prompts) is None:
            for leftover in (GRID_FILE, PROMPTS_FILE):
                (output_dir / VALIDATION_DIR / leftover).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # gone if nothing else is in it
                (output_dir / VALIDATION_DIR).rmdir()


def image_share(num_images: int, rank: int, processes: int) -> tuple[int, int]:
    """(first image index, count) of ``rank``'s contiguous share of a round's images (some may have none)."""
    base, extra = divmod(num_images, processes)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def build_validation_pipeline(run: RunContext) -> Any:
    """The base model's pipeline over the training's frozen parts, the base model's scheduler and a reloaded VAE."""
    import diffusers
    from diffusers import AutoencoderKL

    from textinv.models.loading import pipeline_from_parts
    from textinv.models.precision import uncompiled
    from textinv.models.quiet import quiet_loading

    parts = run.parts
    source = Path(parts.source)
    # The VAE left memory once the latents were cached; validation alone needs it back.
    with quiet_loading():
        vae = AutoencoderKL.from_pretrained(source / "vae", dtype=parts.denoiser.dtype)
    vae.requires_grad_(False)
    vae.eval()
    # The base model's own sampler, so a validation image equals `textinv generate` of the saved result.
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    scheduler = scheduler_class.from_pretrained(source / "scheduler")
    # The base model's pipeline class over every text encoder (SDXL has two, SD3 three; issues 7, 25), with the
    # denoiser as it was before torch.compile (--compile): sampling shapes and no-grad mode would compile it again.
    pipeline = pipeline_from_parts(parts, vae, scheduler, denoiser=uncompiled(parts.denoiser))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def list_rounds(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every validation round on disk, by step."""
    folder = output_dir / VALIDATION_DIR
    if not folder.is_dir():
        return []
    rounds = []
    for entry in folder.iterdir():
        match = _ROUND_DIR.match(entry.name)
        if match and entry.is_dir():
            rounds.append((int(match.group(1)), entry))
    return sorted(rounds)


# --- the progress grid ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridLayout:
    """Where everything sits in progress.png: a seed header, then per prompt a title band and one row per round."""

    steps: tuple[int, ...]
    seeds: tuple[int, ...]
    num_prompts: int
    tile_width: int
    tile_height: int
    label_width: int = 84
    band_height: int = 18
    gap: int = 2

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_width + len(self.seeds) * (self.tile_width + self.gap)
        return width, self.band_height + self.num_prompts * self._block_height

    @property
    def _block_height(self) -> int:
        return self.band_height + len(self.steps) * (self.tile_height + self.gap)

    def tile_box(self, prompt_index: int, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the image of ``steps[row]`` and ``seeds[column]``."""
        left = self.label_width + column * (self.tile_width + self.gap)
        top = (
            self.band_height
            + prompt_index * self._block_height
            + self.band_height
            + row * (self.tile_height + self.gap)
        )
        return left, top, left + self.tile_width, top + self.tile_height

    def row_label_box(self, prompt_index: int, row: int) -> tuple[int, int, int, int]:
        _, top, _, bottom = self.tile_box(prompt_index, row, 0)
        return 0, top, self.label_width - self.gap, bottom

    def column_label_box(self, column: int) -> tuple[int, int, int, int]:
        left, _, right, _ = self.tile_box(0, 0, column)
        return left, 0, right, self.band_height

    def title_box(self, prompt_index: int) -> tuple[int, int, int, int]:
        top = self.band_height + prompt_index * self._block_height
        return 0, top, self.size[0], top + self.band_height


def grid_rows(steps: Sequence[int], limit: int = MAX_GRID_ROWS) -> list[int]:
    """At most ``limit`` of ``steps``, evenly spaced, keeping the first and the last."""
    steps = sorted(steps)
    if len(steps) <= limit:
        return steps
    picks = {round(i * (len(steps) - 1) / (limit - 1)) for i in range(limit)}
    return [steps[i] for i in sorted(picks)]


def progress_layout(
    output_dir: Path, num_prompts: int
) -> Optional[tuple[GridLayout, dict[tuple[int, int, int], Path]]]:
    """The grid's layout and its images ``{(step, prompt, seed): path}``, or None with no rounds yet."""
    from PIL import Image

    images: dict[tuple[int, int, int], Path] = {}
    for step, folder in list_rounds(output_dir):
        for entry in folder.iterdir():
            match = _IMAGE_FILE.match(entry.name)
            if match and int(match.group(1)) < num_prompts:
                images[(step, int(match.group(1)), int(match.group(2)))] = entry
    if not images:
        return None
    steps = grid_rows(sorted({step for step, _, _ in images}))
    seeds = sorted({seed for _, _, seed in images})
    with Image.open(next(iter(images.values()))) as first:
        width, height = first.size
    scale = min(1.0, MAX_TILE_SIDE / max(width, height))
    layout = GridLayout(
        tuple(steps), tuple(seeds), num_prompts, max(1, round(width * scale)), max(1, round(height * scale))
    )
    return layout, images


def write_progress_grid(output_dir: Path, prompts: Sequence[str]) -> Optional[Path]:
    """Draw every round on disk into validation/progress.png (atomically); None if there is none."""
    # Not diffusers.utils.make_image_grid: it pastes equal tiles edge to edge, with no room for the seed header,
    # the prompt titles and the step labels that GridLayout places; the tiling itself is the few paste() calls below.
    from PIL import Image, ImageDraw, ImageFont

    found = progress_layout(output_dir, len(prompts))
    if found is None:
        return None
    layout, images = found
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, seed in enumerate(layout.seeds):
        left, top, _, _ = layout.column_label_box(column)
        label = f"seed {seed}" if draw.textlength(f"seed {seed}", font=font) <= layout.tile_width - 2 else str(seed)
        draw.text((left + 2, top + 3), _fit(draw, font, label, layout.tile_width - 2), fill="black", font=font)
    for prompt_index, prompt in enumerate(prompts):
        left, top, right, bottom = layout.title_box(prompt_index)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=(230, 230, 230))
        draw.text(
            (left + 2, top + 3),
            _fit(draw, font, f"prompt {prompt_index}: {prompt}", right - 4),
            fill="black",
            font=font,
        )
        for row, step in enumerate(layout.steps):
            left, top, _, _ = layout.row_label_box(prompt_index, row)
            draw.text((left + 2, top + 2), f"step {step}", fill="black", font=font)
            for column, seed in enumerate(layout.seeds):
                path = images.get((step, prompt_index, seed))
                if path is None:
                    continue  # e.g. --num_validation_images changed on resume
                with Image.open(path) as image:
                    tile = image.convert("RGB")
                box = layout.tile_box(prompt_index, row, column)
                if tile.size != (layout.tile_width, layout.tile_height):
                    tile = tile.resize((layout.tile_width, layout.tile_height), Image.Resampling.LANCZOS)
                grid.paste(tile, box[:2])
    target = output_dir / VALIDATION_DIR / GRID_FILE
    return atomic_write(target, lambda tmp: grid.save(tmp, format="PNG"))


def _fit(draw: Any, font: Any, text: str, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."

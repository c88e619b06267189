"""``textinv demo`` (``make demo``): train ``<red-cartoon>`` on the built-in images and tiny pipeline, then generate.

Nothing is downloaded: the tiny pipeline (seeded random weights, the real CLIP vocabulary) is built in
``output_dir/base-model``. A second demo into the same folder replaces its own results — the base
model, the run and ``samples/`` — instead of refusing (or adding ``…-seed1-2.png`` beside the first
image); a folder holding another run's results is refused as ``textinv train`` refuses it.

The demo runs torch on one thread (unless ``OMP_NUM_THREADS`` says otherwise): the tiny pipeline's
operations are too small to share out, and on a machine other jobs keep busy, torch's threads wait on
each other: with two busy processes beside it, one thread per core was 4.4x slower per step on this project's 2-core
VM (``python bench/threads.py``, 2026-12-02; docs/speed.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from textinv.config import TrainConfig
from textinv.events import RUN_FILE, TrainResult

logger = logging.getLogger(__name__)

PROMPT = "a <red-cartoon> on the beach"
SAMPLES_DIR = "samples"


def is_previous_demo(output_dir: Path, images: Path) -> bool:
    """Whether ``output_dir`` holds an earlier demo's run (trained on the built-in images)."""
    try:
        record = json.loads((output_dir / RUN_FILE).read_text(encoding="utf-8"))
        return bool(record["config"]["train_data_dir"] == str(images))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_demo(output_dir: Path, steps: int = 200) -> tuple[TrainResult, list[Path]]:
    """Build the tiny pipeline, train, generate one image; returns the run's result and the image paths."""
    # One thread unless OMP_NUM_THREADS says otherwise: the tiny pipeline gains nothing from more (textinv.cpu_threads).
    threads = None if "OMP_NUM_THREADS" in os.environ else 1
    return _train_and_generate(output_dir, steps, threads)


def _train_and_generate(output_dir: Path, steps: int, threads: Optional[int]) -> tuple[TrainResult, list[Path]]:
    from textinv import generate, train
    from textinv.tiny import build_tiny_pipeline, demo_images_dir

    images = demo_images_dir()
    overwrite = is_previous_demo(output_dir, images)
    if overwrite:  # the demo's own outputs: replaced, not added to
        for folder in (output_dir / "base-model", output_dir / SAMPLES_DIR):
            shutil.rmtree(folder, ignore_errors=True)
    base_model = build_tiny_pipeline(output_dir / "base-model", seed=0)
    config = TrainConfig(
        pretrained_model_name_or_path=str(base_model),
        train_data_dir=str(images),
        placeholder_token="<red-cartoon>",
        initializer_token="cartoon",
        resolution=64,
        train_batch_size=2,
        max_train_steps=steps,
        learning_rate=5e-3,
        lr_warmup_steps=0,
        save_steps=max(1, steps // 2),
        seed=42,
        output_dir=str(output_dir),
        overwrite_output_dir=overwrite,
        cpu_threads=threads,
    )
    result = train(config)
    generated = generate(
        str(output_dir),
        PROMPT,
        num_images=1,
        num_inference_steps=25,
        seed=1,
        output_dir=output_dir / SAMPLES_DIR,
        cpu_threads=threads,
    )
    return result, list(generated.paths)

"""Tiny pipelines of every model family with seeded random weights, for the demo, tests and benchmarks.

Each family's module (``textinv.models.families``) builds its own; this writes it to a folder. They have the real
architecture classes, so every loader that reads a real pipeline folder reads these too; only the widths are small.
Vocabularies: the CLIP families use the real CLIP BPE vocabulary shipped in ``textinv/assets/clip-tokenizer``, so
prompts tokenize exactly as in Stable Diffusion; the Chinese and T5 tokenizers are small vocabularies built offline
(a few hundred entries, not the real models': see each family's module).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from textinv.models.families import FAMILY_NAMES, get_family
from textinv.models.families.tiny_parts import (  # noqa: F401 (the benches and tests use them from here)
    SD_TRAINING_BETAS,
    TinySpec,
    clip_tokenizer_dir,
    demo_images_dir,
    sd_pipeline,
    sd_scheduler,
    sdxl_pipeline,
)
from textinv.models.quiet import quiet_loading

logger = logging.getLogger(__name__)

FAMILIES = FAMILY_NAMES  # one tiny pipeline per family textinv trains


def build_tiny_pipeline(
    output_dir: str | Path,
    family: str = "sd1",
    seed: int = 0,
    spec: Optional[TinySpec] = None,
) -> Path:
    """Write a tiny diffusers pipeline folder of ``family`` with weights drawn from ``seed``; ``spec`` sets its
    widths (None: :class:`TinySpec`'s, small enough for ~0.05 s/step at 64 px). Returns the folder."""
    model_family = get_family(family)
    spec = spec if spec is not None else TinySpec()
    import torch

    from textinv.errors import UserError
    from textinv.files import atomic_dir

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{str(output_dir)!r} already exists and is not empty; give a new folder")
    # Weights are drawn in one order for every family: text encoder(s), denoiser, VAE.
    with quiet_loading():  # importing a pipeline class logs transformers' notices; saving draws bars
        pipeline = model_family.build_tiny(spec, lambda: torch.manual_seed(seed))
        with atomic_dir(output_dir) as tmp:
            pipeline.save_pretrained(tmp)
            if model_family.tiny_notes is not None:
                model_family.tiny_notes(tmp)
    logger.info("wrote a tiny %s pipeline (seed %d) to %s", family, seed, output_dir)
    return output_dir

"""A tiny random-weight CLIP model (text and vision towers) with the real CLIP tokenizer, so that
``textinv eval --clip_model DIR`` can be tried, and tested, without a download."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from textinv.errors import UserError
from textinv.models.quiet import quiet_loading
from textinv.tiny import clip_tokenizer_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyClipSpec:
    """Widths of a tiny CLIP model (text and vision towers) for evaluation tests."""

    hidden_size: int = 32
    layers: int = 2
    heads: int = 4
    projection_dim: int = 16
    image_size: int = 32
    patch_size: int = 8


def build_tiny_clip(output_dir: str | Path, seed: int = 0, spec: TinyClipSpec = TinyClipSpec()) -> Path:
    """Write a tiny random-weight CLIP model folder (CLIPModel, image processor, the real CLIP tokenizer).

    ``textinv eval --clip_model`` reads it like any CLIP folder; its scores only rank images by
    low-level likeness, which is what tests need.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from textinv.files import atomic_dir

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{str(output_dir)!r} already exists and is not empty; give a new folder")
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    tower = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 4,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=spec.image_size, patch_size=spec.patch_size),
        projection_dim=spec.projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    # CLIP's own normalisation constants (openai/clip-vit-* preprocessor_config.json).
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    with atomic_dir(output_dir) as tmp, quiet_loading():
        model.save_pretrained(tmp)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "SOURCE.md"):
            shutil.copyfile(clip_tokenizer_dir() / name, tmp / name)  # the real CLIP tokenizer's own files
        image_processor.save_pretrained(tmp)
    logger.info("wrote a tiny CLIP model (seed %d) to %s", seed, output_dir)
    return output_dir

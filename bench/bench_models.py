"""The random-weight pipelines the speed benches train: built once into a cache folder outside the repository.

``tiny``: textinv's tiny SD1 pipeline (textinv.tiny); ``sd15``: the Stable Diffusion 1.5 architecture with seeded
random weights (~1.07 B parameters, ~4 GB on disk). Nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "textinv-bench"


def full_size_vae(sample_size: int, **config: Any) -> Any:
    """Stable Diffusion's VAE at its real size with random weights (128/256/512/512, 4 latent channels: the same in
    SD 1.5's and SDXL's configs); ``config`` adds what differs (SDXL: scaling_factor, force_upcast)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        **config,
    )


def build_sd15_architecture(output_dir: Path, seed: int = 0) -> Path:
    """A Stable Diffusion 1.5-shaped pipeline with random weights (the real sizes, ~1.07 B parameters).

    Sizes are those of runwayml/stable-diffusion-v1-5's configs (UNet 320/640/1280/1280 with
    768-d cross-attention and 8 heads; VAE 128/256/512/512; CLIP ViT-L/14 text encoder: 12 layers,
    768 wide, quick_gelu); the scheduler is its PNDM with scaled_linear betas 0.00085..0.012.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from textinv.files import atomic_dir
    from textinv.tiny import clip_tokenizer_dir, sd_pipeline, sd_scheduler

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = full_size_vae(512)
    pipeline = sd_pipeline(tokenizer, text_encoder, unet, vae, sd_scheduler())
    with atomic_dir(output_dir) as tmp:
        pipeline.save_pretrained(tmp)
    return output_dir


def ensure_models(cache: Path, wanted: set[str]) -> dict[str, Path]:
    from textinv.tiny import build_tiny_pipeline

    models = {"tiny": cache / "tiny-sd1", "sd15": cache / "sd15-architecture"}
    if "tiny" in wanted and not (models["tiny"] / "model_index.json").exists():
        build_tiny_pipeline(models["tiny"], seed=0)
    if "sd15" in wanted and not (models["sd15"] / "model_index.json").exists():
        print(f"building the SD1.5-architecture pipeline in {models['sd15']} (once; ~4 GB)", file=sys.stderr)
        build_sd15_architecture(models["sd15"])
    return models

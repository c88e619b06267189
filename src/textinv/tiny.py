"""Tiny Stable Diffusion pipelines with seeded random weights, for the demo, tests and benchmarks.

They have the real architecture classes and the real CLIP BPE vocabulary (shipped in
``textinv/assets/clip-tokenizer``), so prompts tokenize exactly as in Stable Diffusion 1.x
and every loader that reads a real pipeline folder reads these too; only the widths are small.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from textinv.config import UserError

logger = logging.getLogger(__name__)

FAMILIES = ("sd1",)


def clip_tokenizer_dir() -> Path:
    """Folder of the CLIP ViT-L/14 BPE tokenizer shipped inside the package."""
    return Path(str(resources.files("textinv") / "assets" / "clip-tokenizer"))


def demo_images_dir() -> Path:
    return Path(str(resources.files("textinv") / "assets" / "demo_images"))


@dataclass(frozen=True)
class TinySpec:
    """Widths of a tiny pipeline. Defaults are small enough for ~0.05 s/step at 64 px on 2 cores."""

    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    # Four blocks: three 2x downsamplings, so latents are 1/8 of the image side as in SD.
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    sample_size: int = 64  # pixels; the UNet's sample_size is this / 8


def build_tiny_pipeline(
    output_dir: str | Path,
    family: str = "sd1",
    seed: int = 0,
    spec: TinySpec = TinySpec(),
) -> Path:
    """Write a tiny diffusers pipeline folder of ``family`` with weights drawn from ``seed``."""
    if family not in FAMILIES:
        raise UserError(f"--family {family!r} is not one of: {', '.join(FAMILIES)}")
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from textinv.files import atomic_dir

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{str(output_dir)!r} already exists and is not empty; give a new folder")
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden_size,
            intermediate_size=spec.text_hidden_size * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            # Ids of the real CLIP vocabulary; CLIP pools the hidden state at the eos token.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="quick_gelu",
            projection_dim=spec.text_hidden_size,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(spec.unet_channels) - 1),
        up_block_types=("UpBlock2D",) * (len(spec.unet_channels) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=spec.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=min(32, spec.unet_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(32, spec.vae_channels[0]),
        sample_size=spec.sample_size,
        scaling_factor=0.18215,  # SD 1.x's value
    )
    # SD 1.x's scheduler settings (its scheduler/scheduler_config.json).
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_dir(output_dir) as tmp:
        pipeline.save_pretrained(tmp)
    logger.info("wrote a tiny %s pipeline (seed %d) to %s", family, seed, output_dir)
    return output_dir

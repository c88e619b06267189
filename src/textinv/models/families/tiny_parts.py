"""The pieces every tiny pipeline is made of (tokenizers, text-encoder configs, UNet, VAE, schedulers), shared by
the families' tiny builders (``textinv.models.families.*``) and the benches.

They have the real architecture classes, so every loader that reads a real pipeline folder reads the tiny ones
too; only the widths are small. CLIP families use the real CLIP BPE vocabulary shipped in
``textinv/assets/clip-tokenizer``, so prompts tokenize exactly as in Stable Diffusion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# Words the tiny non-CLIP vocabularies (Chinese, T5) know beyond the caption templates' own: initializers and
# prompt words users reach for first.
TINY_ENGLISH_WORDS = (
    "toy",
    "cat",
    "dog",
    "style",
    "cartoon",
    "red",
    "beach",
    "on",
    "in",
    "and",
    "with",
    "backpack",
    "art",
)


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
    text_hidden_size_2: int = 64  # SDXL's second text encoder (real: 768 and 1280)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    # Four blocks: three 2x downsamplings, so latents are 1/8 of the image side as in SD.
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    sample_size: int = 64  # pixels; the UNet's sample_size is this / 8
    addition_time_embed_dim: int = 8  # SDXL's time-id embedding width (real: 256)
    t5_hidden_size: int = 64  # SD3's and Flux's T5 encoder (real: 4096)


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    from transformers import CLIPTokenizer

    if pad_token == "<|endoftext|>":
        return CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), pad_token=pad_token)


def clip_text_config(tokenizer: Any, spec: TinySpec, hidden_size: int, hidden_act: str) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        # Ids of the real CLIP vocabulary; CLIP pools the hidden state at the eos token.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=hidden_act,  # OpenAI CLIP (SD 1.x): quick_gelu; OpenCLIP (SD 2.x, SDXL's second): gelu
        projection_dim=hidden_size,
    )


def tiny_unet(spec: TinySpec, cross_attention_dim: int, **family_settings: Any) -> Any:
    from diffusers import UNet2DConditionModel

    blocks = len(spec.unet_channels)
    settings: dict[str, Any] = dict(
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (blocks - 1),
        up_block_types=("UpBlock2D",) * (blocks - 1) + ("CrossAttnUpBlock2D",),
    )
    settings.update(family_settings)
    return UNet2DConditionModel(
        sample_size=spec.sample_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, spec.unet_channels[0]),
        **settings,
    )


def tiny_vae(spec: TinySpec, scaling_factor: float = 0.18215) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(32, spec.vae_channels[0]),
        sample_size=spec.sample_size,
        scaling_factor=scaling_factor,  # SD 1.x/2.x: 0.18215, SDXL: 0.13025
    )


# Stable Diffusion's noise schedule (SD 1.x, 2.x and SDXL scheduler configs share it).
SD_TRAINING_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def sd_scheduler(prediction_type: str = "epsilon") -> Any:
    """SD 1.x's scheduler settings (its scheduler/scheduler_config.json); SD 2.x's are the same betas."""
    from diffusers import DDIMScheduler, PNDMScheduler

    betas = SD_TRAINING_BETAS
    if prediction_type == "v_prediction":
        # SD 2.x 768-v ships a DDIM scheduler predicting velocity.
        return DDIMScheduler(
            **betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"
        )
    return PNDMScheduler(
        **betas, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"
    )


def sd_pipeline(
    tokenizer: Any, text_encoder: Any, unet: Any, vae: Any, scheduler: Any, pipeline_class: Any = None
) -> Any:
    from diffusers import StableDiffusionPipeline

    return (pipeline_class or StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(tokenizer: Any, tokenizer_2: Any, text_encoder: Any, text_encoder_2: Any, unet: Any, vae: Any) -> Any:
    """An SDXL base pipeline of these parts, with SDXL base's scheduler (its scheduler/scheduler_config.json)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        **SD_TRAINING_BETAS, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def single_clip_pipeline(
    spec: TinySpec, seed: Callable[[], Any], hidden_act: str, pad_token: str, prediction_type: str, **unet: Any
) -> Any:
    """SD 1.x's layout (quick_gelu, pads with the end token) or SD 2.x's (gelu, pads with "!", linear attention
    projections in the UNet): one CLIPTextModel over the real CLIP vocabulary, a UNet and a VAE."""
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer(pad_token=pad_token)
    seed()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec, spec.text_hidden_size, hidden_act))
    denoiser = tiny_unet(spec, spec.text_hidden_size, **unet)
    return sd_pipeline(tokenizer, text_encoder, denoiser, tiny_vae(spec), sd_scheduler(prediction_type))

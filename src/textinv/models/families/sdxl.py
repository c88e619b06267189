"""SDXL: CLIP ViT-L (``clip_l``, 768) and OpenCLIP bigG with projection (``clip_g``, 1280), a UNet with added
"text_time" conditioning, epsilon prediction.

What its pipeline feeds the UNet (diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``):
each encoder's penultimate-layer hidden states side by side, and ``added_cond_kwargs`` = the second encoder's
projected pooled output (``text_embeds``) and six time ids, (original height, width, crop top, left, target height,
width). Training passes original = target size and crop (0, 0), what that pipeline passes when generating, so the
token is learned under the conditioning it is used with. With aspect-ratio buckets the time ids carry each image's
real original size, crop (0, 0) (buckets resize whole images) and its bucket's size, as SDXL was trained.

Files: ``{clip_l: [n, 768], clip_g: [n, 1280]}`` safetensors, the layout of the A1111 web UI, ComfyUI and OneTrainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

from textinv.models.families.base import (
    BOTH,
    CLIP_G,
    CLIP_L,
    DenoiserCall,
    EncoderOutput,
    EncoderRole,
    ModelFamily,
    TextConditioning,
    call_clip,
)
from textinv.models.families.tiny_parts import (
    TinySpec,
    clip_text_config,
    clip_tokenizer,
    sdxl_pipeline,
    tiny_unet,
    tiny_vae,
)

# SDXL micro-conditioning: crop top-left (0, 0), as the pipeline's default crops_coords_top_left.
SDXL_CROP_TOP_LEFT = (0, 0)
MULTI_ENCODER_KEYS = {
    "comfyui": {CLIP_L: "clip_l", CLIP_G: "clip_g"},
    "onetrainer": {CLIP_L: "clip_l", CLIP_G: "clip_g"},
}


def encode(parts: Any, outputs: Mapping[str, EncoderOutput]) -> TextConditioning:
    """Penultimate layers side by side; the pooled vector is clip_g's projection."""
    import torch

    return TextConditioning(
        torch.cat([outputs[CLIP_L].sequence, outputs[CLIP_G].sequence], dim=-1), outputs[CLIP_G].pooled
    )


def sdxl_time_ids(noisy_latents: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """[batch, 6] (original h, w, crop top, left, target h, w) for latents of this size, in pixels."""
    import torch

    height, width = (int(side) * vae_scale_factor for side in noisy_latents.shape[-2:])
    row = torch.tensor([height, width, *SDXL_CROP_TOP_LEFT, height, width], dtype=torch.float32)
    return row.repeat(noisy_latents.shape[0], 1)


def bucket_time_ids(
    original_sizes: Sequence[Optional[tuple[int, int]]], noisy_latents: torch.Tensor, vae_scale_factor: int
) -> Optional[torch.Tensor]:
    """SDXL's time ids for examples that carry their image's original (height, width): (original size,
    crop (0, 0), target = the latent's size in pixels); None when none carries one (the default ids)."""
    import torch

    if all(size is None for size in original_sizes):
        return None
    default = sdxl_time_ids(noisy_latents, vae_scale_factor)
    rows = [
        row if size is None else torch.tensor([*size, *SDXL_CROP_TOP_LEFT, *row[4:].tolist()], dtype=torch.float32)
        for row, size in zip(default, original_sizes)
    ]
    return torch.stack(rows)


def denoise(parts: Any, conditioning: TextConditioning, call: DenoiserCall) -> torch.Tensor:
    unet = parts.denoiser
    time_ids = None
    if call.original_sizes is not None:
        time_ids = bucket_time_ids(call.original_sizes, call.noisy, call.vae_scale_factor)
    if time_ids is None:
        time_ids = sdxl_time_ids(call.noisy, call.vae_scale_factor)
    added = {
        "text_embeds": conditioning.pooled.to(unet.dtype),
        "time_ids": time_ids.to(call.noisy.device, unet.dtype),
    }
    return unet(
        call.noisy.to(unet.dtype), call.timesteps, conditioning.hidden_states.to(unet.dtype), added_cond_kwargs=added
    ).sample


def build_tiny(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    """CLIP ViT-L + OpenCLIP bigG (with projection); the UNet takes both encoders' states side by side, plus the
    pooled text embedding and six time ids ("text_time" added conditioning)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    seed()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec, spec.text_hidden_size, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, spec, spec.text_hidden_size_2, "gelu"))
    blocks = len(spec.unet_channels)
    unet = tiny_unet(
        spec,
        spec.text_hidden_size + spec.text_hidden_size_2,
        # SDXL's first block has no attention; the deeper ones do.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=spec.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * spec.addition_time_embed_dim + spec.text_hidden_size_2,
    )
    vae = tiny_vae(spec, scaling_factor=0.13025)
    return sdxl_pipeline(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae)


SDXL = ModelFamily(
    name="sdxl",
    title="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    encoders=(
        EncoderRole(CLIP_L, "text_encoder", "tokenizer", real_dim=768),
        EncoderRole(CLIP_G, "text_encoder_2", "tokenizer_2", conditions=BOTH, real_dim=1280),
    ),
    file_keys=MULTI_ENCODER_KEYS,
    encode=encode,
    call_encoder=call_clip,
    denoise=denoise,
    build_tiny=build_tiny,
    # ModelSpec's ID (Stability-AI/ModelSpec's README; kohya-ss/sd-scripts' sai_model_spec.py ARCH_SD_XL_V1_BASE).
    modelspec_architecture="stable-diffusion-xl-v1-base",
)

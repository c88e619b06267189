"""Flux.1 (dev and schnell): CLIP-L gives only the pooled vector, T5-XXL the whole token sequence; a
``FluxTransformer2DModel`` on packed latents (2x2 patches of 16 channels, with image and text position ids), trained
by rectified flow matching; dev models also take the guidance value as an input (``guidance_embeds``).

What ``FluxPipeline`` (diffusers) feeds the transformer: ``pooled_projections`` = CLIP-L's pooled output,
``encoder_hidden_states`` = T5's last hidden state over ``max_sequence_length`` tokens (512 for dev, 256 for schnell:
the values its model cards and the pipeline use), ``txt_ids`` zeros, ``img_ids`` the latent patch grid, ``timestep``
= sigma (the scheduler's timestep / 1000) and ``guidance`` (dev only). Training uses guidance 3.5, the default of
diffusers' and kohya's Flux training scripts (``--guidance_scale``).

A Flux embedding trained in CLIP-L alone changes only the pooled vector: a weak global nudge, not a word in the
sequence the image attends to (``--text_encoders`` warns about it).

Files: ComfyUI's ``{clip_l: [n, 768], t5xxl: [n, 4096]}``; OneTrainer and diffusers' advanced scripts use ``t5``.
diffusers' ``FluxPipeline.load_textual_inversion`` loads them: CLIP-L into ``text_encoder``, T5 into
``text_encoder_2``/``tokenizer_2``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

from textinv.models.families.base import (
    CLIP_L,
    MODELSPEC_IMPL_FLUX,
    POOLED,
    SEQUENCE,
    T5XXL,
    DenoiserCall,
    EncoderOutput,
    EncoderRole,
    TextConditioning,
    flow_transformer_family,
)
from textinv.models.families.tiny_parts import TinySpec

TRAINING_GUIDANCE = 3.5  # diffusers' train_dreambooth_lora_flux.py and kohya's flux_train --guidance_scale default
T5_MAX_LENGTH_DEV, T5_MAX_LENGTH_SCHNELL = 512, 256
FILE_KEYS = {"comfyui": {CLIP_L: "clip_l", T5XXL: "t5xxl"}, "onetrainer": {CLIP_L: "clip_l", T5XXL: "t5"}}


def encode(parts: Any, outputs: Mapping[str, EncoderOutput]) -> TextConditioning:
    return TextConditioning(outputs[T5XXL].sequence, outputs[CLIP_L].pooled)


def denoise(parts: Any, conditioning: TextConditioning, call: DenoiserCall) -> torch.Tensor:
    import torch
    from diffusers import FluxPipeline

    transformer = parts.denoiser
    dtype = transformer.dtype
    batch, channels, height, width = call.noisy.shape
    device = call.noisy.device
    packed = FluxPipeline._pack_latents(call.noisy.to(dtype), batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
    text_ids = torch.zeros(conditioning.hidden_states.shape[1], 3, device=device, dtype=dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), TRAINING_GUIDANCE, device=device, dtype=torch.float32)
    packed_prediction = transformer(
        hidden_states=packed,
        timestep=call.timesteps / 1000,  # FluxPipeline passes the scheduler's timestep / 1000, i.e. sigma
        guidance=guidance,
        pooled_projections=conditioning.pooled.to(dtype),
        encoder_hidden_states=conditioning.hidden_states.to(dtype),
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    # Back to [batch, C, h, w]: _unpack_latents takes the image size in pixels.
    return FluxPipeline._unpack_latents(
        packed_prediction, height * call.vae_scale_factor, width * call.vae_scale_factor, call.vae_scale_factor
    )


def tiny_notes(folder: Any) -> None:
    from textinv.models.families.tiny_flow import save_t5_readme

    save_t5_readme(folder, "tokenizer_2")


def max_length(role: EncoderRole, denoiser: Any) -> Optional[int]:
    if role.kind != "t5":
        return None
    return T5_MAX_LENGTH_DEV if denoiser.config.guidance_embeds else T5_MAX_LENGTH_SCHNELL


def build_tiny(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    from textinv.models.families.tiny_flow import build_tiny_flux

    return build_tiny_flux(spec, seed)


FLUX = flow_transformer_family(
    "flux",
    "Flux.1",
    (
        EncoderRole(CLIP_L, "text_encoder", "tokenizer", conditions=POOLED, real_dim=768),
        EncoderRole(T5XXL, "text_encoder_2", "tokenizer_2", conditions=SEQUENCE, kind="t5", real_dim=4096),
    ),
    "FluxTransformer2DModel",
    pipeline_class="FluxPipeline",
    file_keys=FILE_KEYS,
    encode=encode,
    denoise=denoise,
    build_tiny=build_tiny,
    max_length=max_length,
    tiny_notes=tiny_notes,
    # kohya-ss/sd-scripts' sai_model_spec.py: ARCH_FLUX_1_UNKNOWN (dev and schnell, "flux-1-dev"/"-schnell", share
    # the text encoders an embedding's vectors belong to) and IMPL_FLUX.
    modelspec_architecture="flux-1",
    modelspec_implementation=MODELSPEC_IMPL_FLUX,
)

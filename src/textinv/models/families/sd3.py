"""Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G with projection (each gives the penultimate layer's sequence and a
pooled vector), T5-XXL (the sequence), an ``SD3Transformer2DModel`` (MMDiT) trained by rectified flow matching.

What ``StableDiffusion3Pipeline.encode_prompt`` (diffusers) feeds the transformer: the two CLIP sequences side by side
(768 + 1280 wide), zero-padded to T5's width (4096) and followed by T5's sequence along the token axis
(77 + 256 tokens); the pooled projection is both CLIP pooled vectors side by side (2048). T5 reads up to
``max_sequence_length`` = 256 tokens, the pipeline's default.

Files: ComfyUI's ``{clip_l: [n, 768], clip_g: [n, 1280], t5xxl: [n, 4096]}``; OneTrainer and diffusers' advanced
scripts write T5's vectors under ``t5``. diffusers has no textual-inversion loader for this pipeline
(no ``TextualInversionLoaderMixin``), so textinv's own (``textinv.embeddings.load_embeddings``) puts the rows into all
three encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

from textinv.models.families.base import (
    BOTH,
    CLIP_G,
    CLIP_L,
    SEQUENCE,
    T5XXL,
    DenoiserCall,
    EncoderOutput,
    EncoderRole,
    TextConditioning,
    flow_transformer_family,
)
from textinv.models.families.tiny_parts import TinySpec

T5_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s max_sequence_length default
FILE_KEYS = {
    "comfyui": {CLIP_L: "clip_l", CLIP_G: "clip_g", T5XXL: "t5xxl"},
    "onetrainer": {CLIP_L: "clip_l", CLIP_G: "clip_g", T5XXL: "t5"},
}


def encode(parts: Any, outputs: Mapping[str, EncoderOutput]) -> TextConditioning:
    import torch

    clip_l, clip_g, t5 = outputs[CLIP_L], outputs[CLIP_G], outputs[T5XXL]
    clip = torch.cat([clip_l.sequence, clip_g.sequence], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.sequence.shape[-1] - clip.shape[-1]))
    return TextConditioning(
        torch.cat([clip, t5.sequence.to(clip.dtype)], dim=-2), torch.cat([clip_l.pooled, clip_g.pooled], dim=-1)
    )


def denoise(parts: Any, conditioning: TextConditioning, call: DenoiserCall) -> torch.Tensor:
    transformer = parts.denoiser
    dtype = transformer.dtype
    return transformer(
        hidden_states=call.noisy.to(dtype),
        timestep=call.timesteps,
        encoder_hidden_states=conditioning.hidden_states.to(dtype),
        pooled_projections=conditioning.pooled.to(dtype),
        return_dict=False,
    )[0]


def tiny_notes(folder: Any) -> None:
    from textinv.models.families.tiny_flow import save_t5_readme

    save_t5_readme(folder, "tokenizer_3")


def max_length(role: EncoderRole, denoiser: Any) -> Optional[int]:
    return T5_MAX_SEQUENCE_LENGTH if role.kind == "t5" else None


def build_tiny(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    from textinv.models.families.tiny_flow import build_tiny_sd3

    return build_tiny_sd3(spec, seed)


SD3 = flow_transformer_family(
    "sd3",
    "Stable Diffusion 3/3.5",
    (
        EncoderRole(CLIP_L, "text_encoder", "tokenizer", conditions=BOTH, real_dim=768),
        EncoderRole(CLIP_G, "text_encoder_2", "tokenizer_2", conditions=BOTH, real_dim=1280),
        EncoderRole(T5XXL, "text_encoder_3", "tokenizer_3", conditions=SEQUENCE, kind="t5", real_dim=4096),
    ),
    "SD3Transformer2DModel",
    pipeline_class="StableDiffusion3Pipeline",
    file_keys=FILE_KEYS,
    encode=encode,
    denoise=denoise,
    build_tiny=build_tiny,
    max_length=max_length,
    tiny_notes=tiny_notes,
    diffusers_loader=False,
    # kohya-ss/sd-scripts' sai_model_spec.py ARCH_SD3_M, which kohya follows with the variant ("-m", "-5-large"). An
    # embedding's vectors are the text encoders', which every SD3/3.5 variant shares: the family's ID names no variant.
    modelspec_architecture="stable-diffusion-3",
)

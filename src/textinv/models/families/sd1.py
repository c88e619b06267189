"""SD 1.x: OpenAI CLIP ViT-L/14 (768 wide, quick_gelu) and a UNet predicting the noise (epsilon).

The conditioning is the text encoder's last hidden state (diffusers' ``StableDiffusionPipeline.encode_prompt``).
Embedding files hold ``{token: [n, 768]}`` (diffusers), ``string_to_param`` (A1111) or a ``.pdparams`` pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textinv.models.families.base import SINGLE, EncoderRole, single_encoder_family
from textinv.models.families.tiny_parts import TinySpec, single_clip_pipeline


def build_tiny(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    return single_clip_pipeline(spec, seed, "quick_gelu", "<|endoftext|>", "epsilon")


# ModelSpec's ID (Stability-AI/ModelSpec's README; kohya-ss/sd-scripts' sai_model_spec.py ARCH_SD_V1).
SD1 = single_encoder_family(
    "sd1",
    "SD 1.x",
    EncoderRole(SINGLE, "text_encoder", "tokenizer", real_dim=768),
    build_tiny,
    modelspec_architecture="stable-diffusion-v1",
)

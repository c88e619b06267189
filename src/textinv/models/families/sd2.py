"""SD 2.x: OpenCLIP ViT-H in CLIPTextModel form (1024 wide, gelu, pads with ``!``) and a UNet with linear
attention projections; ``sd2`` predicts the noise (the 512 px base), ``sd2-v`` the velocity (768-v).

The conditioning is the text encoder's last hidden state, as for SD 1.x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textinv.models.families.base import SINGLE, EncoderRole, single_encoder_family
from textinv.models.families.tiny_parts import TinySpec, single_clip_pipeline


def build_tiny(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    return single_clip_pipeline(spec, seed, "gelu", "!", "epsilon", use_linear_projection=True)


def build_tiny_v(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    return single_clip_pipeline(spec, seed, "gelu", "!", "v_prediction", use_linear_projection=True)


_ENCODER = EncoderRole(SINGLE, "text_encoder", "tokenizer", real_dim=1024)
# ModelSpec's IDs tell the two apart (Stability-AI/ModelSpec's README; kohya-ss/sd-scripts' sai_model_spec.py
# ARCH_SD_V2_512 and ARCH_SD_V2_768_V).
SD2 = single_encoder_family("sd2", "SD 2.x", _ENCODER, build_tiny, modelspec_architecture="stable-diffusion-v2-512")
SD2_V = single_encoder_family(
    "sd2-v", "SD 2.x (v-prediction)", _ENCODER, build_tiny_v, modelspec_architecture="stable-diffusion-v2-768-v"
)

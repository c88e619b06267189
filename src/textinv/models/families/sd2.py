"""SD 2.x: OpenCLIP ViT-H in CLIPTextModel form (1024 wide, gelu, pads with ``!``) and a UNet with linear
attention projections; ``sd2`` predicts the noise (the 512 px base), ``sd2-v`` the velocity (768-v).

The conditioning is the text encoder's last hidden state, as for SD 1.x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textinv.models.families.base import (
    SINGLE,
    EncoderRole,
    ModelFamily,
    call_last_hidden,
    single_encoder,
    unet_denoise,
)
from textinv.models.families.tiny_parts import (
    TinySpec,
    clip_text_config,
    clip_tokenizer,
    sd_pipeline,
    sd_scheduler,
    tiny_unet,
    tiny_vae,
)


def _build(spec: TinySpec, seed: Callable[[], Any], prediction_type: str) -> Any:
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer(pad_token="!")
    seed()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec, spec.text_hidden_size, "gelu"))
    unet = tiny_unet(spec, spec.text_hidden_size, use_linear_projection=True)
    return sd_pipeline(tokenizer, text_encoder, unet, tiny_vae(spec), sd_scheduler(prediction_type))


def build_tiny(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    return _build(spec, seed, "epsilon")


def build_tiny_v(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    return _build(spec, seed, "v_prediction")


_ENCODERS = (EncoderRole(SINGLE, "text_encoder", "tokenizer", real_dim=1024),)
SD2 = ModelFamily(
    name="sd2",
    title="SD 2.x",
    pipeline_class="StableDiffusionPipeline",
    encoders=_ENCODERS,
    encode=single_encoder,
    call_encoder=call_last_hidden,
    denoise=unet_denoise,
    build_tiny=build_tiny,
)
SD2_V = ModelFamily(
    name="sd2-v",
    title="SD 2.x (v-prediction)",
    pipeline_class="StableDiffusionPipeline",
    encoders=_ENCODERS,
    encode=single_encoder,
    call_encoder=call_last_hidden,
    denoise=unet_denoise,
    build_tiny=build_tiny_v,
)

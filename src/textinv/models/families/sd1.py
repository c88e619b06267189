"""SD 1.x: OpenAI CLIP ViT-L/14 (768 wide, quick_gelu) and a UNet predicting the noise (epsilon).

The conditioning is the text encoder's last hidden state (diffusers' ``StableDiffusionPipeline.encode_prompt``).
Embedding files hold ``{token: [n, 768]}`` (diffusers), ``string_to_param`` (A1111) or a ``.pdparams`` pickle.
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


def build_tiny(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    seed()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec, spec.text_hidden_size, "quick_gelu"))
    unet = tiny_unet(spec, spec.text_hidden_size)
    return sd_pipeline(tokenizer, text_encoder, unet, tiny_vae(spec), sd_scheduler())


SD1 = ModelFamily(
    name="sd1",
    title="SD 1.x",
    pipeline_class="StableDiffusionPipeline",
    encoders=(EncoderRole(SINGLE, "text_encoder", "tokenizer", real_dim=768),),
    encode=single_encoder,
    call_encoder=call_last_hidden,
    denoise=unet_denoise,
    build_tiny=build_tiny,
)

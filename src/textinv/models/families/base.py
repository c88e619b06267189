"""What a model family declares, in one place: its text encoders and tokenizers, how a prompt becomes the
denoiser's inputs, its objective, its embedding-file keys per ecosystem, and its tiny builder.

A family is a :class:`ModelFamily` instance in a module of its own (``sd1``, ``sd2``, ``sdxl``, ``sd3``,
``flux``, ``zh``). The recipe, export, generation, validation and evaluation ask the family (``parts.family``)
and never branch on its name.

Encoders are known by their *role*, which is also the key of their vectors in an :class:`~textinv.embeddings.Embedding`
and in ComfyUI's embedding files: ``clip_l`` (OpenAI CLIP ViT-L/14), ``clip_g`` (OpenCLIP bigG), ``t5xxl`` (T5 v1.1
XXL). Families with one text encoder (SD 1.x/2.x, the Chinese ones) call it ``text_encoder``: their files name no
encoder. The *slot* is the pipeline attribute (and folder) that holds the encoder, which differs by family: Flux's
``text_encoder_2`` is T5, SDXL's is CLIP-G.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

# What an encoder's output conditions: the token sequence, the pooled vector, or both.
SEQUENCE, POOLED, BOTH = "sequence", "pooled", "sequence+pooled"
# Role of the only text encoder of a single-encoder family (its files name no encoder).
SINGLE = "text_encoder"
CLIP_L, CLIP_G, T5XXL = "clip_l", "clip_g", "t5xxl"
# MMDiT's (SD3, Flux) joint-attention projections of both streams (image: to_*, text: add_*_proj, to_add_out): the
# modules diffusers' advanced SD3/Flux scripts put LoRA on by default.
JOINT_ATTENTION_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# ModelSpec's "implementation" values (https://github.com/Stability-AI/ModelSpec: the codebase whose names the file's
# keys follow), as kohya-ss/sd-scripts' library/sai_model_spec.py writes them for textual inversion (IMPL_STABILITY_AI
# for every family but Flux, IMPL_FLUX for Flux) and for diffusers-format models (IMPL_DIFFUSERS).
MODELSPEC_IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
MODELSPEC_IMPL_FLUX = "https://github.com/black-forest-labs/flux"
MODELSPEC_IMPL_DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class EncoderRole:
    """One text encoder of a family: its role (the embedding key), where the pipeline keeps it, what it conditions."""

    role: str
    slot: str  # pipeline attribute and folder: text_encoder, text_encoder_2, text_encoder_3
    tokenizer_slot: str  # tokenizer, tokenizer_2, tokenizer_3
    conditions: str = SEQUENCE
    kind: str = "clip"  # clip, t5, bert or xlmr: how it is called and which classes may fill the slot
    real_dim: Optional[int] = None  # its width in the released models (tells a file's family by its dims)


@dataclass
class EncoderOutput:
    """What one text encoder gives for a batch of prompts, as the family's pipeline uses it."""

    sequence: Any = None  # [batch, tokens, dim], or None
    pooled: Any = None  # [batch, dim], or None


@dataclass
class TextConditioning:
    """What the text encoders hand the denoiser for a batch of captions."""

    hidden_states: Any  # [batch, tokens, dim]
    pooled: Any = None  # [batch, dim]: SDXL's text_embeds, SD3's and Flux's pooled projections; or None


@dataclass(frozen=True)
class DenoiserCall:
    """Everything beyond the conditioning that one denoiser call needs."""

    noisy: Any  # [batch, C, h, w] latents
    timesteps: Any  # [batch], what the objective says the denoiser is called with
    vae_scale_factor: int = 8
    # Each example's image (height, width) before aspect-ratio bucketing, or None (SDXL's time ids carry it).
    original_sizes: Optional[Sequence[Optional[tuple[int, int]]]] = None


@dataclass(frozen=True)
class ModelFamily:
    """A model family: everything textinv needs to know about it, declared once."""

    name: str
    title: str  # for messages: "SD 1.x", "Flux.1"
    pipeline_class: str  # the diffusers pipeline it is trained and used with
    encoders: tuple[EncoderRole, ...]
    denoiser_slot: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    objective: str = "ddpm"  # "ddpm" (epsilon / v-prediction, the scheduler's prediction_type) or "flow"
    latent_channels: int = 4
    # Embedding-file keys per ecosystem: ecosystem -> role -> key. Single-encoder files name no encoder.
    file_keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Pixels an image side must be a multiple of (VAE factor x the denoiser's patch size).
    resolution_multiple: int = 8
    encode: Callable[[Any, Mapping[str, EncoderOutput]], TextConditioning] = field(default=None, repr=False)  # type: ignore[assignment]
    call_encoder: Callable[[EncoderRole, Any, Any, Optional[Any]], EncoderOutput] = field(default=None, repr=False)  # type: ignore[assignment]
    denoise: Callable[[Any, TextConditioning, DenoiserCall], Any] = field(default=None, repr=False)  # type: ignore[assignment]
    build_tiny: Callable[[Any, Callable[[], Any]], Any] = field(default=None, repr=False)  # type: ignore[assignment]
    # Tokens per prompt for an encoder, given the loaded denoiser's config (None: the tokenizer's model_max_length).
    max_length: Callable[[EncoderRole, Any], Optional[int]] = field(default=lambda role, denoiser: None, repr=False)
    # The denoiser's modules pivotal tuning puts LoRA adapters on (--lora_rank): a UNet's attention projections, as
    # diffusers' train_dreambooth_lora.py targets them.
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # The caption language its text encoder reads, when not English: zh (Taiyi's BERT), zh_en (AltDiffusion's XLM-R).
    language: Optional[str] = None
    # Writes notes beside a saved tiny pipeline (the T5 tokenizer's README: its vocabulary is not T5's).
    tiny_notes: Optional[Callable[[Any], None]] = field(default=None, repr=False)
    # diffusers' load_textual_inversion works on this family's pipeline (SD3's has no TextualInversionLoaderMixin).
    diffusers_loader: bool = True
    # ModelSpec's architecture ID of the base model ("stable-diffusion-v1"; an embedding file's modelspec.architecture
    # adds "/textual-inversion") and its implementation (textinv.embeddings.modelspec writes both).
    modelspec_architecture: str = ""
    modelspec_implementation: str = MODELSPEC_IMPL_STABILITY_AI

    def __str__(self) -> str:
        return self.name

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(encoder.role for encoder in self.encoders)

    @property
    def multi_encoder(self) -> bool:
        return len(self.encoders) > 1

    def encoder(self, role: str) -> EncoderRole:
        for encoder in self.encoders:
            if encoder.role == role:
                return encoder
        raise KeyError(role)

    def role_of_slot(self, slot: str) -> str:
        for encoder in self.encoders:
            if encoder.slot == slot:
                return encoder.role
        raise KeyError(slot)

    def real_dims(self) -> dict[str, int]:
        return {encoder.role: encoder.real_dim for encoder in self.encoders if encoder.real_dim}


def call_clip(role: EncoderRole, text_encoder: Any, input_ids: Any, attention_mask: Optional[Any]) -> EncoderOutput:
    """A CLIP encoder as SDXL's and SD3's pipelines call it: the penultimate layer's states, and the first output
    (CLIPTextModelWithProjection's projected ``text_embeds``; CLIPTextModel's pooled output) as the pooled vector."""
    output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=role.conditions != POOLED)
    pooled = output[0] if role.conditions != SEQUENCE else None
    if role.conditions == POOLED:
        return EncoderOutput(None, output.pooler_output)  # Flux: CLIPTextModel's pooled output alone
    return EncoderOutput(output.hidden_states[-2], pooled)


def call_last_hidden(
    role: EncoderRole, text_encoder: Any, input_ids: Any, attention_mask: Optional[Any]
) -> EncoderOutput:
    """The encoder's first output as the sequence: SD 1.x/2.x's CLIP last layer, BERT's, AltDiffusion's projection,
    T5's last hidden state."""
    return EncoderOutput(text_encoder(input_ids, attention_mask=attention_mask)[0])


def call_clip_or_t5(
    role: EncoderRole, text_encoder: Any, input_ids: Any, attention_mask: Optional[Any]
) -> EncoderOutput:
    """SD3's and Flux's encoders as their pipelines call them, without attention masks: T5's last hidden state,
    CLIP as :func:`call_clip`."""
    if role.kind == "t5":
        return call_last_hidden(role, text_encoder, input_ids, None)
    return call_clip(role, text_encoder, input_ids, None)


def single_encoder(parts: Any, outputs: Mapping[str, EncoderOutput]) -> TextConditioning:
    return TextConditioning(outputs[SINGLE].sequence)


def unet_denoise(parts: Any, conditioning: TextConditioning, call: DenoiserCall) -> Any:
    """A UNet2DConditionModel's prediction (no added conditioning)."""
    unet = parts.denoiser
    return unet(call.noisy.to(unet.dtype), call.timesteps, conditioning.hidden_states.to(unet.dtype)).sample


def roles_text(roles: Sequence[str]) -> str:
    return ", ".join(roles)


def single_encoder_family(
    name: str,
    title: str,
    encoder: EncoderRole,
    build_tiny: Callable[[Any, Callable[[], Any]], Any],
    pipeline_class: str = "StableDiffusionPipeline",
    language: Optional[str] = None,
    *,
    modelspec_architecture: str,
    modelspec_implementation: str = MODELSPEC_IMPL_STABILITY_AI,
) -> ModelFamily:
    """A family of the SD 1.x shape: one text encoder whose first output conditions a UNet (SD 1.x/2.x, the Chinese
    models)."""
    return ModelFamily(
        name=name,
        title=title,
        pipeline_class=pipeline_class,
        encoders=(encoder,),
        encode=single_encoder,
        call_encoder=call_last_hidden,
        denoise=unet_denoise,
        build_tiny=build_tiny,
        language=language,
        modelspec_architecture=modelspec_architecture,
        modelspec_implementation=modelspec_implementation,
    )


def flow_transformer_family(
    name: str, title: str, encoders: tuple[EncoderRole, ...], denoiser_class: str, **declared: Any
) -> ModelFamily:
    """A family of the SD3/Flux shape: an MMDiT transformer on 16-channel latents in 2x2 patches (sides multiples of
    16), trained by flow matching, its encoders called without masks, LoRA on the joint attention's projections.
    ``declared`` holds the rest (pipeline class, encode, denoise, file keys...)."""
    return ModelFamily(
        name=name,
        title=title,
        encoders=encoders,
        denoiser_slot="transformer",
        denoiser_class=denoiser_class,
        objective="flow",
        latent_channels=16,
        resolution_multiple=16,  # the VAE's 8 x the transformer's 2x2 patches
        call_encoder=call_clip_or_t5,
        lora_targets=JOINT_ATTENTION_LORA_TARGETS,
        **declared,
    )

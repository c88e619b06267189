"""Tiny Stable Diffusion 3 and Flux.1 pipelines with seeded random weights, for tests and demos on a CPU.

Like the other families' tiny pipelines (built of :mod:`textinv.models.families.tiny_parts`), they have the real
architecture classes (MMDiT transformers, CLIP and T5 encoders, a 16-channel VAE, the flow-matching scheduler), so
every loader that reads a real pipeline folder reads these too; only the widths are small. The CLIP tokenizers are
the real CLIP BPE vocabulary; the T5 tokenizer is a tiny Unigram vocabulary built here (:func:`t5_tokenizer`), not
T5's: :func:`save_t5_readme` writes a note saying so beside it.

Real-model facts below are from the released models' hub folders: stabilityai/stable-diffusion-3-medium-diffusers
and black-forest-labs/FLUX.1-dev (each part's config.json / scheduler_config.json).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # textinv's tiny parts are imported inside the functions, so importing this module stays cheap
    from textinv.models.families.tiny_parts import TinySpec

logger = logging.getLogger(__name__)

T5_TOKENIZER_README = """\
# A tiny T5-style tokenizer (not T5's vocabulary)

This tokenizer was built offline by textinv for tiny test pipelines. It is a Unigram (SentencePiece-style)
model with T5's special tokens (`<pad>` = 0, `</s>` = 1, `<unk>` = 2, sentinels `<extra_id_N>` last), the `▁`
word marker and an appended `</s>`, but its vocabulary has a few hundred entries: ASCII characters and the
words of textinv's English caption templates.

It is **not** T5's 32k-entry SentencePiece vocabulary (google/t5-v1_1-xxl), so token ids and the way text
splits into pieces differ from real T5-XXL. Do not use it with real T5 weights.
"""

# T5's sentinels, laid out as in its vocabulary: <extra_id_99> ... <extra_id_0> are the last ids (32000-32099), so
# tokens a user adds get the ids after them, and the tokenizer's extra_ids / get_sentinel_tokens() are T5's.
T5_EXTRA_IDS = 100
# T5-v1.1-XXL's tokenizer (SD3's tokenizer_3, Flux's tokenizer_2) has model_max_length 512.
T5_MAX_LENGTH = 512


def t5_tokenizer() -> Any:
    """A T5-style ``T5TokenizerFast`` built offline: no download, no ``spiece.model``.

    transformers' T5 tokenizer builds a ``tokenizers`` Unigram model (SentencePiece-style) from the (piece, score)
    list given here, with a Metaspace (``▁``) pre-tokenizer and a post-processor appending ``</s>`` as T5 does.
    Special tokens are T5's: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, and 100 ``<extra_id_N>`` sentinels at the
    end. The vocabulary is NOT T5's 32k SentencePiece one: it holds a few hundred entries (ASCII characters, the
    words of textinv's English caption templates and ``TINY_ENGLISH_WORDS``), so ids and splits differ
    from real T5; known words are one piece, other text splits into characters.
    """
    # transformers 5's T5Tokenizer is the tokenizers-backed class; T5TokenizerFast is another name for it.
    from transformers import T5Tokenizer

    from textinv.data.templates import OBJECT_TEMPLATES_EN, STYLE_TEMPLATES_EN
    from textinv.models.families.tiny_parts import TINY_ENGLISH_WORDS

    text = " ".join(OBJECT_TEMPLATES_EN + STYLE_TEMPLATES_EN + TINY_ENGLISH_WORDS).replace("{}", "")
    english = sorted(set(text.split()))
    # Scores are log-probabilities: a whole word (-5) beats any spelling of it in characters (-8 - 10 - ...).
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(f"\u2581{char}", -8.0) for char in string.ascii_letters + string.digits]
    pieces += [(f"\u2581{word}", -5.0) for word in english]
    pieces = list(dict(pieces).items())  # "▁a" is a letter and a word: keep one entry
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return T5Tokenizer(vocab=pieces, extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)


def save_t5_readme(pipeline_dir: Path, tokenizer_slot: str) -> None:
    """Write :data:`T5_TOKENIZER_README` as README.md into the pipeline folder's tokenizer folder."""
    folder = Path(pipeline_dir) / tokenizer_slot
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(T5_TOKENIZER_README, encoding="utf-8")


def _t5_encoder(tokenizer: Any, width: int, spec: TinySpec) -> Any:
    """A T5EncoderModel of T5 v1.1's kind (gated-gelu feed-forward), ``width`` wide."""
    from transformers import T5Config, T5EncoderModel

    heads = spec.text_heads
    config = T5Config(
        # One row per token (T5-XXL pads to 32128 rows for 32100 tokens): diffusers' load_textual_inversion resizes
        # the rows to len(tokenizer) + the new tokens, which would otherwise drop the padding rows.
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // heads,
        d_ff=width * 2,  # T5-XXL: 10240 = 2.5 x 4096
        num_layers=spec.text_layers,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _flow_vae(spec: TinySpec, scaling_factor: float, shift_factor: float) -> Any:
    """A 16-channel AutoencoderKL with tiny_parts.tiny_vae's blocks (8x downsampling). SD3's and Flux's VAEs have
    no quant convs (use_quant_conv/use_post_quant_conv false in their vae/config.json)."""
    from diffusers import AutoencoderKL

    blocks = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=min(32, spec.vae_channels[0]),
        sample_size=spec.sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _name_t5_tokenizer_fast(pipeline: Any, slot: str) -> None:
    """Record the T5 tokenizer in model_index.json as the released models do ("T5TokenizerFast"). transformers 5
    made T5TokenizerFast an alias of T5Tokenizer, so diffusers would write "T5Tokenizer"; both names load."""
    pipeline.register_to_config(**{slot: ("transformers", "T5TokenizerFast")})


def build_tiny_sd3(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    """A tiny StableDiffusion3Pipeline (SD3 medium's layout): two CLIP encoders with projection, a T5 encoder,
    an SD3Transformer2DModel, a 16-channel VAE and SD3's flow-matching scheduler. ``seed()`` is called once,
    after the tokenizers and before any weight is drawn; weights are drawn text encoders (1, 2, 3), transformer,
    VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from textinv.models.families.tiny_parts import clip_text_config, clip_tokenizer

    # SD3's tokenizer_2 (OpenCLIP bigG) pads with "!" (its special_tokens_map.json); tokenizer_1 with <|endoftext|>.
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    clip_width = spec.text_hidden_size + spec.text_hidden_size_2
    # SD3 zero-pads the two CLIP encoders' states, side by side, to T5's width (768 + 1280 <= 4096); a narrower T5
    # would make the pipeline's padding crop them, so T5 is at least as wide as both CLIPs.
    t5_width = max(spec.t5_hidden_size, clip_width)
    seed()
    text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer, spec, spec.text_hidden_size, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, spec, spec.text_hidden_size_2, "gelu"))
    text_encoder_3 = _t5_encoder(tokenizer_3, t5_width, spec)
    heads, head_dim = 4, 8  # SD3 medium: 24 x 64
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size // 8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim,  # the joint blocks need it to be the transformer's width
        pooled_projection_dim=clip_width,  # both CLIP encoders' pooled projections, side by side (2048)
        out_channels=16,
        pos_embed_max_size=64,  # patches per side: images up to 64 x 2 x 8 = 1024 px (SD3 medium: 192)
    )
    # SD3 medium's vae/config.json: scaling_factor 1.5305, shift_factor 0.0609.
    vae = _flow_vae(spec, scaling_factor=1.5305, shift_factor=0.0609)
    # SD3 medium's scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler, 1000 steps, shift 3.0.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    _name_t5_tokenizer_fast(pipeline, "tokenizer_3")
    logger.debug("built a tiny SD3 pipeline (T5 width %d)", t5_width)
    return pipeline


def build_tiny_flux(spec: TinySpec, seed: Callable[[], Any], guidance_embeds: bool = True) -> Any:
    """A tiny FluxPipeline (FLUX.1-dev's layout; ``guidance_embeds=False`` gives schnell's transformer): a CLIP
    encoder for the pooled vector, a T5 encoder for the sequence, a FluxTransformer2DModel, a 16-channel VAE and
    FLUX.1-dev's scheduler. ``seed()`` is called once, after the tokenizers and before any weight is drawn;
    weights are drawn text encoders (1, 2), transformer, VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from textinv.models.families.tiny_parts import clip_text_config, clip_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    seed()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, spec, spec.text_hidden_size, "quick_gelu"))
    text_encoder_2 = _t5_encoder(tokenizer_2, spec.t5_hidden_size, spec)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2, as in FLUX.1
        num_layers=1,  # FLUX.1: 19 double-stream blocks
        num_single_layers=1,  # and 38 single-stream blocks
        attention_head_dim=16,  # FLUX.1: 24 heads x 128
        num_attention_heads=2,
        joint_attention_dim=spec.t5_hidden_size,
        pooled_projection_dim=spec.text_hidden_size,  # CLIP-L's pooled output (768)
        guidance_embeds=guidance_embeds,  # dev: true, schnell: false
        axes_dims_rope=(4, 6, 6),  # (index, row, column) rotary dims summing to the head width; FLUX.1: 16, 56, 56
    )
    # FLUX.1-dev's vae/config.json: scaling_factor 0.3611, shift_factor 0.1159.
    vae = _flow_vae(spec, scaling_factor=0.3611, shift_factor=0.1159)
    # FLUX.1-dev's scheduler/scheduler_config.json: the shift grows with the image's token count (256 -> 4096).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    _name_t5_tokenizer_fast(pipeline, "tokenizer_2")
    logger.debug("built a tiny Flux pipeline (guidance_embeds=%s)", guidance_embeds)
    return pipeline

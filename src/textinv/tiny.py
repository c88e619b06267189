"""Tiny pipelines of every model family with seeded random weights, for the demo, tests and benchmarks.

They have the real architecture classes, so every loader that reads a real pipeline folder reads
these too; only the widths are small. Vocabularies:

- CLIP families (sd1, sd2, sd2-v, sdxl) use the real CLIP BPE vocabulary shipped in
  ``textinv/assets/clip-tokenizer``, so prompts tokenize exactly as in Stable Diffusion (SD 2.x
  and SDXL's second tokenizer pad with ``!``, as theirs do).
- zh-bert (Taiyi's layout: BertTokenizer + BertModel) gets a WordPiece vocabulary built here, and
  zh-xlmr (AltDiffusion's: XLMRobertaTokenizer + RobertaSeriesModelWithTransformation) a Unigram
  (SentencePiece-style) one built with the tokenizers library. Both hold the characters of the
  Chinese templates, the words of the English ones and a few common initializer words; other
  text splits into single characters (ASCII) or ``[UNK]``/``<unk>``. Real Chinese models ship
  vocabularies of 20k-250k entries; these have a few hundred.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from textinv.config import UserError
from textinv.models.loading import FAMILIES  # one tiny pipeline per family textinv trains
from textinv.models.quiet import quiet_loading

logger = logging.getLogger(__name__)

# Words the tiny Chinese vocabularies know beyond the templates' own: initializers and prompt words
# users reach for first (cat, dog, toy, style, painting, cartoon, red, beach, on...).
TINY_CHINESE_WORDS = (
    "猫",
    "狗",
    "玩具",
    "风格",
    "绘画",
    "油画",
    "水彩",
    "卡通",
    "红色",
    "沙滩",
    "在",
    "上",
    "小",
    "熊",
    "杯子",
    "背包",
)
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
CHINESE_TOKENIZER_MAX_LENGTH = 77  # the prompt length Stable Diffusion pipelines use


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


def build_tiny_pipeline(
    output_dir: str | Path,
    family: str = "sd1",
    seed: int = 0,
    spec: TinySpec = TinySpec(),
) -> Path:
    """Write a tiny diffusers pipeline folder of ``family`` with weights drawn from ``seed``."""
    if family not in FAMILIES:
        raise UserError(f"--family {family!r} is not one of: {', '.join(FAMILIES)}")
    import torch

    from textinv.files import atomic_dir

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{str(output_dir)!r} already exists and is not empty; give a new folder")
    # Weights are drawn in one order for every family: text encoder(s), UNet, VAE.
    with quiet_loading():  # importing a pipeline class logs transformers' notices; saving draws bars
        pipeline = _BUILDERS[family](spec, lambda: torch.manual_seed(seed))
        with atomic_dir(output_dir) as tmp:
            pipeline.save_pretrained(tmp)
    logger.info("wrote a tiny %s pipeline (seed %d) to %s", family, seed, output_dir)
    return output_dir


def _clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    from transformers import CLIPTokenizer

    if pad_token == "<|endoftext|>":
        return CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), pad_token=pad_token)


def _clip_text_config(tokenizer: Any, spec: TinySpec, hidden_size: int, hidden_act: str) -> Any:
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


def _unet(spec: TinySpec, cross_attention_dim: int, **family_settings: Any) -> Any:
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


def _vae(spec: TinySpec, scaling_factor: float = 0.18215) -> Any:
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


def _build_sd1(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    seed()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, spec, spec.text_hidden_size, "quick_gelu"))
    unet = _unet(spec, spec.text_hidden_size)
    return sd_pipeline(tokenizer, text_encoder, unet, _vae(spec), sd_scheduler())


def _build_sd2(spec: TinySpec, seed: Callable[[], Any], prediction_type: str = "epsilon") -> Any:
    """SD 2.x: OpenCLIP ViT-H in CLIPTextModel form (gelu, pads with "!"), linear attention projections."""
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer(pad_token="!")
    seed()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, spec, spec.text_hidden_size, "gelu"))
    unet = _unet(spec, spec.text_hidden_size, use_linear_projection=True)
    return sd_pipeline(tokenizer, text_encoder, unet, _vae(spec), sd_scheduler(prediction_type))


def _build_sd2_v(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    return _build_sd2(spec, seed, prediction_type="v_prediction")


def _build_sdxl(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    """SDXL: CLIP ViT-L + OpenCLIP bigG (with projection); the UNet takes both encoders' states side
    by side, plus the pooled text embedding and six time ids ("text_time" added conditioning)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")
    seed()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, spec, spec.text_hidden_size, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, spec, spec.text_hidden_size_2, "gelu"))
    blocks = len(spec.unet_channels)
    unet = _unet(
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
    vae = _vae(spec, scaling_factor=0.13025)
    return sdxl_pipeline(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae)


def _tiny_words() -> tuple[list[str], list[str]]:
    """(Chinese characters and words, English words) the tiny Chinese vocabularies hold, sorted."""
    from textinv.data.templates import OBJECT_TEMPLATES_EN, OBJECT_TEMPLATES_ZH, STYLE_TEMPLATES_EN, STYLE_TEMPLATES_ZH

    chinese_text = "".join(OBJECT_TEMPLATES_ZH + STYLE_TEMPLATES_ZH + TINY_CHINESE_WORDS).replace("{}", "")
    chinese = sorted(set(chinese_text) | set(TINY_CHINESE_WORDS))
    english_text = " ".join(OBJECT_TEMPLATES_EN + STYLE_TEMPLATES_EN + TINY_ENGLISH_WORDS).replace("{}", "")
    english = sorted(set(english_text.split()))
    return chinese, english


def _wordpiece_tokenizer() -> Any:
    """A BERT WordPiece tokenizer: BERT's five special tokens, ASCII characters (and their ``##``
    continuations), the English words, and Chinese single characters (BERT splits CJK text into
    characters before WordPiece, so Chinese BERT vocabularies are characters)."""
    from transformers import BertTokenizer

    chinese, english = _tiny_words()
    ascii_pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    entries = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    entries += ascii_pieces + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    entries += [word for word in english if word not in entries]
    entries += [char for char in chinese if len(char) == 1]
    vocab = {entry: index for index, entry in enumerate(dict.fromkeys(entries))}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=CHINESE_TOKENIZER_MAX_LENGTH)


def _unigram_tokenizer() -> Any:
    """An XLM-R style SentencePiece-Unigram tokenizer (tokenizers' Unigram model, XLM-R's special
    tokens and ``▁`` word-start marker). Scores are log-probabilities: whole words score above
    the characters that spell them, so known words stay one piece."""
    from transformers import XLMRobertaTokenizer

    chinese, english = _tiny_words()
    pieces: list[tuple[str, float]] = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(f"\u2581{word}", -5.0) for word in english]
    pieces += [(word, -5.0 if len(word) > 1 else -6.0) for word in chinese]
    pieces.append(("<mask>", 0.0))  # last, as in XLM-R's vocabulary
    return XLMRobertaTokenizer(vocab=pieces, model_max_length=CHINESE_TOKENIZER_MAX_LENGTH)


def _encoder_widths(spec: TinySpec) -> dict[str, Any]:
    """The transformer sizes every tiny text encoder shares (BERT, XLM-R and CLIP configs name them alike)."""
    return dict(
        hidden_size=spec.text_hidden_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        intermediate_size=spec.text_hidden_size * 4,
    )


def _build_zh_bert(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    """Taiyi's layout: a StableDiffusionPipeline whose tokenizer/text encoder are BertTokenizer/BertModel."""
    from transformers import BertConfig, BertModel

    tokenizer = _wordpiece_tokenizer()
    seed()
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            **_encoder_widths(spec),
            max_position_embeddings=CHINESE_TOKENIZER_MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = _unet(spec, spec.text_hidden_size)
    return sd_pipeline(tokenizer, text_encoder, unet, _vae(spec), sd_scheduler())


def _build_zh_xlmr(spec: TinySpec, seed: Callable[[], Any]) -> Any:
    """AltDiffusion's layout: AltDiffusionPipeline with XLMRobertaTokenizer and diffusers'
    RobertaSeriesModelWithTransformation (XLM-R, projecting its penultimate layer)."""
    from diffusers import AltDiffusionPipeline
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig,
        RobertaSeriesModelWithTransformation,
    )

    tokenizer = _unigram_tokenizer()
    seed()
    text_encoder = RobertaSeriesModelWithTransformation(
        RobertaSeriesConfig(
            vocab_size=len(tokenizer),
            **_encoder_widths(spec),
            # XLM-R numbers positions from pad_token_id + 1, so it needs two more than the prompt length.
            max_position_embeddings=CHINESE_TOKENIZER_MAX_LENGTH + 2,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            project_dim=spec.text_hidden_size,
            has_pre_transformation=True,  # AltDiffusion's setting
            use_attention_mask=True,
        )
    )
    unet = _unet(spec, spec.text_hidden_size)
    return sd_pipeline(tokenizer, text_encoder, unet, _vae(spec), sd_scheduler(), pipeline_class=AltDiffusionPipeline)


_BUILDERS: dict[str, Callable[[TinySpec, Callable[[], Any]], Any]] = {
    "sd1": _build_sd1,
    "sd2": _build_sd2,
    "sd2-v": _build_sd2_v,
    "sdxl": _build_sdxl,
    "zh-bert": _build_zh_bert,
    "zh-xlmr": _build_zh_xlmr,
}

"""The Chinese families: Taiyi (IDEA-CCNL; ``zh-bert``: BertTokenizer + BertModel) and AltDiffusion (BAAI; ``zh-xlmr``:
XLMRobertaTokenizer + diffusers' RobertaSeriesModelWithTransformation, which projects XLM-R's penultimate layer).

Both condition a SD 1.x-style UNet with the encoder's first output; AltDiffusion's encoder takes an attention mask
(its config sets ``use_attention_mask``). Their tiny pipelines get a WordPiece (BERT) or Unigram (XLM-R) vocabulary
built here, holding the characters of the Chinese templates, the words of the English ones and a few common
initializer words; other text splits into single characters (ASCII) or ``[UNK]``/``<unk>``. Real Chinese models ship
vocabularies of 20k-250k entries; these have a few hundred.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

from textinv.models.families.base import MODELSPEC_IMPL_DIFFUSERS, SINGLE, EncoderRole, single_encoder_family
from textinv.models.families.tiny_parts import (
    TINY_ENGLISH_WORDS,
    TinySpec,
    sd_pipeline,
    sd_scheduler,
    tiny_unet,
    tiny_vae,
)

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
CHINESE_TOKENIZER_MAX_LENGTH = 77  # the prompt length Stable Diffusion pipelines use


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
    unet = tiny_unet(spec, spec.text_hidden_size)
    return sd_pipeline(tokenizer, text_encoder, unet, tiny_vae(spec), sd_scheduler())


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
    unet = tiny_unet(spec, spec.text_hidden_size)
    return sd_pipeline(
        tokenizer, text_encoder, unet, tiny_vae(spec), sd_scheduler(), pipeline_class=AltDiffusionPipeline
    )


# ModelSpec's listing and kohya name no architecture for these. Their UNet is SD 1.x's, but an embedding's vectors
# live in the text encoder's space, and theirs is not SD 1.x's CLIP: "stable-diffusion-v1" would tell a tool the file
# works with SD 1.x models (Taiyi's BERT vectors even have SD 1.x's width, 768: they would load there and mean nothing).
# The spec wants IDs unique between models with different inferencing needs, so the SD 1.x ID is kept as the stem,
# with the model's name appended. Both models are published as diffusers pipelines: implementation "diffusers".
ZH_BERT = single_encoder_family(
    "zh-bert",
    "Taiyi (Chinese BERT)",
    EncoderRole(SINGLE, "text_encoder", "tokenizer", kind="bert"),
    _build_zh_bert,
    language="zh",
    modelspec_architecture="stable-diffusion-v1-taiyi",
    modelspec_implementation=MODELSPEC_IMPL_DIFFUSERS,
)
ZH_XLMR = single_encoder_family(
    "zh-xlmr",
    "AltDiffusion (XLM-R)",
    EncoderRole(SINGLE, "text_encoder", "tokenizer", kind="xlmr"),
    _build_zh_xlmr,
    pipeline_class="AltDiffusionPipeline",
    language="zh_en",
    modelspec_architecture="stable-diffusion-v1-altdiffusion",
    modelspec_implementation=MODELSPEC_IMPL_DIFFUSERS,
)

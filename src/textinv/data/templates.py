"""Prompt templates as data.

The English lists are the "imagenet templates" of the Textual Inversion paper's code
(rinongal/textual_inversion, ldm/data/personalized.py), as reused verbatim by diffusers'
and ppdiffusers' textual-inversion examples (``imagenet_templates_small`` and
``imagenet_style_templates_small``). ``{}`` is where the placeholder goes.

The Chinese lists are ppdiffusers' ``zh_imagenet_templates_small`` and
``zh_imagenet_style_templates_small`` (PaddlePaddle/PaddleMIX,
ppdiffusers/examples/textual_inversion/train_textual_inversion.py; earlier in PaddleNLP's
ppdiffusers), as is the meaning of ``--language``: ``en``, ``zh``, or ``zh_en`` drawing from both
lists pooled together, and picking the language from the model's name when none is given.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from textinv.config import LANGUAGES

logger = logging.getLogger(__name__)


OBJECT_TEMPLATES_EN: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES_EN: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


OBJECT_TEMPLATES_ZH: tuple[str, ...] = (
    "一张{}的照片",
    "{}的渲染",
    "{}裁剪过的照片",
    "一张干净的{}的照片",
    "{}的黑暗照片",
    "我的{}的照片",
    "酷的{}的照片",
    "{}的特写照片",
    "{}的明亮照片",
    "{}的裁剪照片",
    "{}的照片",
    "{}的好照片",
    "一张{}的照片",
    "干净的照片{}",
    "一张漂亮的{}的照片",
    "漂亮的照片{}",
    "一张很酷的照片{}",
    "一张奇怪的照片{}",
)

STYLE_TEMPLATES_ZH: tuple[str, ...] = (
    "一幅{}风格的画",
    "{}风格的渲染",
    "{}风格的裁剪画",
    "{}风格的绘画",
    "{}风格的一幅干净的画",
    "{}风格的黑暗画作",
    "{}风格的图片",
    "{}风格的一幅很酷的画",
    "{}风格的特写画",
    "一幅{}风格的明亮画作",
    "{}风格的一幅好画",
    "{}风格的特写画",
    "{}风格的艺术画",
    "一幅{}风格的漂亮画",
    "一幅{}风格的奇怪的画",
)

_TEMPLATES = {
    ("object", "en"): OBJECT_TEMPLATES_EN,
    ("object", "zh"): OBJECT_TEMPLATES_ZH,
    ("style", "en"): STYLE_TEMPLATES_EN,
    ("style", "zh"): STYLE_TEMPLATES_ZH,
}


def templates_for(learnable_property: str, language: str = "en") -> tuple[str, ...]:
    """The prompt templates used to caption training images of an object or a style.

    ``zh_en`` is the English list followed by the Chinese one: each caption draws from both,
    in proportion to their lengths, as ppdiffusers does.
    """
    kind = "style" if learnable_property == "style" else "object"
    if language not in LANGUAGES:
        raise ValueError(f"language {language!r} is not one of {LANGUAGES}")
    return tuple(
        template for part in ("en", "zh") if part in language.split("_") for template in _TEMPLATES[(kind, part)]
    )


def choose_language(language: Optional[str], model_name: str, family: Any) -> str:
    """The template language: ``language`` when given; else ppdiffusers' rule on the model name
    ("chinese-en" -> zh_en, "chinese" -> zh, as in IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-EN-v0.1);
    else the language the model family's text encoder reads (``family.language``: Chinese BERT (Taiyi) zh,
    XLM-R (AltDiffusion, bilingual) zh_en, CLIP and T5 None: en)."""
    chosen = language
    if chosen is None:
        lowered = model_name.lower()
        if "chinese-en" in lowered:
            chosen = "zh_en"
        elif "chinese" in lowered:
            chosen = "zh"
        else:
            chosen = family.language or "en"
    if "zh" in chosen.split("_") and family.language is None:
        # CLIP's BPE vocabulary is English: Chinese captions become byte pieces the model never
        # learned to read, which weakens the conditioning the vectors are trained through.
        logger.warning(
            "--language %s on a %s model (English vocabulary): Chinese captions "
            "tokenize to byte pieces; use --language en unless the model was trained on Chinese",
            chosen,
            family.name,
        )
    return chosen

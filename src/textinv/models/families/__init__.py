"""The model families textinv trains, one module each, and telling a pipeline folder's family from its files.

Every other part of textinv asks the :class:`~textinv.models.families.base.ModelFamily` (``parts.family``) what
to do, and never branches on a family's name. Adding a family is a module here and a line in :data:`FAMILIES`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from textinv.errors import UserError
from textinv.models.families.base import POOLED, SINGLE, ModelFamily
from textinv.models.families.flux import FLUX
from textinv.models.families.sd1 import SD1
from textinv.models.families.sd2 import SD2, SD2_V
from textinv.models.families.sd3 import SD3
from textinv.models.families.sdxl import SDXL
from textinv.models.families.zh import ZH_BERT, ZH_XLMR

logger = logging.getLogger(__name__)

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (SD1, SD2, SD2_V, SDXL, SD3, FLUX, ZH_BERT, ZH_XLMR)
}
FAMILY_NAMES = tuple(FAMILIES)
SUPPORTED_TEXT = "SD 1.x, SD 2.x, SDXL, SD3/3.5, Flux.1, Taiyi (BERT) and AltDiffusion (XLM-R) pipelines"
# Text encoder classes a slot may hold: class name (config.json "architectures", else model_index.json's) ->
# (kind, module, class). Taiyi uses BertModel; AltDiffusion diffusers' RobertaSeriesModelWithTransformation (XLM-R),
# which diffusers 0.42 keeps under pipelines.deprecated.alt_diffusion; SD3 and Flux T5EncoderModel.
TEXT_ENCODER_CLASSES: dict[str, tuple[str, str, str]] = {
    "CLIPTextModel": ("clip", "transformers", "CLIPTextModel"),
    "CLIPTextModelWithProjection": ("clip", "transformers", "CLIPTextModelWithProjection"),
    "T5EncoderModel": ("t5", "transformers", "T5EncoderModel"),
    "BertModel": ("bert", "transformers", "BertModel"),
    "RobertaSeriesModelWithTransformation": (
        "xlmr",
        "diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series",
        "RobertaSeriesModelWithTransformation",
    ),
}


@dataclass(frozen=True)
class FolderLayout:
    """What a pipeline folder holds, as far as training cares (read from its JSON files only)."""

    family: ModelFamily
    pipeline_class: str
    encoder_classes: dict[str, str]  # slot -> text encoder class name
    prediction_type: str


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (UserError naming the known ones otherwise)."""
    if name not in FAMILIES:
        raise UserError(f"--family {name!r} is not one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def declared(index: dict[str, Any], name: str) -> bool:
    spec = index.get(name)
    return isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], str)


def detect(path: Path, index: dict[str, Any], read_json: Callable[[Path], dict[str, Any]]) -> FolderLayout:
    """Name the family of a checked pipeline folder from model_index.json, the text encoders' classes and widths,
    the denoiser's config and the scheduler's prediction type."""
    pipeline_class = str(index.get("_class_name", "an unnamed pipeline"))
    where = f"model {str(path)!r} ({pipeline_class})"
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    prediction_type = str(scheduler_config.get("prediction_type") or "epsilon")
    classes: dict[str, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    for slot in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if not declared(index, slot):
            continue
        config = read_json(path / slot / "config.json")
        architectures = config.get("architectures")
        class_name = architectures[0] if isinstance(architectures, list) and architectures else index[slot][1]
        if not isinstance(class_name, str) or class_name not in TEXT_ENCODER_CLASSES:
            raise UserError(
                f"{where} has a {class_name} {slot}; textinv trains with CLIP (SD 1.x/2.x/XL/3, Flux), T5 (SD3, Flux), "
                "BertModel (Taiyi) or RobertaSeriesModelWithTransformation (AltDiffusion) text encoders"
            )
        classes[slot], configs[slot] = class_name, config
    kinds = tuple(TEXT_ENCODER_CLASSES[classes[slot]][0] for slot in classes)
    if declared(index, "transformer"):
        transformer = index["transformer"][1]
        family = next((f for f in FAMILIES.values() if f.denoiser_class == transformer), None)
        if family is None:
            raise UserError(f"{where} has a {transformer} denoiser; textinv trains {SUPPORTED_TEXT}")
    else:
        denoiser = read_json(path / "unet" / "config.json")
        family = _unet_family(where, denoiser, kinds, configs.get("text_encoder", {}), prediction_type)
    wanted = tuple(encoder.kind for encoder in family.encoders)
    slots = tuple(encoder.slot for encoder in family.encoders)
    if kinds != wanted or tuple(classes) != slots:
        found = " + ".join(f"{slot}: {name}" for slot, name in classes.items()) or "no text encoder"
        raise UserError(
            f"{where} has {found}; a {family.title} pipeline has "
            + " + ".join(f"{e.slot}: {e.kind}" for e in family.encoders)
        )
    return FolderLayout(family, pipeline_class, classes, prediction_type)


def _unet_family(
    where: str, unet: dict[str, Any], kinds: tuple[str, ...], first_config: dict[str, Any], prediction_type: str
) -> ModelFamily:
    """A UNet pipeline's family: the UNet must be a text-to-image one whose extra inputs training can supply."""
    unet_class = unet.get("_class_name", "UNet2DConditionModel")
    if unet_class != "UNet2DConditionModel":
        raise UserError(f"{where} has a {unet_class} denoiser; textinv trains {SUPPORTED_TEXT} (UNet2DConditionModel)")
    in_channels = _config_int(unet, "in_channels", 4, f"{where}: unet/config.json")
    if in_channels != 4:
        raise UserError(
            f"{where} has a UNet with {in_channels} input channels (an inpainting, depth or upscaling model); "
            "textinv trains text-to-image UNets (4 latent channels)"
        )
    extra = unet.get("addition_embed_type")
    if unet.get("class_embed_type") is not None or extra not in (None, "text_time"):
        what = unet.get("class_embed_type") or extra
        raise UserError(f"{where} has a UNet conditioned on {what!r} inputs; textinv trains {SUPPORTED_TEXT}")
    if (extra == "text_time") != (len(kinds) == 2):
        raise UserError(
            f"{where} has {len(kinds)} text encoder(s) and a UNet with addition_embed_type={extra!r}; "
            "textinv knows this only as SDXL (two encoders, 'text_time')"
        )
    if len(kinds) == 2:
        if kinds != ("clip", "clip"):
            raise UserError(
                f"{where} has two text encoders ({' + '.join(kinds)}); "
                "textinv trains two-encoder UNet pipelines only as SDXL (CLIPTextModel + CLIPTextModelWithProjection)"
            )
        return SDXL
    if kinds == ("bert",):
        return ZH_BERT
    if kinds == ("xlmr",):
        return ZH_XLMR
    if prediction_type == "v_prediction":
        return SD2_V
    # OpenCLIP ViT-H (SD 2.x) is 1024 wide and uses gelu; OpenAI CLIP ViT-L (SD 1.x) quick_gelu.
    if (
        _config_int(first_config, "hidden_size", 0, f"{where}: text_encoder/config.json") == 1024
        or first_config.get("hidden_act") == "gelu"
    ):
        return SD2
    return SD1


def _config_int(config: dict[str, Any], key: str, default: int, where: str) -> int:
    """A config's whole-number setting; a damaged file (a string, a list, a fraction) is a one-line UserError."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(
            f"{where} has {key} = {json.dumps(value)[:40]}, not a whole number; the model folder is damaged"
        )
    return value


def family_of_roles(dims: dict[str, int]) -> str:
    """The family an embedding's vectors are for, by their roles (and, for one encoder, its width): ``sdxl``, ``sd3``,
    ``flux``; ``sd1``/``sd2`` for 768/1024 single-encoder vectors; several joined by ``/`` for a file of only some of
    a family's encoders (``{t5xxl}``: ``sd3/flux``); else ``unknown``."""
    roles = set(dims)
    if roles == {SINGLE}:
        found = [name for name, family in FAMILIES.items() if family.real_dims() == dims]
        return found[0] if found else "unknown"
    multi = [family for family in FAMILIES.values() if family.multi_encoder]
    exact = [family.name for family in multi if set(family.roles) == roles]
    if exact:
        return exact[0]
    partial = [family.name for family in multi if roles and roles < set(family.roles)]
    return "/".join(partial) if partial else "unknown"


def check_text_encoders(family: ModelFamily, requested: Sequence[str]) -> None:
    """``--text_encoders`` must name encoders the model has; training only a pooled-only encoder (Flux's CLIP-L) is
    allowed with a warning that says what it means. Reads no weights: the CLI calls it before torch loads."""
    if not requested:
        return
    unknown = [name for name in requested if name not in family.roles]
    if unknown:
        raise UserError(
            f"--text_encoders {' '.join(requested)}: a {family.title} model has no {unknown[0]!r} text encoder; "
            f"give some of: {', '.join(family.roles)}"
        )
    if all(family.encoder(name).conditions == POOLED for name in requested):
        sequence = [encoder.role for encoder in family.encoders if encoder.conditions != POOLED]
        logger.warning(
            "--text_encoders %s: in %s, %s gives only the pooled vector, a global nudge to the whole image; the word "
            "the image attends to is read by %s. Add it to --text_encoders to learn the concept itself",
            " ".join(requested),
            family.title,
            " and ".join(requested),
            " and ".join(sequence),
        )


def family_of_pipeline(pipeline: Any) -> Optional[ModelFamily]:
    """The family of a loaded diffusers pipeline, by its class and text encoders (None for a class no family uses).
    The single-encoder families that share StableDiffusionPipeline all have one encoder in the same slot."""
    name = type(pipeline).__name__
    for family in FAMILIES.values():
        if family.pipeline_class == name:
            return family
    return None


def prompt_arguments(pipeline: Any, prompt: str, expand: Callable[[str, Any], str]) -> dict[str, str]:
    """The pipeline call's prompt arguments. Where diffusers expands a multi-vector token itself
    (TextualInversionLoaderMixin.maybe_convert_prompt) that is ``{"prompt": prompt}``; SD3's pipeline does not, so
    each of its tokenizers gets the prompt as ``expand(prompt, tokenizer)`` spells it (``prompt``, ``prompt_2``...)."""
    family = family_of_pipeline(pipeline)
    if family is None or family.diffusers_loader:
        return {"prompt": prompt}
    arguments = {}
    for position, encoder in enumerate(family.encoders):
        tokenizer = getattr(pipeline, encoder.tokenizer_slot, None)
        key = "prompt" if position == 0 else f"prompt_{position + 1}"
        arguments[key] = expand(prompt, tokenizer) if tokenizer is not None else prompt
    return arguments

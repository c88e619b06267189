"""Loading a pipeline's parts from a local diffusers folder or a hub id, and naming its family."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from textinv.config import UserError, first_line
from textinv.models.quiet import quiet_loading

logger = logging.getLogger(__name__)

# A diffusion model's hub id is "owner/name"; anything else that does not exist locally is a mistyped folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
REQUIRED_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


# Model families textinv trains (what :func:`inspect_pipeline` can name).
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "zh-bert", "zh-xlmr")
# (text encoder attribute, its tokenizer's attribute) in a diffusers pipeline, in prompt-encoding order.
ENCODER_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
# Text encoder classes textinv can train with: class name (text_encoder/config.json "architectures",
# else the class model_index.json names) -> (kind, module, class). Taiyi (IDEA-CCNL) Chinese SD uses
# BertModel; AltDiffusion (BAAI) uses diffusers' RobertaSeriesModelWithTransformation (XLM-R), which
# diffusers 0.42 keeps under pipelines.deprecated.alt_diffusion.
TEXT_ENCODER_CLASSES: dict[str, tuple[str, str, str]] = {
    "CLIPTextModel": ("clip", "transformers", "CLIPTextModel"),
    "CLIPTextModelWithProjection": ("clip", "transformers", "CLIPTextModelWithProjection"),
    "BertModel": ("bert", "transformers", "BertModel"),
    "RobertaSeriesModelWithTransformation": (
        "xlmr",
        "diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series",
        "RobertaSeriesModelWithTransformation",
    ),
}
SUPPORTED_TEXT = "SD 1.x, SD 2.x, SDXL, Taiyi (BERT) and AltDiffusion (XLM-R) pipelines"


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a pipeline folder: where it and its tokenizer are, and its class."""

    name: str  # pipeline attribute and folder: "text_encoder" / "text_encoder_2" (also the Embedding key)
    tokenizer_name: str  # "tokenizer" / "tokenizer_2"
    class_name: str
    kind: str  # "clip", "bert" or "xlmr"


@dataclass(frozen=True)
class PipelineLayout:
    """What a pipeline folder holds, as far as training cares (read from its JSON files only)."""

    family: str
    pipeline_class: str
    encoders: tuple[EncoderSlot, ...]
    prediction_type: str


@dataclass
class TextEncoderPart:
    """A loaded tokenizer and its frozen text encoder."""

    name: str  # "text_encoder" / "text_encoder_2": the pipeline attribute, folder and Embedding key
    tokenizer_name: str  # "tokenizer" / "tokenizer_2"
    tokenizer: Any
    text_encoder: Any
    kind: str  # "clip", "bert" or "xlmr"


@dataclass
class ModelParts:
    """What training needs from a pipeline. Frozen modules are in eval mode with no gradients."""

    source: str  # the local folder the parts came from (resolved snapshot for hub ids)
    family: str
    text_encoders: list[TextEncoderPart]  # one per text encoder, in the pipeline's order (SDXL: two)
    unet: Any
    vae: Any
    noise_scheduler: Any  # a DDPMScheduler built from the pipeline's scheduler config
    pipeline_class: str = "StableDiffusionPipeline"
    vae_scale_factor: int = 8  # pixels per latent pixel (SDXL's time ids are in pixels)

    @property
    def tokenizer(self) -> Any:
        """The first (for SD 1.x/2.x and Chinese models the only) tokenizer."""
        return self.text_encoders[0].tokenizer

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0].text_encoder

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)


def local_model_dir(name_or_path: str) -> Optional[Path]:
    """The checked local pipeline folder ``name_or_path`` names, or None for a hub id (``owner/name``).

    Reads JSON files only (no torch), so the CLI calls it before paying for torch's import.
    A name that is not a folder and cannot be a hub id is a folder that does not exist.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"model {name_or_path!r} is a file; give a diffusers pipeline folder "
                "(with model_index.json) or a hub id"
            )
        check_pipeline_dir(path)
        return path
    owner = name_or_path.split("/", 1)[0]
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")) or Path(owner).is_dir():
        raise UserError(
            f"model folder {name_or_path!r} does not exist; give a diffusers pipeline folder (make a tiny one with "
            "`textinv tiny DIR`) or a hub id such as 'runwayml/stable-diffusion-v1-5'"
        )
    return None


def resolve_model_dir(name_or_path: str, revision: Optional[str] = None) -> Path:
    """The local folder of a pipeline: the path itself, or a hub id's downloaded snapshot."""
    local = local_model_dir(name_or_path)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(name_or_path, revision=revision)
    except Exception as error:  # network, auth, missing repo: all the user's to fix
        raise UserError(
            f"could not get model {name_or_path!r} from the hub ({type(error).__name__}), and there is no folder of "
            "that name here; check the id, your network and HF_TOKEN, or pass a local pipeline folder"
        ) from None
    path = Path(snapshot)
    check_pipeline_dir(path)
    return path


def check_pipeline_dir(path: Path) -> dict[str, Any]:
    """Read model_index.json and check it is a kind of pipeline textinv trains, with every part there."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(
            f"model folder {str(path)!r} has no model_index.json, so it is not a diffusers pipeline; "
            "convert single-file checkpoints with diffusers first, or make one with `textinv tiny DIR`"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{str(index_file)!r} is not valid JSON ({error}); the model folder is damaged") from None
    _check_supported_components(path, index)
    declared = [name for pair in ENCODER_SLOTS for name in pair if _declared(index, name)]
    missing = [part for part in REQUIRED_PARTS + tuple(declared) if not (path / part).is_dir()]
    missing = list(dict.fromkeys(missing))
    if missing:
        raise UserError(
            f"model folder {str(path)!r} is missing {', '.join(missing)}; "
            "textinv needs a complete Stable Diffusion pipeline folder"
        )
    return index


def _declared(index: dict[str, Any], name: str) -> bool:
    spec = index.get(name)
    return isinstance(spec, list) and len(spec) == 2 and spec[1] is not None


def _components_text(index: dict[str, Any]) -> str:
    """``unet: UNet2DConditionModel, transformer: ...``: what a model_index.json declares."""
    found = [
        f"{name}: {spec[1]}"
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and spec[-1]
    ]
    return ", ".join(found) or "no components"


def _check_supported_components(path: Path, index: dict[str, Any]) -> None:
    """A pipeline without a UNet or without a first text encoder is another kind of model (SD3, Flux, a refiner...)."""
    pipeline_class = index.get("_class_name", "an unnamed pipeline")
    if not _declared(index, "unet"):
        raise UserError(
            f"model {str(path)!r} is a {pipeline_class} with no UNet ({_components_text(index)}); "
            f"textinv trains {SUPPORTED_TEXT}"
        )
    if not _declared(index, "text_encoder") or not _declared(index, "tokenizer"):
        raise UserError(
            f"model {str(path)!r} is a {pipeline_class} without a first text encoder and tokenizer "
            f"({_components_text(index)}; an SDXL refiner?); textinv trains {SUPPORTED_TEXT}"
        )


def inspect_pipeline(path: Path) -> PipelineLayout:
    """Name the model family from what the folder holds: model_index.json, the text encoders'
    classes and widths, the UNet's conditioning inputs and the scheduler's prediction type."""
    index = check_pipeline_dir(path)
    pipeline_class = str(index.get("_class_name", ""))
    unet_config = _read_json(path / "unet" / "config.json")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    prediction_type = str(scheduler_config.get("prediction_type", "epsilon"))
    encoders = []
    encoder_configs = []
    for encoder_name, tokenizer_name in ENCODER_SLOTS:
        if not _declared(index, encoder_name):
            continue
        config = _read_json(path / encoder_name / "config.json")
        class_name = (config.get("architectures") or [index[encoder_name][1]])[0]
        if class_name not in TEXT_ENCODER_CLASSES:
            raise UserError(
                f"model {str(path)!r} ({pipeline_class}) has a {class_name} {encoder_name}; textinv trains with "
                "CLIP (SD 1.x/2.x/SDXL), BertModel (Taiyi) or RobertaSeriesModelWithTransformation (AltDiffusion) text encoders"
            )
        encoders.append(EncoderSlot(encoder_name, tokenizer_name, class_name, TEXT_ENCODER_CLASSES[class_name][0]))
        encoder_configs.append(config)
    _check_unet(path, pipeline_class, unet_config, len(encoders))
    if len(encoders) == 2:
        if any(slot.kind != "clip" for slot in encoders):
            found = " + ".join(slot.class_name for slot in encoders)
            raise UserError(
                f"model {str(path)!r} ({pipeline_class}) has two text encoders ({found}); "
                "textinv trains two-encoder pipelines only as SDXL (CLIPTextModel + CLIPTextModelWithProjection)"
            )
        family = "sdxl"
    else:
        kind, config = encoders[0].kind, encoder_configs[0]
        if kind == "bert":
            family = "zh-bert"
        elif kind == "xlmr":
            family = "zh-xlmr"
        elif prediction_type == "v_prediction":
            family = "sd2-v"
        # OpenCLIP ViT-H (SD 2.x) is 1024 wide and uses gelu; OpenAI CLIP ViT-L (SD 1.x) quick_gelu.
        elif int(config.get("hidden_size", 0)) == 1024 or config.get("hidden_act") == "gelu":
            family = "sd2"
        else:
            family = "sd1"
    return PipelineLayout(family, pipeline_class, tuple(encoders), prediction_type)


def _check_unet(path: Path, pipeline_class: str, unet_config: dict[str, Any], num_encoders: int) -> None:
    """The UNet must be a text-to-image one whose extra inputs training can supply."""
    where = f"model {str(path)!r} ({pipeline_class})"
    unet_class = unet_config.get("_class_name", "UNet2DConditionModel")
    if unet_class != "UNet2DConditionModel":
        raise UserError(f"{where} has a {unet_class} denoiser; textinv trains {SUPPORTED_TEXT} (UNet2DConditionModel)")
    in_channels = int(unet_config.get("in_channels", 4))
    if in_channels != 4:
        raise UserError(
            f"{where} has a UNet with {in_channels} input channels (an inpainting, depth or upscaling model); "
            "textinv trains text-to-image UNets (4 latent channels)"
        )
    extra = unet_config.get("addition_embed_type")
    if unet_config.get("class_embed_type") is not None or extra not in (None, "text_time"):
        what = unet_config.get("class_embed_type") or extra
        raise UserError(f"{where} has a UNet conditioned on {what!r} inputs; textinv trains {SUPPORTED_TEXT}")
    if (extra == "text_time") != (num_encoders == 2):
        raise UserError(
            f"{where} has {num_encoders} text encoder(s) and a UNet with addition_embed_type={extra!r}; "
            "textinv knows this only as SDXL (two encoders, 'text_time')"
        )


def detect_family(path: Path) -> str:
    """The model family of a pipeline folder: one of :data:`FAMILIES` (UserError for the rest)."""
    return inspect_pipeline(path).family


def load_model_parts(
    name_or_path: str,
    revision: Optional[str] = None,
    tokenizer_name: Optional[str] = None,
    check_tokenizer: Optional[Callable[[Any], None]] = None,
    dtype: Any = None,
    device: Any = None,
) -> ModelParts:
    """Load tokenizer(s), text encoder(s), UNet, VAE and a training noise scheduler, all frozen.

    ``check_tokenizer`` sees each tokenizer as soon as it loads (a refused placeholder costs no UNet load).
    The text encoder(s) and UNet load directly in ``dtype`` (None: as diffusers/transformers default) and
    straight onto ``device`` (None: the CPU): never an fp32 copy first, nor one on the host for a GPU run.
    The VAE loads in float32 (it encodes each view once, and SDXL's overflows in fp16)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    placed: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if device is not None:
        placed["device_map"] = torch.device(device)
    path = resolve_model_dir(name_or_path, revision)
    layout = inspect_pipeline(path)
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    with quiet_loading():
        try:
            text_encoders = []
            for position, slot in enumerate(layout.encoders):
                # --tokenizer_name replaces the first tokenizer only (as in ppdiffusers' script).
                tokenizer_source = tokenizer_name if tokenizer_name and position == 0 else path / slot.tokenizer_name
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, revision=revision)
                if check_tokenizer is not None:
                    check_tokenizer(tokenizer)
                encoder = _text_encoder_class(slot.class_name).from_pretrained(path / slot.name, **placed)
                text_encoders.append(TextEncoderPart(slot.name, slot.tokenizer_name, tokenizer, encoder, slot.kind))
            unet = UNet2DConditionModel.from_pretrained(path / "unet", **placed)
            vae = AutoencoderKL.from_pretrained(path / "vae", **{**placed, "dtype": torch.float32})
            # Training always adds noise the DDPM way, whatever sampler the pipeline ships with;
            # from_config keeps the betas and prediction_type of the model's own scheduler.
            noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        except UserError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"could not load the pipeline in {str(path)!r}: {first_line(error)}") from None
    for module in (*(part.text_encoder for part in text_encoders), unet, vae):
        module.requires_grad_(False)
        module.eval()
    logger.info(
        "loaded %s pipeline (%s) from %s (prediction_type=%s)",
        layout.family,
        layout.pipeline_class,
        path,
        noise_scheduler.config.prediction_type,
    )
    return ModelParts(
        source=str(path),
        family=layout.family,
        text_encoders=text_encoders,
        unet=unet,
        vae=vae,
        noise_scheduler=noise_scheduler,
        pipeline_class=layout.pipeline_class,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    )


def load_pipeline_folder(path: Path, dtype: Any = None) -> Any:
    """The folder's diffusers pipeline, of the class model_index.json names.

    ``DiffusionPipeline.from_pretrained`` does it, except where diffusers cannot resolve a text
    encoder class from model_index.json: diffusers 0.42 keeps AltDiffusion's
    RobertaSeriesModelWithTransformation under ``pipelines.deprecated``, where neither spelling
    AltDiffusion folders use ("diffusers", "alt_diffusion") finds it, and refuses it even when passed
    in. Such pipelines are assembled here from their parts, each loaded by its own class.
    """
    import diffusers

    index = _read_json(path / "model_index.json")
    hand_loaded = [
        name
        for name, _ in ENCODER_SLOTS
        if _declared(index, name)
        and TEXT_ENCODER_CLASSES.get(index[name][1], ("", "transformers"))[1] != "transformers"
    ]
    if not hand_loaded:
        with quiet_loading():
            return diffusers.DiffusionPipeline.from_pretrained(path, dtype=dtype)
    components: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list):
            components[name] = spec  # a registered setting such as requires_safety_checker
            continue
        library, class_name = spec
        if class_name is None:
            components[name] = None
            continue
        with quiet_loading():
            component = _component_class(library, class_name).from_pretrained(path / name)
        if dtype is not None and hasattr(component, "parameters"):
            component = component.to(dtype)
        components[name] = component
    logger.debug("assembled %s from its parts (%s loaded by textinv)", index["_class_name"], ", ".join(hand_loaded))
    return getattr(diffusers, index["_class_name"])(**components)


def pipeline_from_parts(parts: ModelParts, vae: Any, scheduler: Any, unet: Any = None) -> Any:
    """A pipeline of the base model's class (SD, SDXL, AltDiffusion...) over modules already in memory:
    training's frozen text encoder(s) and UNet (or ``unet``), with ``vae`` and ``scheduler``; no safety checker."""
    import inspect

    import diffusers

    with quiet_loading():  # importing a pipeline module logs transformers' image-processor notices
        pipeline_class = getattr(diffusers, parts.pipeline_class, None) or diffusers.StableDiffusionPipeline
    components: dict[str, Any] = {"vae": vae, "unet": parts.unet if unet is None else unet, "scheduler": scheduler}
    for part in parts.text_encoders:
        components[part.name] = part.text_encoder
        components[part.tokenizer_name] = part.tokenizer
    accepted = inspect.signature(pipeline_class.__init__).parameters
    optional = {
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
        "add_watermarker": False,  # SDXL: invisible-watermark is an optional package
    }
    components.update({name: value for name, value in optional.items() if name in accepted})
    return pipeline_class(**components)


def _component_class(library: str, class_name: str) -> Any:
    import importlib

    if class_name in TEXT_ENCODER_CLASSES:
        return _text_encoder_class(class_name)
    module = importlib.import_module("transformers" if library == "transformers" else "diffusers")
    found = getattr(module, class_name, None)
    if found is None and library != "transformers":
        # Pipeline-specific parts (e.g. ["stable_diffusion", "StableDiffusionSafetyChecker"]).
        found = getattr(getattr(importlib.import_module("diffusers.pipelines"), library, None), class_name, None)
    if found is None:
        raise UserError(
            f"cannot find the class {library}.{class_name} the model folder names; update diffusers/transformers"
        )
    return found


def _text_encoder_class(class_name: str) -> Any:
    import importlib

    _, module_name, attribute = TEXT_ENCODER_CLASSES[class_name]
    return getattr(importlib.import_module(module_name), attribute)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} is missing; the model folder is incomplete") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{str(path)!r} is not valid JSON ({error}); the model folder is damaged") from None

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
from textinv.errors import printable
from textinv.models.families import SUPPORTED_TEXT, TEXT_ENCODER_CLASSES, FolderLayout, declared, detect
from textinv.models.families.base import SINGLE, EncoderRole, ModelFamily
from textinv.models.quiet import quiet_loading

logger = logging.getLogger(__name__)

# A diffusion model's hub id is "owner/name"; anything else that does not exist locally is a mistyped folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
REQUIRED_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler")


# Parts a pipeline may declare that training then needs: text encoders, tokenizers, the denoiser.
ENCODER_AND_DENOISER_SLOTS = (
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
    "unet",
    "transformer",
)


@dataclass
class TextEncoderPart:
    """A loaded tokenizer and its frozen text encoder."""

    name: str  # "text_encoder" / "text_encoder_2" / "text_encoder_3": the pipeline attribute and folder
    tokenizer_name: str  # "tokenizer" / "tokenizer_2" / "tokenizer_3"
    tokenizer: Any
    text_encoder: Any
    kind: str  # "clip", "t5", "bert" or "xlmr"
    spec: EncoderRole = None  # type: ignore[assignment]  # what the family says of it (None: a single encoder)
    max_length: Optional[int] = None  # tokens per prompt, as the family's pipeline pads them

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = EncoderRole(SINGLE, self.name, self.tokenizer_name, kind=self.kind)

    @property
    def role(self) -> str:
        """The family's name for it, also its key in embedding files: text_encoder; clip_l, clip_g, t5xxl."""
        return self.spec.role


@dataclass
class ModelParts:
    """What training needs from a pipeline. Frozen modules are in eval mode with no gradients."""

    source: str  # the local folder the parts came from (resolved snapshot for hub ids)
    family: ModelFamily
    text_encoders: list[TextEncoderPart]  # one per text encoder, in the pipeline's order (SDXL: two, SD3: three)
    denoiser: Any  # the UNet, or SD3's / Flux's transformer
    vae: Any
    noise_scheduler: Any  # DDPMScheduler (or FlowMatchEulerDiscreteScheduler) from the pipeline's scheduler config
    pipeline_class: str = "StableDiffusionPipeline"
    vae_scale_factor: int = 8  # pixels per latent pixel (SDXL's time ids are in pixels)

    @property
    def unet(self) -> Any:
        """The denoiser (a UNet for SD 1.x/2.x/XL; the name older code and benches use)."""
        return self.denoiser

    @unet.setter
    def unet(self, module: Any) -> None:
        self.denoiser = module

    def encoder_part(self, role: str) -> TextEncoderPart:
        for part in self.text_encoders:
            if part.role == role:
                return part
        raise KeyError(role)

    @property
    def tokenizer(self) -> Any:
        """The first (for SD 1.x/2.x and Chinese models the only) tokenizer."""
        return self.text_encoders[0].tokenizer

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0].text_encoder

    @property
    def prediction_type(self) -> str:
        """epsilon / v_prediction (the DDPM families), or flow_matching (SD3, Flux)."""
        if self.family.objective == "flow":
            return "flow_matching"
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
    index = _read_json(index_file)
    _check_supported_components(path, index)
    declared_parts = [name for name in ENCODER_AND_DENOISER_SLOTS if declared(index, name)]
    missing = [part for part in REQUIRED_PARTS + tuple(declared_parts) if not (path / part).is_dir()]
    missing = list(dict.fromkeys(missing))
    if missing:
        raise UserError(
            f"model folder {str(path)!r} is missing {', '.join(missing)}; "
            "textinv needs a complete diffusion pipeline folder"
        )
    return index


def _components_text(index: dict[str, Any]) -> str:
    """``unet: UNet2DConditionModel, transformer: ...``: what a model_index.json declares."""
    found = [
        printable(f"{name}: {spec[1]}")
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[-1]
    ]
    return ", ".join(found) or "no components"


def _check_supported_components(path: Path, index: dict[str, Any]) -> None:
    """A pipeline without a denoiser or without a first text encoder is another kind of model (a refiner, a VAE...)."""
    pipeline_class = printable(index.get("_class_name", "nameless pipeline"))
    if not declared(index, "unet") and not declared(index, "transformer"):
        raise UserError(
            f"model {str(path)!r} is a {pipeline_class} with no UNet or transformer ({_components_text(index)}); "
            f"textinv trains {SUPPORTED_TEXT}"
        )
    if not declared(index, "text_encoder") or not declared(index, "tokenizer"):
        raise UserError(
            f"model {str(path)!r} is a {pipeline_class} without a first text encoder and tokenizer "
            f"({_components_text(index)}; an SDXL refiner?); textinv trains {SUPPORTED_TEXT}"
        )


def inspect_pipeline(path: Path) -> FolderLayout:
    """The folder's family, pipeline class, text encoder classes and prediction type (its JSON files only)."""
    return detect(path, check_pipeline_dir(path), _read_json)


def detect_family(path: Path) -> ModelFamily:
    """The model family of a pipeline folder (UserError for the kinds textinv does not train)."""
    return inspect_pipeline(path).family


def load_model_parts(
    name_or_path: str,
    revision: Optional[str] = None,
    tokenizer_name: Optional[str] = None,
    check_tokenizer: Optional[Callable[[Any], None]] = None,
    dtype: Any = None,
    device: Any = None,
) -> ModelParts:
    """Load tokenizer(s), text encoder(s), the denoiser, the VAE and a training noise scheduler, all frozen.

    ``check_tokenizer`` sees each tokenizer as soon as it loads (a refused placeholder costs no denoiser load).
    The text encoder(s) and denoiser load directly in ``dtype`` (None: as diffusers/transformers default) and
    straight onto ``device`` (None: the CPU): never an fp32 copy first, nor one on the host for a GPU run.
    The VAE loads in float32 (it encodes each view once, and SDXL's overflows in fp16)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    placed: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if device is not None:
        placed["device_map"] = torch.device(device)
    path = resolve_model_dir(name_or_path, revision)
    layout = inspect_pipeline(path)
    family = layout.family
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    with quiet_loading():
        try:
            text_encoders = []
            for position, role in enumerate(family.encoders):
                # --tokenizer_name replaces the first tokenizer only (as in ppdiffusers' script).
                tokenizer_source = tokenizer_name if tokenizer_name and position == 0 else path / role.tokenizer_slot
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, revision=revision)
                if check_tokenizer is not None:
                    check_tokenizer(tokenizer)
                class_name = layout.encoder_classes[role.slot]
                encoder = _text_encoder_class(class_name).from_pretrained(path / role.slot, **placed)
                text_encoders.append(
                    TextEncoderPart(role.slot, role.tokenizer_slot, tokenizer, encoder, role.kind, role)
                )
            denoiser_class = getattr(diffusers, family.denoiser_class)
            denoiser = denoiser_class.from_pretrained(path / family.denoiser_slot, **placed)
            vae = AutoencoderKL.from_pretrained(path / "vae", **{**placed, "dtype": torch.float32})
            if family.objective == "flow":
                noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
            else:
                # Training always adds noise the DDPM way, whatever sampler the pipeline ships with;
                # from_config keeps the betas and prediction_type of the model's own scheduler.
                noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        except UserError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"could not load the pipeline in {str(path)!r}: {first_line(error)}") from None
    for part in text_encoders:
        part.max_length = family.max_length(part.spec, denoiser)
    for module in (*(part.text_encoder for part in text_encoders), denoiser, vae):
        module.requires_grad_(False)
        module.eval()
    parts = ModelParts(
        source=str(path),
        family=family,
        text_encoders=text_encoders,
        denoiser=denoiser,
        vae=vae,
        noise_scheduler=noise_scheduler,
        pipeline_class=layout.pipeline_class,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    )
    logger.info("loaded %s pipeline (%s) from %s (%s)", family.name, layout.pipeline_class, path, parts.prediction_type)
    return parts


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
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
        if declared(index, name) and TEXT_ENCODER_CLASSES.get(index[name][1], ("", "transformers"))[1] != "transformers"
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


def pipeline_from_parts(parts: ModelParts, vae: Any, scheduler: Any, denoiser: Any = None) -> Any:
    """A pipeline of the base model's class (SD, SDXL, SD3, Flux, AltDiffusion...) over modules already in memory:
    training's frozen text encoder(s) and denoiser (or ``denoiser``), with ``vae`` and ``scheduler``; no safety
    checker."""
    import inspect

    import diffusers

    with quiet_loading():  # importing a pipeline module logs transformers' image-processor notices
        pipeline_class = getattr(diffusers, parts.pipeline_class, None) or diffusers.StableDiffusionPipeline
    components: dict[str, Any] = {
        "vae": vae,
        parts.family.denoiser_slot: parts.denoiser if denoiser is None else denoiser,
        "scheduler": scheduler,
    }
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
    """A model folder's JSON file, which must hold an object (fuzzing found ``null`` and ``[[[...]]]`` configs)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} is missing; the model folder is incomplete") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{str(path)!r} is not valid JSON ({first_line(error)}); the model folder is damaged") from None
    except RecursionError:
        raise UserError(
            f"{str(path)!r} nests its JSON too deeply to be a config; the model folder is damaged"
        ) from None
    if not isinstance(document, dict):
        raise UserError(f"{str(path)!r} is not a JSON object; the model folder is damaged")
    return document

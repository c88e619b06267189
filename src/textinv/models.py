"""Loading a pipeline's parts from a local diffusers folder or a hub id, and naming its family."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from textinv.config import UserError

logger = logging.getLogger(__name__)

# A hub id looks like "name" or "org/name"; anything else that does not exist locally is a typo.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
REQUIRED_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@dataclass
class ModelParts:
    """What training needs from a pipeline. Frozen modules are in eval mode with no gradients."""

    source: str  # the local folder the parts came from (resolved snapshot for hub ids)
    family: str
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    noise_scheduler: Any  # a DDPMScheduler built from the pipeline's scheduler config

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)


def resolve_model_dir(name_or_path: str, revision: Optional[str] = None) -> Path:
    """The local folder of a pipeline: the path itself, or a hub id's downloaded snapshot."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"model {name_or_path!r} is a file; give a diffusers pipeline folder "
                "(with model_index.json) or a hub id"
            )
        check_pipeline_dir(path)
        return path
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise UserError(
            f"model {name_or_path!r} does not exist; give a diffusers pipeline folder or a hub id "
            "such as 'runwayml/stable-diffusion-v1-5' (make a tiny one with `textinv tiny DIR`)"
        )
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(name_or_path, revision=revision)
    except Exception as error:  # network, auth, missing repo: all the user's to fix
        raise UserError(
            f"could not get model {name_or_path!r} from the hub ({type(error).__name__}); "
            "check the id, your network and HF_TOKEN, or pass a local pipeline folder"
        ) from None
    path = Path(local)
    check_pipeline_dir(path)
    return path


def check_pipeline_dir(path: Path) -> dict[str, Any]:
    """Read model_index.json and check the parts training needs are there."""
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
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if missing:
        raise UserError(
            f"model folder {str(path)!r} is missing {', '.join(missing)}; "
            "textinv needs a complete Stable Diffusion pipeline folder"
        )
    return index


def detect_family(path: Path, text_encoder_config: dict[str, Any], scheduler_config: dict[str, Any]) -> str:
    """Name the model family from what the folder holds."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    pipeline_class = index.get("_class_name", "")
    encoder_class = (text_encoder_config.get("architectures") or [""])[0]
    if "text_encoder_2" in index or "XL" in pipeline_class:
        return "sdxl"
    if encoder_class not in ("CLIPTextModel", ""):
        raise UserError(
            f"model {str(path)!r} has a {encoder_class} text encoder ({pipeline_class}); "
            "textinv trains Stable Diffusion 1.x/2.x pipelines with a CLIP text encoder"
        )
    hidden = int(text_encoder_config.get("hidden_size", 0))
    if scheduler_config.get("prediction_type") == "v_prediction":
        return "sd2-v"
    return "sd2" if hidden == 1024 else "sd1"


def load_model_parts(
    name_or_path: str,
    revision: Optional[str] = None,
    tokenizer_name: Optional[str] = None,
) -> ModelParts:
    """Load tokenizer, text encoder, UNet, VAE and a training noise scheduler, all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = resolve_model_dir(name_or_path, revision)
    encoder_config = _read_json(path / "text_encoder" / "config.json")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    family = detect_family(path, encoder_config, scheduler_config)
    if family == "sdxl":
        raise UserError(f"model {str(path)!r} is an SDXL pipeline; SDXL training is not supported yet")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or path / "tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        vae = AutoencoderKL.from_pretrained(path / "vae")
        # Training always adds noise the DDPM way, whatever sampler the pipeline ships with;
        # from_config keeps the betas and prediction_type of the model's own scheduler.
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"could not load the pipeline in {str(path)!r}: {_first_line(error)}") from None
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False)
        module.eval()
    logger.info("loaded %s pipeline from %s (prediction_type=%s)", family, path, noise_scheduler.config.prediction_type)
    return ModelParts(
        source=str(path),
        family=family,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        noise_scheduler=noise_scheduler,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} is missing; the model folder is incomplete") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{str(path)!r} is not valid JSON ({error}); the model folder is damaged") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

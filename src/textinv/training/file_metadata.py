"""The header keys of a run's safetensors embedding files: ModelSpec's and textinv's (textinv.embeddings.modelspec
lists them and says why), from the run's config and its model's family.

``modelspec.date`` is when the vectors are saved (each snapshot has its own, as kohya's saves do), so two runs' files
differ byte for byte even when their vectors agree; compare the vectors (run.json's ``vectors_sha256_by_rank``, or the
tensors), or set SOURCE_DATE_EPOCH to get identical files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from textinv.embeddings.modelspec import textual_inversion_metadata

# Hub cache folders are named models--ORG--NAME/snapshots/REVISION.
_HUB_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots")


def run_file_metadata(config: Any, family: Any, token: Optional[str] = None) -> dict[str, str]:
    """The keys of the files of ``token`` (default: ``--placeholder_token``) trained as ``config`` (a TrainConfig)
    says on a ``family`` (ModelFamily) model, dated now."""
    return textual_inversion_metadata(
        family,
        token if token is not None else config.placeholder_token,
        base_model_name(config.pretrained_model_name_or_path, config.revision),
        config.image_width,
        config.image_height,
    )


def base_model_name(name_or_path: str, revision: Optional[str] = None) -> str:
    """The base model as a file may name it: a hub id as given (with ``@revision``); a folder in the hub's cache as its
    hub id; any other local folder by its name alone (kohya's ``ss_sd_model_name`` keeps the base name too): the path
    would tell the world how the trainer's disk is laid out."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return f"{name_or_path}@{revision}" if revision else name_or_path
    cached = _HUB_CACHE.search(str(path.resolve()))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    return path.resolve().name or str(name_or_path)

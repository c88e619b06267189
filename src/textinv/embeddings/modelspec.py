"""Stability AI's ModelSpec keys (and textinv's own) in the header of the safetensors embedding files textinv writes.

Sources: the spec, https://github.com/Stability-AI/ModelSpec (README: the ``modelspec.`` prefix; the MUST keys
``sai_model_spec``, ``architecture``, ``implementation``, ``title``; ``date`` in ISO-8601; image models'
``resolution`` as ``(width)x(height)`` and ``trigger_phrase``; adapters as ``<base architecture>/<adapter>``), and
kohya-ss/sd-scripts' library/sai_model_spec.py, whose textual-inversion trainers write the architecture IDs, the
implementations and the resolution this way. Nothing here is copied from either.

What a training run writes into every safetensors embedding file (final, ``--save_steps`` snapshots, the best file
of ``--eval_steps``, checkpoints), for example::

    modelspec.sai_model_spec    1.0.0                       the spec's published version (kohya's newer releases
                                                            write 1.0.1, a version the spec has not published)
    modelspec.architecture      stable-diffusion-v1/textual-inversion   the family's ID (ModelFamily)
    modelspec.implementation    https://github.com/Stability-AI/generative-models
    modelspec.title             <cat-toy>                   the token, what a model picker shows
    modelspec.trigger_phrase    <cat-toy>                   the token, what a prompt must hold
    modelspec.date              2025-01-31T12:00:00Z        when the vectors were saved (UTC; SOURCE_DATE_EPOCH,
                                                            the reproducible-builds variable, fixes it)
    modelspec.resolution        512x512                     the training size, width x height
    textinv_base_model          runwayml/stable-diffusion-v1-5   the base model's hub id, or a local folder's name
    step                        500                         the optimizer steps the vectors have had (the writer's)

Why ``textinv_`` and not kohya's ``ss_`` for the base model: kohya's textual-inversion files carry ModelSpec keys
only; its ``ss_`` keys are its LoRA trainer's, which tools read as the mark of a kohya LoRA. ``textinv_`` is the prefix
textinv's LoRA bundle already uses (``textinv_token``). The token is also the tensor key (diffusers) or ``name``.

Reading takes whatever string keys a file holds (none, for files from before this or from other tools): nothing
requires them, and ``textinv convert`` writes them again into a safetensors output.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any, Optional

SPEC_VERSION = "1.0.0"
ADAPTER = "textual-inversion"  # kohya's ADAPTER_TEXTUAL_INVERSION: "<base architecture>/textual-inversion"
PREFIX = "modelspec."
SPEC_KEY = "modelspec.sai_model_spec"
ARCHITECTURE_KEY = "modelspec.architecture"
IMPLEMENTATION_KEY = "modelspec.implementation"
TITLE_KEY = "modelspec.title"
TRIGGER_KEY = "modelspec.trigger_phrase"
DATE_KEY = "modelspec.date"
RESOLUTION_KEY = "modelspec.resolution"
BASE_MODEL_KEY = "textinv_base_model"
# The keys training writes, in the order inspect shows them (other keys follow, sorted).
WRITTEN_KEYS = (
    SPEC_KEY,
    ARCHITECTURE_KEY,
    IMPLEMENTATION_KEY,
    TITLE_KEY,
    TRIGGER_KEY,
    DATE_KEY,
    RESOLUTION_KEY,
    BASE_MODEL_KEY,
)
# What every safetensors writer makes from the Embedding itself (textinv.embeddings.write): a read file's values are
# not carried, so the writer's own win.
WRITER_KEYS = ("format", "name", "step")


def textual_inversion_metadata(
    family: Any, token: str, base_model: str, width: int, height: int, date: Optional[str] = None
) -> dict[str, str]:
    """The keys of an embedding of ``token`` trained on a ``family`` model (a ModelFamily: its ModelSpec
    architecture and implementation) named ``base_model``, at ``width`` x ``height`` pixels, saved at ``date``
    (default: now, :func:`file_date`)."""
    return {
        SPEC_KEY: SPEC_VERSION,
        ARCHITECTURE_KEY: f"{family.modelspec_architecture}/{ADAPTER}",
        IMPLEMENTATION_KEY: family.modelspec_implementation,
        TITLE_KEY: token,
        TRIGGER_KEY: token,
        DATE_KEY: date if date is not None else file_date(),
        RESOLUTION_KEY: f"{int(width)}x{int(height)}",
        BASE_MODEL_KEY: base_model,
    }


def file_date(now: Optional[datetime.datetime] = None) -> str:
    """``now`` (default: this second) in UTC as ISO-8601, ``2025-01-31T12:00:00Z``; with SOURCE_DATE_EPOCH set (seconds
    since 1970, https://reproducible-builds.org/specs/source-date-epoch/) that moment, so two identical runs write
    identical files."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if now is None and fixed.isdigit():
        now = datetime.datetime.fromtimestamp(int(fixed), datetime.timezone.utc)
    moment = (now or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc)
    return moment.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def carried(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The keys a read file's header holds that a written copy keeps: its string values but the writer's own."""
    return {
        str(key): value for key, value in metadata.items() if isinstance(value, str) and str(key) not in WRITER_KEYS
    }


def renamed(metadata: Mapping[str, str], old: str, new: str) -> dict[str, str]:
    """``metadata`` for the token renamed from ``old`` to ``new`` (``textinv convert --token``): the title and trigger
    phrase that were the old token become the new one; other values stay."""
    return {
        key: new if key in (TITLE_KEY, TRIGGER_KEY, "textinv_token") and value == old else value
        for key, value in metadata.items()
    }


def shown_items(metadata: Mapping[str, str]) -> list[tuple[str, str]]:
    """``metadata``'s items in the order ``textinv inspect`` prints them: training's keys first, the rest sorted."""
    known = [(key, metadata[key]) for key in WRITTEN_KEYS if key in metadata]
    return known + sorted((key, value) for key, value in metadata.items() if key not in WRITTEN_KEYS)

"""What watches a training run: progress, logs, validation images, model card, hub upload.

Each is a :class:`textinv.events.TrainObserver`; :func:`observers_from_config` builds the ones a
TrainConfig asks for, before the model loads, so a missing tracker package or hub token fails in a
second. The modules: ``progress``, ``logs``, ``validation``, ``model_card``, ``hub``.
"""

from __future__ import annotations

import logging

from textinv.config import TrainConfig
from textinv.events import TrainObserver

logger = logging.getLogger(__name__)


def observers_from_config(config: TrainConfig, show_progress: bool = True) -> list[TrainObserver]:
    """Progress (a bar or log lines; off with ``show_progress=False``), then what ``config`` asks for."""
    from textinv.observers.hub import HubPush
    from textinv.observers.logs import TrainingLogs
    from textinv.observers.model_card import ModelCard
    from textinv.observers.progress import Progress
    from textinv.observers.validation import Validation

    if not config.validation_prompt and (config.validation_steps or config.validation_epochs):
        logger.warning("--validation_steps/--validation_epochs without --validation_prompt: no validation images")
    observers: list[TrainObserver] = [Progress(show_progress)]
    # Logs before validation: a round's images go to trackers opened at the step before.
    logs = TrainingLogs(config) if config.report_to != "none" else None
    if logs is not None:
        observers.append(logs)
    # Always there: without prompts it still clears an overwritten run's validation images.
    observers.append(Validation(config, image_sink=logs.log_images if logs is not None else None))
    observers.append(ModelCard())
    if config.push_to_hub:
        observers.append(HubPush(config))  # last: uploads what the others wrote
    return observers

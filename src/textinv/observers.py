"""The training observers a TrainConfig asks for: logs, validation images, model card, hub upload.

Built before the model loads, so a missing tracker package or hub token fails in a second.
"""

from __future__ import annotations

import logging

from textinv.config import TrainConfig
from textinv.training import TrainObserver

logger = logging.getLogger(__name__)


def observers_from_config(config: TrainConfig) -> list[TrainObserver]:
    from textinv.hub import HubPush
    from textinv.logs import TrainingLogs
    from textinv.model_card import ModelCard
    from textinv.validation import Validation

    if not config.validation_prompt and (config.validation_steps or config.validation_epochs):
        logger.warning("--validation_steps/--validation_epochs without --validation_prompt: no validation images")
    observers: list[TrainObserver] = []
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

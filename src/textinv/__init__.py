"""textinv: Textual Inversion for Stable Diffusion — train a new word's embedding, then use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textinv.config import TrainConfig, UserError

__version__ = "0.1.0"
__all__ = ["TrainConfig", "UserError", "train", "load_embeddings", "generate", "build_tiny_pipeline"]


# The functions below import their modules on first call, so that `import textinv` (and
# `textinv --help`) do not pay for torch. The packages are `training` and `inference`, not `train`
# and `generate`, because a submodule named like a package attribute replaces it on import.


def train(
    config: TrainConfig, show_progress: bool = True, observers: Sequence[Any] = (), latent_cache: Any = None
) -> Any:
    """Learn a placeholder token from images, with the observers ``config`` asks for (progress,
    validation, logs, model card, hub) and any ``observers`` given; see :func:`textinv.training.train`."""
    from textinv.observers import observers_from_config
    from textinv.training import train as run_training

    config.validate()  # before building observers: they read the config
    watching = [*observers_from_config(config, show_progress), *observers]
    return run_training(config, observers=watching, latent_cache=latent_cache)


def generate(*args: Any, **kwargs: Any) -> Any:
    """Generate images with a model and embeddings; see :func:`textinv.inference.generation.generate`."""
    from textinv.inference.generation import generate as run_generation

    return run_generation(*args, **kwargs)


def load_embeddings(pipe: Any, path: Any, token: Any = None, replace: bool = False) -> list[str]:
    """Add an embedding file's token(s) to a pipeline; see :func:`textinv.embeddings.load_embeddings`."""
    from textinv.embeddings import load_embeddings as load

    return load(pipe, path, token=token, replace=replace)


def build_tiny_pipeline(*args: Any, **kwargs: Any) -> Any:
    """Write a tiny random-weight pipeline folder; see :func:`textinv.tiny.build_tiny_pipeline`."""
    from textinv.tiny import build_tiny_pipeline as build

    return build(*args, **kwargs)

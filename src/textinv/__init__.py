"""textinv: Textual Inversion for Stable Diffusion — train a new word's embedding, then use it."""

from __future__ import annotations

from typing import Any

from textinv.config import TrainConfig, UserError

__version__ = "0.1.0"
__all__ = ["TrainConfig", "UserError", "train", "load_embeddings", "generate", "build_tiny_pipeline"]


# The functions below import their modules on first call, so that `import textinv` (and
# `textinv --help`) do not pay for torch. The modules are training.py and generation.py, not
# train.py/generate.py, because a submodule named like a package attribute replaces it on import.


def train(config: TrainConfig, show_progress: bool = True) -> Any:
    """Learn a placeholder token from images; see :func:`textinv.training.train`."""
    from textinv.training import train as run_training

    return run_training(config, show_progress=show_progress)


def generate(*args: Any, **kwargs: Any) -> Any:
    """Generate images with a model and embeddings; see :func:`textinv.generation.generate`."""
    from textinv.generation import generate as run_generation

    return run_generation(*args, **kwargs)


def load_embeddings(pipe: Any, path: Any, token: Any = None, replace: bool = False) -> list[str]:
    """Add an embedding file's token(s) to a pipeline; see :func:`textinv.embeddings.load_embeddings`."""
    from textinv.embeddings import load_embeddings as load

    return load(pipe, path, token=token, replace=replace)


def build_tiny_pipeline(*args: Any, **kwargs: Any) -> Any:
    """Write a tiny random-weight pipeline folder; see :func:`textinv.tiny.build_tiny_pipeline`."""
    from textinv.tiny import build_tiny_pipeline as build

    return build(*args, **kwargs)

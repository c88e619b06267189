"""textinv: Textual Inversion for Stable Diffusion — train a new word's embedding, then use it."""

from __future__ import annotations

from typing import Any

from textinv.config import TrainConfig, UserError

__version__ = "0.1.0"
__all__ = ["TrainConfig", "UserError", "train", "load_embeddings", "generate", "build_tiny_pipeline"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import textinv` (and `textinv --help`) do not pay for torch.
    if name == "train":
        from textinv.train import train

        return train
    if name == "load_embeddings":
        from textinv.embeddings import load_embeddings

        return load_embeddings
    if name == "generate":
        from textinv.generate import generate

        return generate
    if name == "build_tiny_pipeline":
        from textinv.tiny import build_tiny_pipeline

        return build_tiny_pipeline
    raise AttributeError(f"module 'textinv' has no attribute {name!r}")

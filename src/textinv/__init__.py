"""textinv: Textual Inversion for Stable Diffusion — train a new word's embedding, then use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from textinv.config import TrainConfig, UserError

if TYPE_CHECKING:
    from textinv.data.latents import LatentCache
    from textinv.events import TrainObserver, TrainResult

__version__ = "0.1.0"
__all__ = ["TrainConfig", "UserError", "train", "load_embeddings", "generate", "build_tiny_pipeline"]


# train() imports its modules on first call, so that `import textinv` does not pay for torch. The packages are
# `training` and `inference`, not `train` and `generate`, because a submodule named like a package attribute
# replaces it on import.


def train(
    config: TrainConfig,
    show_progress: bool = True,
    observers: Sequence[TrainObserver] = (),
    latent_cache: Optional[LatentCache] = None,
) -> TrainResult:
    """Learn a placeholder token from images; write its embedding (and checkpoints) to ``config.output_dir``.

    The observers ``config`` asks for (validation images, logs, model card, hub upload) watch the run, then any
    ``observers`` given (:class:`textinv.events.TrainObserver`). ``latent_cache`` replaces the images of
    ``train_data_dir`` with ready-made latents (benchmarks that plant a concept use it).

    Progress, with ``show_progress=True`` (the default):

    - on a terminal (stderr is a TTY): a progress bar with the step, loss, learning rate and time left;
    - otherwise (a pipe, a file, a notebook): a line about every 5% of the run, e.g.
      ``step 40/200 loss 0.1234 lr 5.00e-03 0.052 s/step ETA 0:00:08``, logged by ``textinv.observers.progress``
      at INFO: when your program configures logging, that configuration decides where the lines go (and
      whether INFO shows); when nothing is configured, they are written to stderr.

    ``show_progress=False`` shows neither. Returns a :class:`textinv.events.TrainResult` (``.summary`` is
    the one-line report ``textinv train`` prints).
    """
    from textinv.observers import observers_from_config
    from textinv.training import train as run_training

    config.validate()  # before building observers: they read the config
    watching = [*observers_from_config(config, show_progress), *observers]
    return run_training(config, observers=watching, latent_cache=latent_cache)


# The pass-through functions are the implementing functions themselves, imported on first use (PEP 562), so that
# `import textinv` (and `textinv --help`) does not pay for torch, and help() and editors show their real signatures
# and docstrings with no copy to keep in step.
_LAZY = {
    "generate": ("textinv.inference.generation", "generate"),
    "load_embeddings": ("textinv.embeddings.load", "load_embeddings"),
    "build_tiny_pipeline": ("textinv.tiny", "build_tiny_pipeline"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'textinv' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

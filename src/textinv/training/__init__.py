"""Training: the recipe (setup -> loop -> finish) and what it needs that is its own.

- ``recipe``: :func:`train` and :class:`TrainingRecipe`
- ``builders``: latents, starting vectors, optimizer, LR schedule, the run's length
- ``loss``: timestep draws, the denoising loss and its weighting
- ``run_dir``: may output_dir be written, is a resume the same run, run.json
- ``checkpoints``: resumable checkpoints (vectors, optimizer, scheduler, RNG states)
- ``stopping``: signals and divergence
- ``held_out``: eval_loss on a fixed held-out set, the best vectors, stopping when converged
- ``export``: embedding files and the full pipeline
- ``memory``: the allocator setting the CLI applies
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainingRecipe", "train"]


def __getattr__(name: str) -> Any:
    """``train`` and ``TrainingRecipe`` on first use: importing a submodule (``textinv.training.held_out``, say)
    must not pay for the whole recipe."""
    if name in __all__:
        from textinv.training import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

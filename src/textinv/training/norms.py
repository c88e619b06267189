"""The size of the learned vectors against their encoder's words: the median norm of its vocabulary rows, and the
rule ``--preserve_embedding_norm`` / ``--max_embedding_norm`` apply after each optimizer step (issue 27).

OneTrainer's rule: every learned vector is rescaled to the median norm of its text encoder's vocabulary rows; with
``--max_embedding_norm X`` only vectors longer than X times that median are scaled down to it. Each encoder of a
multi-encoder model (SDXL, SD3, Flux) has its own median (T5's rows are tens of times CLIP's).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

# A vector within this relative distance of its target norm is left as it is: a frozen vector (pivotal tuning past
# --embedding_train_frac) keeps its bits instead of being rescaled by a rounding error at every step.
NORM_TOLERANCE = 1e-6

# Each trained module's medians, measured once (its encoders are frozen).
_MEDIANS: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


def median_row_norm(trainable: Any, part: Any) -> torch.Tensor:
    """The median norm (a float32 scalar tensor) of ``part``'s vocabulary rows: its input embeddings up to the
    placeholder's first id where the word was added to it, every row of its tokenizer's vocabulary elsewhere."""
    known = trainable.tokens[part.name].first_id if part.name in trainable.tokens else len(part.tokenizer)
    known = getattr(trainable, "vocabulary_rows", {}).get(part.name, known)  # several words: before the first
    rows = part.text_encoder.get_input_embeddings().weight[:known].detach().float()
    return rows.norm(dim=1).median()


def vocabulary_medians(trainable: Any) -> dict[str, float]:
    """The median vocabulary-row norm of every trained encoder, by slot (the keys of ``vectors_by_encoder``)."""
    medians = _MEDIANS.get(trainable)
    if medians is None:
        parts = {part.name: part for part in trainable.parts.text_encoders}
        medians = {slot: float(median_row_norm(trainable, parts[slot])) for slot in trainable.vectors_by_encoder()}
        _MEDIANS[trainable] = medians
    return medians


@torch.no_grad()
def apply_norm_rule(settings: Any, trainable: Any) -> None:
    """Rescale each learned vector as ``settings`` (``TrainConfig.embedding_norm_settings``) says: ``preserve``, every
    vector to its encoder's median vocabulary norm; ``max``, vectors above ``multiple`` x that median down to it."""
    if settings is None:
        return
    for word in getattr(trainable, "each", lambda: [trainable])():  # --concepts: each word, its encoders' medians
        _apply_to_word(settings, word)


def _apply_to_word(settings: Any, trainable: Any) -> None:
    medians = vocabulary_medians(trainable)
    for slot, vectors in trainable.vectors_by_encoder().items():
        target = settings["multiple"] * medians[slot]
        norms = vectors.norm(dim=1, keepdim=True)
        factor = torch.where(norms > 0, target / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))
        if settings["rule"] == "max":
            factor = factor.clamp(max=1.0)
        factor = torch.where((factor - 1).abs() > NORM_TOLERANCE, factor, torch.ones_like(factor))
        vectors.mul_(factor)

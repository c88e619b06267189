"""Loading an embedding file's token(s) into a diffusers pipeline's tokenizer(s) and text encoder(s).

Which encoder gets which vectors is the pipeline's family's answer (:mod:`textinv.models.families`): each family
declares its encoders' roles (the keys of an :class:`Embedding`'s vectors) and the pipeline slots that hold them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.embeddings.model import TEXT_ENCODER, Embedding, _dims_text, roles_text
from textinv.embeddings.read import read_embeddings
from textinv.errors import UserError
from textinv.models.tokens import add_placeholder_token, token_names

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Target:
    """One text encoder of a pipeline, by role."""

    role: str
    slot: str
    tokenizer: Any
    encoder: Any

    @property
    def dim(self) -> int:
        return int(self.encoder.get_input_embeddings().weight.shape[1])


def _pipeline_family(pipe: Any) -> Any:
    """The family whose ``pipeline_class`` is the pipeline's class (or a base class of it), else None.

    Several single-encoder families share StableDiffusionPipeline; they all keep their one encoder (role
    ``text_encoder``) in the same slots, so the first match serves."""
    from textinv.models.families import FAMILIES

    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if family.pipeline_class == cls.__name__:
                return family
    return None


def _pipeline_targets(pipe: Any) -> tuple[str, list[_Target]]:
    """(what to call the pipeline in messages, its text encoders that are loaded, with their tokenizers)."""
    family = _pipeline_family(pipe)
    if family is None:  # a pipeline class no family names: its one text encoder, if it has it
        slots = [(TEXT_ENCODER, "text_encoder", "tokenizer")]
        title = type(pipe).__name__
    else:
        slots = [(encoder.role, encoder.slot, encoder.tokenizer_slot) for encoder in family.encoders]
        title = f"{family.title} pipeline"
    targets = []
    for role, slot, tokenizer_slot in slots:
        encoder, tokenizer = getattr(pipe, slot, None), getattr(pipe, tokenizer_slot, None)
        if encoder is not None and tokenizer is not None:
            targets.append(_Target(role, slot, tokenizer, encoder))
    if not targets:
        raise UserError(f"this {title} has no text encoder with a tokenizer to load embeddings into")
    return title, targets


def _check_fits(embedding: Embedding, title: str, targets: list[_Target], path: Path | str) -> list[_Target]:
    """The targets that get vectors from ``embedding``: one per role it holds (a subset of a multi-encoder
    pipeline's is fine). UserError if it holds a role the pipeline lacks, or a width that differs."""
    pipe_dims = {target.role: target.dim for target in targets}
    emb_dims = embedding.dims()
    where = f"embedding {embedding.token!r} in {str(path)!r}"
    lacking = [role for role in emb_dims if role not in pipe_dims]
    if lacking:
        raise UserError(
            f"{where} has vectors for {len(emb_dims)} text encoder(s) ({roles_text(emb_dims)}, dim "
            f"{_dims_text(emb_dims)}) but the {title} has {len(pipe_dims)} ({roles_text(pipe_dims)}, dim "
            f"{_dims_text(pipe_dims)}) and no {lacking[0]}; it was made for another model family"
        )
    if any(dim != pipe_dims[role] for role, dim in emb_dims.items()):
        fitting = {role: pipe_dims[role] for role in emb_dims}
        raise UserError(
            f"{where} has dim {_dims_text(emb_dims)} but the {title}'s text encoders have dim "
            f"{_dims_text(fitting)}; it was made for another model family"
        )
    return [target for target in targets if target.role in emb_dims]


def _present_names(tokenizer: Any, token: str, num_vectors: int) -> list[str]:
    vocab = tokenizer.get_vocab()
    # One name past the end too: a token already there with more vectors must not be half-replaced.
    return [name for name in token_names(token, num_vectors + 1) if name in vocab]


def _loaded_tokens(tokenizer: Any) -> set[str]:
    """Tokens added to the tokenizer after its vocabulary was made (special tokens excepted)."""
    return set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)


def _plan(embedding: Embedding, targets: list[_Target], path: Path | str, replace: bool) -> dict[str, bool]:
    """{role: replace its rows (else add the token)}, after refusing what loading must not do."""
    counts = embedding.counts()
    present = {t.role: _present_names(t.tokenizer, embedding.token, counts[t.role]) for t in targets}
    for target in targets:
        loaded = _loaded_tokens(target.tokenizer)
        words = [entry for entry in present[target.role] if entry not in loaded]
        if words:
            # Replacing it would change the meaning of that word in every prompt.
            raise UserError(
                f"token {embedding.token!r} (from {str(path)!r}) is a word of the model's own vocabulary "
                f"({words[0]!r}); load it under another name, e.g. --token '<{embedding.token.strip('<>')}>'"
            )
    if any(present.values()):
        if not replace:
            raise UserError(
                f"token {embedding.token!r} (from {str(path)!r}) is already in the pipeline; pass --replace to "
                "overwrite it or --token NAME to load it under another name"
            )
        for role, found in present.items():
            if found and found != token_names(embedding.token, counts[role]):
                raise UserError(
                    f"token {embedding.token!r} is in the pipeline's {role} with a different number of vectors than "
                    f"the {counts[role]} in {str(path)!r}; cannot replace it, load it under another --token"
                )
    return {role: bool(found) for role, found in present.items()}


def load_embeddings(
    pipe: Any,
    path: str | Path,
    token: Optional[str] = None,
    replace: bool = False,
) -> list[str]:
    """Add the token(s) of an embedding file (any format) to a pipeline's tokenizer(s) and text encoder(s).

    Each role's vectors go to the encoder the pipeline's family keeps that role in (SDXL's clip_g in
    ``text_encoder_2``, Flux's t5xxl in ``text_encoder_2``, SD3's in ``text_encoder_3``), each with its own number of
    vectors (``token``, ``token_1``...); a file holding some of a multi-encoder family's roles leaves the other
    tokenizers untouched. ``token`` renames the (single) token in the file; a token the pipeline already has is
    replaced only with ``replace=True``. Every check runs before the pipeline changes. Returns the tokens loaded.
    """
    embeddings = read_embeddings(path)
    if token is not None:
        if len(embeddings) != 1:
            raise UserError(f"--token renames one token, but {str(path)!r} holds {len(embeddings)}")
        embeddings[0].token = token
    title, targets = _pipeline_targets(pipe)
    plans = []
    for embedding in embeddings:
        fitting = _check_fits(embedding, title, targets, path)
        plans.append((embedding, fitting, _plan(embedding, fitting, path, replace)))
    added = []
    for embedding, fitting, replacing in plans:
        for target in fitting:
            vectors = embedding.vectors[target.role]
            if replacing[target.role]:
                _replace_rows(target.tokenizer, target.encoder, embedding.token, vectors)
            else:
                add_placeholder_token(target.tokenizer, target.encoder, embedding.token, vectors)
        added.append(embedding.token)
        counts = ", ".join(f"{role} {count}" for role, count in embedding.counts().items())
        logger.info("loaded %s (%s vector(s)) from %s", embedding.token, counts, path)
    return added


def _replace_rows(tokenizer: Any, text_encoder: Any, token: str, vectors: torch.Tensor) -> None:
    ids = tokenizer.convert_tokens_to_ids(token_names(token, vectors.shape[0]))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for row, vector in zip(ids, vectors):
            weight[row] = vector.to(weight)

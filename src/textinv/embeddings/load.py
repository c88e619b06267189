"""Loading an embedding file's token(s) into a diffusers pipeline's tokenizer(s) and text encoder(s)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import UserError
from textinv.embeddings.model import TEXT_ENCODER, TEXT_ENCODER_2, Embedding, _dims_text
from textinv.embeddings.read import read_embeddings
from textinv.models.tokens import add_placeholder_token, token_names

logger = logging.getLogger(__name__)


def _pipeline_encoders(pipe: Any) -> list[tuple[str, Any, Any]]:
    """(encoder attribute, tokenizer, text encoder) for each text encoder the pipeline has."""
    pairs = []
    for encoder_name, tokenizer_name in ((TEXT_ENCODER, "tokenizer"), (TEXT_ENCODER_2, "tokenizer_2")):
        encoder = getattr(pipe, encoder_name, None)
        tokenizer = getattr(pipe, tokenizer_name, None)
        if encoder is not None and tokenizer is not None:
            pairs.append((encoder_name, tokenizer, encoder))
    if not pairs:
        raise UserError("this pipeline has no text encoder with a tokenizer to load embeddings into")
    return pairs


def _check_fits(embedding: Embedding, pairs: list[tuple[str, Any, Any]], path: Path | str) -> None:
    pipe_dims = {name: int(encoder.get_input_embeddings().weight.shape[1]) for name, _, encoder in pairs}
    emb_dims = embedding.dims()
    where = f"embedding {embedding.token!r} in {str(path)!r}"
    if set(emb_dims) != set(pipe_dims):
        raise UserError(
            f"{where} has vectors for {len(emb_dims)} text encoder(s) (dim {_dims_text(emb_dims)}) but the pipeline "
            f"has {len(pipe_dims)} (dim {_dims_text(pipe_dims)}); it was made for another model family"
        )
    for name, dim in emb_dims.items():
        if dim != pipe_dims[name]:
            raise UserError(
                f"{where} has dim {_dims_text(emb_dims)} but the pipeline's text encoders have dim "
                f"{_dims_text(pipe_dims)}; it was made for another model family"
            )


def _present_names(tokenizer: Any, token: str, num_vectors: int) -> list[str]:
    vocab = tokenizer.get_vocab()
    # One name past the end too: a token already there with more vectors must not be half-replaced.
    return [name for name in token_names(token, num_vectors + 1) if name in vocab]


def _loaded_tokens(tokenizer: Any) -> set[str]:
    """Tokens added to the tokenizer after its vocabulary was made (special tokens excepted)."""
    return set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)


def load_embeddings(
    pipe: Any,
    path: str | Path,
    token: Optional[str] = None,
    replace: bool = False,
) -> list[str]:
    """Add the token(s) of an embedding file (any format) to a pipeline's tokenizer(s) and text encoder(s).

    ``token`` renames the (single) token in the file; a token the pipeline already has is replaced
    only with ``replace=True``. A two-encoder pipeline (SDXL) gets both sets of vectors. Every check
    runs before the pipeline changes. Returns the tokens loaded.
    """
    embeddings = read_embeddings(path)
    if token is not None:
        if len(embeddings) != 1:
            raise UserError(f"--token renames one token, but {str(path)!r} holds {len(embeddings)}")
        embeddings[0].token = token
    pairs = _pipeline_encoders(pipe)
    replacing: dict[str, bool] = {}
    for embedding in embeddings:
        _check_fits(embedding, pairs, path)
        wanted = token_names(embedding.token, embedding.num_vectors)
        present = {name: _present_names(tok, embedding.token, embedding.num_vectors) for name, tok, _ in pairs}
        for name, tokenizer, _ in pairs:
            loaded = _loaded_tokens(tokenizer)
            words = [entry for entry in present[name] if entry not in loaded]
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
            if any(found != wanted for found in present.values()):
                raise UserError(
                    f"token {embedding.token!r} is in the pipeline with a different number of vectors than the "
                    f"{embedding.num_vectors} in {str(path)!r}; cannot replace it, load it under another --token"
                )
        replacing[embedding.token] = any(present.values())
    added = []
    for embedding in embeddings:
        for name, tokenizer, encoder in pairs:
            vectors = embedding.vectors[name]
            if replacing[embedding.token]:
                _replace_rows(tokenizer, encoder, embedding.token, vectors)
            else:
                add_placeholder_token(tokenizer, encoder, embedding.token, vectors)
        added.append(embedding.token)
        logger.info("loaded %s (%d vector(s)) from %s", embedding.token, embedding.num_vectors, path)
    return added


def _replace_rows(tokenizer: Any, text_encoder: Any, token: str, vectors: torch.Tensor) -> None:
    ids = tokenizer.convert_tokens_to_ids(token_names(token, vectors.shape[0]))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for row, vector in zip(ids, vectors):
            weight[row] = vector.to(weight)

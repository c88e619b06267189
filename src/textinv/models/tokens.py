"""Placeholder tokens: adding them to a tokenizer/encoder, their initial vectors, and the
trainable tensor that stands in for their rows while training.

The trainable state is the placeholder vectors alone (shape ``[num_vectors, dim]``). They reach
the text encoder through a forward hook on its input-embedding module that swaps the rows of
placeholder ids for the trainable vectors; the embedding matrix itself stays frozen, so every
other row is untouched by construction. :meth:`TrainableTokens.write_into_encoder` copies the
learned vectors into the matrix rows for saving.

A token of N vectors is spelled in prompts as ``tok tok_1 ... tok_{N-1}``: the naming diffusers'
``load_textual_inversion`` uses and its ``maybe_convert_prompt`` expands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from textinv.config import UserError


def token_names(token: str, num_vectors: int) -> list[str]:
    """The tokenizer entries of a placeholder of ``num_vectors`` vectors."""
    return [token] + [f"{token}_{index}" for index in range(1, num_vectors)]


def expand_placeholder(text: str, token: str, num_vectors: int) -> str:
    """Replace ``token`` in ``text`` by the space-separated names of all its vectors."""
    if num_vectors == 1:
        return text
    return text.replace(token, " ".join(token_names(token, num_vectors)))


def expand_loaded_tokens(text: str, tokenizer: Any) -> str:
    """``text`` with every multi-vector token ``tokenizer`` has loaded spelled out (``tok`` -> ``tok tok_1 ...``), as
    diffusers' ``maybe_convert_prompt`` does for the pipelines that have it (SD3's has not)."""
    added = set(tokenizer.get_added_vocab())
    words = text.split(" ")
    spelled = []
    for word in words:
        count = 1
        while word in added and f"{word}_{count}" in added:
            count += 1
        spelled.append(expand_placeholder(word, word, count) if word in added else word)
    return " ".join(spelled)


def check_new_token(tokenizer: Any, token: str, num_vectors: int) -> None:
    """Refuse a placeholder the tokenizer already knows (it would hijack an existing word)."""
    vocab = tokenizer.get_vocab()
    for name in token_names(token, num_vectors):
        if name in vocab:
            raise UserError(
                f"--placeholder_token {token!r}: {name!r} is already in the tokenizer's vocabulary "
                f"(id {vocab[name]}); choose a new word, e.g. '<{token.strip('<>')}-concept>'"
            )
    existing_ids = word_ids(tokenizer, token)
    if len(existing_ids) == 1:
        word = tokenizer.convert_ids_to_tokens(existing_ids)[0]
        raise UserError(
            f"--placeholder_token {token!r} is already a word of the model ({word!r}, id {existing_ids[0]}); "
            f"training it would change every prompt that uses it. Choose a new word, e.g. '<{token.strip('<>')}>'"
        )


def word_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids ``text`` tokenizes to, without special tokens or bare word-start markers.

    SentencePiece tokenizers (XLM-R) spell a Chinese word after a space as two pieces, a bare
    ``▁`` then the word (``猫`` -> ``▁``, ``猫``); the marker carries none of the word's meaning,
    so it does not count. BPE (CLIP, ``</w>`` endings) and WordPiece (BERT, ``##`` pieces) have
    no such piece and pass through unchanged.
    """
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    meaningful = [i for i, piece in zip(ids, pieces) if piece.replace("\u2581", "").strip()]
    return meaningful or ids


def initializer_ids(tokenizer: Any, initializer: str, num_vectors: int) -> list[int]:
    """Token ids whose rows start the placeholder vectors: one per vector, or one for all."""
    ids = word_ids(tokenizer, initializer)
    if not ids:
        raise UserError(f"--initializer_token {initializer!r} tokenizes to nothing; give a word such as 'toy'")
    if len(ids) == 1:
        return ids * num_vectors
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if len(ids) == num_vectors:
        return ids
    if num_vectors == 1:
        raise UserError(
            f"--initializer_token {initializer!r} is {len(ids)} tokens ({' '.join(pieces)}), not one; "
            "choose a single-token word (e.g. 'toy', 'dog', 'style') or set --num_vectors "
            f"{len(ids)} to start one vector from each"
        )
    raise UserError(
        f"--initializer_token {initializer!r} is {len(ids)} tokens ({' '.join(pieces)}) but --num_vectors is "
        f"{num_vectors}; give a one-token word, or exactly {num_vectors} tokens"
    )


def check_words(tokenizer: Any, token: str, num_vectors: int, initializer: Optional[str]) -> None:
    """The placeholder is new and the initializer (if any) fits: what a tokenizer alone can tell, so it is
    checked as soon as the tokenizer loads, before the UNet and VAE."""
    check_new_token(tokenizer, token, num_vectors)
    if initializer is not None:
        initializer_ids(tokenizer, initializer, num_vectors)


def tokenizer_check(token: str, num_vectors: int, initializer: Optional[str]) -> Callable[[Any], None]:
    """What each tokenizer alone can tell, checked as it loads (before the denoiser): the placeholder is new to it,
    and the initializer fits the first one. Later tokenizers may split the initializer otherwise (T5's SentencePiece),
    which gives their encoder more vectors (textinv.models.conditioning.add_placeholder)."""
    seen: list[Any] = []

    def check(tokenizer: Any) -> None:
        check_words(tokenizer, token, num_vectors, initializer if not seen else None)
        seen.append(tokenizer)

    return check


def add_placeholder_token(
    tokenizer: Any,
    text_encoder: Any,
    token: str,
    initial_vectors: torch.Tensor,
) -> list[int]:
    """Add ``token`` (and ``token_1``... for more vectors) with the given rows. Returns their ids.

    The new ids are contiguous at the end of the vocabulary; no existing row changes.
    """
    num_vectors = initial_vectors.shape[0]
    names = token_names(token, num_vectors)
    added = tokenizer.add_tokens(names)
    if added != num_vectors:
        raise UserError(f"token {token!r} is already in the tokenizer; choose another name")
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + num_vectors)):
        raise RuntimeError(f"placeholder ids are not contiguous: {ids}")
    embedding = text_encoder.get_input_embeddings()
    if embedding.weight.shape[0] < len(tokenizer):
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # our rows are set below
        embedding = text_encoder.get_input_embeddings()
    dim = embedding.weight.shape[1]
    if initial_vectors.shape[1] != dim:
        raise UserError(
            f"embedding for {token!r} has {initial_vectors.shape[1]} dimensions but this text encoder "
            f"has {dim}; it was made for another model family"
        )
    with torch.no_grad():
        embedding.weight[ids[0] : ids[0] + num_vectors] = initial_vectors.to(embedding.weight)
    return ids


class TrainableTokens(nn.Module):
    """The placeholder vectors of one text encoder, the only trainable tensor.

    ``forward(input_ids)`` runs the (frozen) text encoder with the placeholder rows taken from
    ``self.vectors``; wrapping this module in DDP all-reduces exactly the vectors' gradients.
    """

    def __init__(self, text_encoder: Any, first_id: int, initial_vectors: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(initial_vectors.detach().clone().float())
        self.first_id = int(first_id)
        # Not registered as a submodule: its frozen weights are not ours to move, save or sync.
        self._encoder = [text_encoder]
        self._hook = text_encoder.get_input_embeddings().register_forward_hook(self._swap_rows)

    @property
    def text_encoder(self) -> Any:
        return self._encoder[0]

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    def _swap_rows(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        input_ids = inputs[0]
        offset = input_ids - self.first_id
        is_placeholder = (offset >= 0) & (offset < self.num_vectors)
        # No early return for batches without the token: asking would make the CPU wait for the GPU.
        rows = self.vectors.to(output.dtype)[offset.clamp(0, self.num_vectors - 1)]
        return torch.where(is_placeholder.unsqueeze(-1), rows, output)

    def detach_hook(self) -> None:
        self._hook.remove()

    def reattach_hook(self) -> None:
        """Hook the encoder's current input embeddings: adding another word may have resized (replaced) them."""
        self._hook.remove()
        self._hook = self.text_encoder.get_input_embeddings().register_forward_hook(self._swap_rows)

    @torch.no_grad()
    def write_into_encoder(self) -> None:
        """Copy the learned vectors into the encoder's embedding rows (for saving the pipeline)."""
        weight = self.text_encoder.get_input_embeddings().weight
        weight[self.first_id : self.first_id + self.num_vectors] = self.vectors.detach().to(weight)

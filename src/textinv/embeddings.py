"""One in-memory :class:`Embedding` type, and reading/writing embedding files.

diffusers' layout (its textual-inversion example and ``load_textual_inversion``):
``learned_embeds.safetensors`` / ``.bin`` holding ``{token: float32 [num_vectors, dim]}``
(older files: ``[dim]``, or one key per vector ``tok``, ``tok_1``...).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from textinv.config import UserError
from textinv.files import atomic_write

logger = logging.getLogger(__name__)

# The text encoder a set of vectors belongs to, by the pipeline attribute that holds it.
TEXT_ENCODER = "text_encoder"
DIFFUSERS_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


@dataclass
class Embedding:
    """A learned token: its name and ``[num_vectors, dim]`` vectors for each text encoder."""

    token: str
    vectors: dict[str, torch.Tensor]
    step: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def dims(self) -> dict[str, int]:
        return {name: int(tensor.shape[1]) for name, tensor in self.vectors.items()}


def save_diffusers(embedding: Embedding, path: str | Path) -> Path:
    """Write ``{token: [n, dim]}`` as safetensors (or a weights-only torch file for ``.bin``)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensor = embedding.vectors[TEXT_ENCODER].detach().to("cpu", torch.float32).contiguous()
    if path.suffix == ".bin":
        return atomic_write(path, lambda tmp: torch.save({embedding.token: tensor}, tmp))
    return atomic_write(path, lambda tmp: save_file({embedding.token: tensor}, str(tmp)))


def read_embeddings(path: str | Path) -> list[Embedding]:
    """Read every token in an embedding file or a folder holding ``learned_embeds.*``."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in DIFFUSERS_FILE_NAMES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UserError(
                f"embedding folder {str(path)!r} has no {' or '.join(DIFFUSERS_FILE_NAMES)}; give the file itself"
            )
    if not path.is_file():
        raise UserError(f"embedding file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"embedding file {str(path)!r} is empty (0 bytes); it was not written completely")
    state = _read_state(path)
    embeddings = _from_diffusers_state(state, path)
    for embedding in embeddings:
        for name, tensor in embedding.vectors.items():
            if not torch.isfinite(tensor).all():
                raise UserError(f"embedding {embedding.token!r} in {str(path)!r} holds NaN or infinite values")
    return embeddings


def _read_state(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        head = handle.read(8)
    try:
        if head[:2] == b"PK" or head[:1] == b"\x80":
            # Pickle-based torch files: weights_only refuses any object but tensors and containers.
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(path))
    except Exception as error:
        raise UserError(
            f"{str(path)!r} is not a readable embedding file ({type(error).__name__}: {_first_line(error)})"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} holds a {type(state).__name__}, not a dictionary of tensors")
    return state


def _from_diffusers_state(state: dict[str, Any], path: Path) -> list[Embedding]:
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError(f"{str(path)!r} holds no embedding tensors")
    # Group one-key-per-vector files ("tok", "tok_1", ...) back into one token.
    grouped: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)_(\d+)", key)
        base = match.group(1) if match and match.group(1) in tensors else key
        position = int(match.group(2)) if base != key else 0
        grouped.setdefault(base, []).append((position, tensor))
    embeddings = []
    for token, parts in grouped.items():
        rows = [t.reshape(1, -1) if t.dim() == 1 else t for _, t in sorted(parts, key=lambda item: item[0])]
        if any(r.dim() != 2 for r in rows):
            raise UserError(f"{str(path)!r}: tensor for {token!r} has shape {tuple(parts[0][1].shape)}, not [n, dim]")
        vectors = torch.cat(rows).to(torch.float32)
        embeddings.append(Embedding(token=token, vectors={TEXT_ENCODER: vectors}))
    return embeddings


def load_embeddings(
    pipe: Any,
    path: str | Path,
    token: Optional[str] = None,
    replace: bool = False,
) -> list[str]:
    """Add the token(s) of an embedding file to a pipeline's tokenizer and text encoder.

    ``token`` renames the (single) token in the file. Returns the tokens added.
    """
    from textinv.tokens import add_placeholder_token, token_names

    embeddings = read_embeddings(path)
    if token is not None:
        if len(embeddings) != 1:
            raise UserError(f"--token renames one token, but {str(path)!r} holds {len(embeddings)}")
        embeddings[0].token = token
    added = []
    for embedding in embeddings:
        vectors = embedding.vectors[TEXT_ENCODER]
        vocab = pipe.tokenizer.get_vocab()
        present = [name for name in token_names(embedding.token, embedding.num_vectors) if name in vocab]
        if present:
            if not replace:
                raise UserError(
                    f"token {embedding.token!r} is already in the pipeline; pass --replace to overwrite it "
                    "or --token NAME to load it under another name"
                )
            _replace_rows(pipe, embedding.token, vectors)
        else:
            add_placeholder_token(pipe.tokenizer, pipe.text_encoder, embedding.token, vectors)
        added.append(embedding.token)
        logger.info("loaded %s (%d vector(s)) from %s", embedding.token, embedding.num_vectors, path)
    return added


def _replace_rows(pipe: Any, token: str, vectors: torch.Tensor) -> None:
    from textinv.tokens import token_names

    names = token_names(token, vectors.shape[0])
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    if any(i is None or i == pipe.tokenizer.unk_token_id for i in ids):
        raise UserError(f"token {token!r} is in the pipeline with a different number of vectors; cannot replace")
    weight = pipe.text_encoder.get_input_embeddings().weight
    if weight.shape[1] != vectors.shape[1]:
        raise UserError(f"embedding for {token!r} has dim {vectors.shape[1]}, the text encoder has {weight.shape[1]}")
    with torch.no_grad():
        for row, vector in zip(ids, vectors):
            weight[row] = vector.to(weight)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""

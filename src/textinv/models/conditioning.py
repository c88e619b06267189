"""From captions to the denoiser's prediction, for every model family; and the placeholder vectors of the text
encoders as one trainable module.

What each family's pipeline feeds its denoiser is the family's to say (``textinv.models.families``): which
encoders run, which of their outputs count (last or penultimate layer, pooled vector), how they are joined, and how
the denoiser is called. This module tokenizes, runs the encoders, and asks the family.

Tokenizing follows the pipelines: pad to the encoder's length (CLIP's ``model_max_length``; T5's
``max_sequence_length`` of the family's pipeline), truncate, and an attention mask only for encoders whose config
sets ``use_attention_mask`` (AltDiffusion's does; CLIP, T5 and BERT get none, as in diffusers' ``encode_prompt`` and
ppdiffusers' training script).

Encoders with trainable vectors run every step. The others (``--text_encoders`` leaves them out) give the same
output for the same caption, so each caption runs through them once, without gradients, and the output is kept.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from textinv.config import UserError
from textinv.models.families.base import DenoiserCall, EncoderOutput, TextConditioning
from textinv.models.loading import ModelParts, TextEncoderPart
from textinv.models.tokens import (
    TrainableTokens,
    add_placeholder_token,
    check_new_token,
    expand_placeholder,
    initializer_ids,
    word_ids,
)

logger = logging.getLogger(__name__)

__all__ = ["TextConditioning", "TrainableConcepts", "TrainableTextEncoders", "add_placeholder", "predict", "tokenize"]
# Captions whose untrained encoders' outputs are kept: the templates (27 object, 21 style) times a few images fit.
FROZEN_CACHE_CAPTIONS = 256


class TrainableTextEncoders(nn.Module):
    """The frozen text encoders of a pipeline with the placeholder rows of the chosen ones trainable.

    Holds one :class:`~textinv.models.tokens.TrainableTokens` per trained encoder (``tokens[slot]``), so preparing
    this one module with accelerate makes DDP all-reduce every encoder's vectors. ``forward(*input_ids)`` encodes a
    batch the way the family's pipeline does (one id tensor per text encoder of the model, in its order).
    """

    def __init__(self, parts: ModelParts, tokens: dict[str, TrainableTokens], token: str = "", num_vectors: int = 1):
        super().__init__()
        self.tokens = nn.ModuleDict(tokens)
        self.token = token
        self.num_vectors = num_vectors  # --num_vectors: how the captions spell the placeholder
        # Rows below these ids (by slot) are the model's own words; set when several words were added (--concepts),
        # so each word's vocabulary median leaves out the others' rows as a word trained alone would.
        self.vocabulary_rows: dict[str, int] = {}
        # Not a submodule: the frozen encoders are not ours to move, save or sync.
        self._parts = [parts]
        # Least recently used first; at most FROZEN_CACHE_CAPTIONS entries (captions with shuffled or dropped tags
        # are mostly new, and a real T5-XXL output is ~4 MiB).
        self._frozen_outputs: OrderedDict[tuple[str, bytes], EncoderOutput] = OrderedDict()

    @property
    def parts(self) -> ModelParts:
        return self._parts[0]

    @property
    def vectors(self) -> torch.Tensor:
        """The first trained encoder's vectors (the only ones for single-encoder families)."""
        return self._token_list()[0].vectors

    def each(self) -> list[TrainableTextEncoders]:
        """The words trained: this one (:class:`TrainableConcepts` holds several)."""
        return [self]

    def _token_list(self) -> list[TrainableTokens]:
        return [trainable for trainable in self.tokens.values() if isinstance(trainable, TrainableTokens)]

    def vectors_by_encoder(self) -> dict[str, torch.Tensor]:
        """The trained encoders' vectors by slot (``text_encoder``, ``text_encoder_2``...)."""
        return dict(zip(self.tokens.keys(), (trainable.vectors for trainable in self._token_list())))

    def vectors_by_role(self) -> dict[str, torch.Tensor]:
        """The trained encoders' vectors by role (``clip_l``, ``t5xxl``...; ``text_encoder`` when there is one)."""
        roles = {part.name: part.role for part in self.parts.text_encoders}
        return {roles[slot]: vectors for slot, vectors in self.vectors_by_encoder().items()}

    @torch.no_grad()
    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        """Set every trained encoder's vectors (by slot, e.g. from a checkpoint); the names must match."""
        if set(vectors) != set(self.tokens):
            raise UserError(
                f"the checkpoint holds vectors for {', '.join(sorted(vectors))} but this run trains "
                f"{', '.join(self.tokens)}; resume with the model and --text_encoders it was trained with"
            )
        for name, trainable in zip(self.tokens.keys(), self._token_list()):
            trainable.vectors.copy_(vectors[name].to(trainable.vectors))

    def all_finite(self) -> bool:
        # One read of a device value for every encoder (each read waits for the GPU).
        return bool(torch.stack([torch.isfinite(t.vectors).all() for t in self._token_list()]).all())

    def write_into_encoder(self) -> None:
        """Copy the learned vectors into every trained encoder's embedding rows (for saving the pipeline)."""
        for trainable in self._token_list():
            trainable.write_into_encoder()

    def detach_hook(self) -> None:
        for trainable in self._token_list():
            trainable.detach_hook()

    def caption_for(self, part: TextEncoderPart, caption: str) -> str:
        """``caption`` as ``part``'s tokenizer must read it: the placeholder spelled with that encoder's vectors
        (T5 may have more than CLIP, see :func:`add_placeholder`); an encoder without vectors, the bare word."""
        trainable = self.tokens[part.name] if part.name in self.tokens else None
        # An encoder without vectors reads the bare word, as it will when the file is used (no loader adds it there).
        count = trainable.num_vectors if isinstance(trainable, TrainableTokens) else 1
        if count == self.num_vectors or not self.token:
            return caption
        spelled = expand_placeholder(self.token, self.token, self.num_vectors)
        return caption.replace(spelled, expand_placeholder(self.token, self.token, count))

    def forward(
        self,
        *input_ids: torch.Tensor,
        attention_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> TextConditioning:
        parts = self.parts
        encoders = parts.text_encoders
        if len(input_ids) != len(encoders):
            raise ValueError(f"{len(input_ids)} id tensors for {len(encoders)} text encoders")
        masks = list(attention_masks) if attention_masks is not None else [None] * len(encoders)
        outputs = {}
        for part, ids, mask in zip(encoders, input_ids, masks):
            if part.name in self.tokens:
                outputs[part.role] = parts.family.call_encoder(part.spec, part.text_encoder, ids, mask)
            else:
                outputs[part.role] = self._frozen_output(part, ids, mask)
        return parts.family.encode(parts, outputs)

    def _frozen_output(self, part: TextEncoderPart, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> EncoderOutput:
        """An untrained encoder's output for these ids, each caption computed once (no gradient flows there)."""
        rows: list[EncoderOutput] = []
        for index in range(ids.shape[0]):
            key = (part.name, ids[index].cpu().numpy().tobytes())
            if key in self._frozen_outputs:
                self._frozen_outputs.move_to_end(key)
            else:
                one_mask = None if mask is None else mask[index : index + 1]
                with torch.no_grad():
                    one = self.parts.family.call_encoder(part.spec, part.text_encoder, ids[index : index + 1], one_mask)
                self._frozen_outputs[key] = one
                if len(self._frozen_outputs) > FROZEN_CACHE_CAPTIONS:
                    self._frozen_outputs.popitem(last=False)
            rows.append(self._frozen_outputs[key])
        return EncoderOutput(
            torch.cat([row.sequence for row in rows]) if rows[0].sequence is not None else None,
            torch.cat([row.pooled for row in rows]) if rows[0].pooled is not None else None,
        )


class TrainableConcepts(nn.Module):
    """Several words trained in one run (``--concepts``), each a :class:`TrainableTextEncoders` of its own.

    Every word's forward hook sits on the same embedding modules, so any one word's module encodes a caption with
    every word's current vectors. Each word keeps its own parameters: a frozen word (``requires_grad_(False)``) gets
    no gradient, so optimizers skip it. Checkpoints key the vectors ``<token>/<slot>``.
    """

    def __init__(self, words: Sequence[TrainableTextEncoders]) -> None:
        super().__init__()
        self.words = nn.ModuleList(words)
        first = words[0]
        for word in words:
            word.vocabulary_rows = {slot: first.tokens[slot].first_id for slot in first.tokens}  # type: ignore[misc]
            for tokens in word._token_list():
                tokens.reattach_hook()  # a later word's tokens resized the embeddings: hook the module now in use

    def each(self) -> list[TrainableTextEncoders]:
        return list(self.words)  # type: ignore[arg-type]

    @property
    def parts(self) -> ModelParts:
        return self.each()[0].parts

    @property
    def tokens(self) -> nn.ModuleDict:
        """The first word's (the trained encoders and where the added rows start are the same for every word)."""
        return self.each()[0].tokens

    @property
    def vectors(self) -> torch.Tensor:
        return self.each()[0].vectors

    def vectors_by_encoder(self) -> dict[str, torch.Tensor]:
        return {f"{word.token}/{slot}": v for word in self.each() for slot, v in word.vectors_by_encoder().items()}

    @torch.no_grad()
    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        for word in self.each():
            mine = {key.split("/", 1)[1]: v for key, v in vectors.items() if key.split("/", 1)[0] == word.token}
            if not mine:
                raise UserError(
                    f"the checkpoint holds no vectors for {word.token}; resume with the concepts file it was trained with"
                )
            word.load_vectors(mine)

    def all_finite(self) -> bool:
        return all(word.all_finite() for word in self.each())

    def write_into_encoder(self) -> None:
        for word in self.each():
            word.write_into_encoder()

    def detach_hook(self) -> None:
        for word in self.each():
            word.detach_hook()

    def caption_for(self, part: TextEncoderPart, caption: str) -> str:
        for word in self.each():
            caption = word.caption_for(part, caption)
        return caption

    def forward(self, *input_ids: torch.Tensor, **kwargs: Any) -> TextConditioning:
        return self.each()[0](*input_ids, **kwargs)  # every word's hook swaps its own rows


def choose_encoders(parts: ModelParts, requested: Optional[Sequence[str]]) -> list[TextEncoderPart]:
    """The encoders that get trainable vectors: those ``--text_encoders`` names (all by default)."""
    roles = [part.role for part in parts.text_encoders]
    if not requested:
        return list(parts.text_encoders)
    unknown = [name for name in requested if name not in roles]
    if unknown:
        raise UserError(
            f"--text_encoders {' '.join(requested)}: this {parts.family.title} model has no {unknown[0]!r} text encoder; "
            f"its encoders are {', '.join(roles)}"
        )
    return [part for part in parts.text_encoders if part.role in requested]


def add_placeholder(
    parts: ModelParts,
    token: str,
    num_vectors: int,
    initializer: Optional[str],
    start_vectors: Optional[dict[str, torch.Tensor]] = None,
    start_source: str = "",
    text_encoders: Optional[Sequence[str]] = None,
) -> TrainableTextEncoders:
    """Add ``token`` (and ``token_1``...) to every tokenizer and to the trained text encoders of ``parts``.

    Each trained encoder's vectors start from ``start_vectors[role]`` (an embedding file) or from the rows of
    ``initializer`` in that encoder's own vocabulary. An encoder gets ``num_vectors`` vectors, except when
    ``num_vectors`` is 1 and its tokenizer splits the initializer into k pieces while another trained encoder keeps it
    whole: then it gets k, one from each piece (T5's SentencePiece splits words that CLIP's BPE keeps whole).
    Untrained encoders' tokenizers do not learn the token: they read the caption's bare word, as they will when the
    file is used (loaders add a token only where the file has vectors for it). Every check runs before any
    tokenizer changes, so a refused token leaves the model as it was.
    """
    trained = choose_encoders(parts, text_encoders)
    if start_vectors is not None:
        wanted = [part.role for part in trained]
        if set(start_vectors) != set(wanted):
            raise UserError(
                f"--init_embeddings {start_source!r} has vectors for {' + '.join(sorted(start_vectors))} but this "
                f"{parts.family.title} run trains {' + '.join(wanted)}; give an embedding made for this model family"
            )
    elif initializer is None:
        raise UserError("--initializer_token is required: a one-token word the vectors start from, e.g. 'toy'")
    counts = _vector_counts(trained, initializer, num_vectors) if start_vectors is None else {}
    initial: dict[str, torch.Tensor] = {}
    for part in trained:
        check_new_token(part.tokenizer, token, counts.get(part.name, num_vectors))
    for part in trained:
        weight = part.text_encoder.get_input_embeddings().weight
        if start_vectors is not None:
            vectors = start_vectors[part.role]
            if vectors.shape[1] != weight.shape[1]:
                raise UserError(
                    f"--init_embeddings {start_source!r} has {vectors.shape[1]}-dim vectors for {part.role} but the "
                    f"model's {part.role} uses {weight.shape[1]}; give an embedding made for this model family"
                )
            initial[part.name] = vectors.detach().to(torch.float32).clone()  # exact, whatever the frozen dtype
        else:
            ids = initializer_ids(part.tokenizer, initializer, counts[part.name])  # type: ignore[arg-type]
            initial[part.name] = weight[ids].detach().clone()
    trainables = {}
    for part in trained:
        ids = add_placeholder_token(part.tokenizer, part.text_encoder, token, initial[part.name])
        trainables[part.name] = TrainableTokens(part.text_encoder, ids[0], initial[part.name])
        logger.debug("%s: %s is id %d (%d vector(s))", part.role, token, ids[0], len(ids))
    return TrainableTextEncoders(parts, trainables, token, num_vectors)


def _vector_counts(trained: Sequence[TextEncoderPart], initializer: Optional[str], num_vectors: int) -> dict[str, int]:
    """Vectors per trained encoder (see :func:`add_placeholder`)."""
    counts = {part.name: num_vectors for part in trained}
    if num_vectors != 1 or initializer is None or len(trained) < 2:
        return counts
    pieces = {part.name: len(word_ids(part.tokenizer, initializer)) for part in trained}
    if any(count == 1 for count in pieces.values()):
        counts.update({name: count for name, count in pieces.items() if count > 1})
    return counts


def tokenize(tokenizer: Any, captions: Sequence[str], max_length: Optional[int] = None) -> Any:
    """A batch of captions as the pipelines tokenize prompts: padded to the encoder's length, truncated."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def uses_attention_mask(text_encoder: Any) -> bool:
    return bool(getattr(getattr(text_encoder, "config", None), "use_attention_mask", False))


def predict(
    model: Any,
    parts: Any,
    captions: Sequence[str],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    device: torch.device,
    tokenizer: Any = None,
    original_sizes: Optional[Sequence[Optional[tuple[int, int]]]] = None,
) -> torch.Tensor:
    """The denoiser's prediction for noisy latents captioned with ``captions``, at the denoiser's ``timesteps``.

    ``model`` is the (possibly DDP-wrapped) :class:`TrainableTextEncoders`; a plain callable from input ids to
    hidden states also works, with ``tokenizer`` (for stand-ins in tests). ``original_sizes``: each example's image
    size before aspect-ratio bucketing, or None (SDXL's time ids carry it).
    """
    encoders = getattr(parts, "text_encoders", None)
    trainable = getattr(model, "module", model)
    input_ids: list[torch.Tensor] = []
    masks: list[Optional[torch.Tensor]] = []
    for part in encoders or [None]:
        if part is None:
            batch = tokenize(tokenizer, captions)
            input_ids.append(batch.input_ids.to(device))
            masks.append(None)
            continue
        spelled = [trainable.caption_for(part, c) for c in captions] if hasattr(trainable, "caption_for") else captions
        batch = tokenize(part.tokenizer, spelled, part.max_length)
        input_ids.append(batch.input_ids.to(device))
        masks.append(batch.attention_mask.to(device) if uses_attention_mask(part.text_encoder) else None)
    extra = {"attention_masks": masks} if any(mask is not None for mask in masks) else {}
    conditioning = model(*input_ids, **extra)
    if isinstance(conditioning, torch.Tensor):
        conditioning = TextConditioning(conditioning)
    call = DenoiserCall(noisy_latents.to(device), timesteps.to(device), parts.vae_scale_factor, original_sizes)
    return parts.family.denoise(parts, conditioning, call)

"""From captions to the UNet's prediction, for every model family; and the placeholder vectors of
every text encoder as one trainable module.

What each family's pipeline feeds its UNet (and so what training must feed it):

- SD 1.x / 2.x, Taiyi (BERT), AltDiffusion (XLM-R): one tokenizer and text encoder; the text
  conditioning is the encoder's first output (CLIP's and BERT's last hidden state; AltDiffusion's
  ``RobertaSeriesModelWithTransformation`` returns its projection of the penultimate layer there).
- SDXL: both encoders; the conditioning is the concatenation of each encoder's penultimate-layer
  hidden states, and the UNet also takes ``added_cond_kwargs``: the second encoder's projected
  pooled output (``text_embeds``) and six time ids, (original height, width, crop top, left,
  target height, width). Source: diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and
  ``_get_add_time_ids``. Training passes original = target size and crop (0, 0), what that
  pipeline passes when generating, so the token is learned under the conditioning it is used with.
  With aspect-ratio buckets (issue 17) the time ids carry each image's real original size, crop (0, 0)
  (buckets resize whole images) and its bucket's size, as SDXL was trained.

Tokenizing follows the pipelines too: pad to ``model_max_length``, truncate, and an attention mask
only for encoders whose config sets ``use_attention_mask`` (AltDiffusion's does; CLIP and BERT get
none, as in diffusers' ``encode_prompt`` and ppdiffusers' training script).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from textinv.config import UserError
from textinv.models.loading import ModelParts
from textinv.models.tokens import TrainableTokens, add_placeholder_token, check_new_token, initializer_ids

logger = logging.getLogger(__name__)

# SDXL micro-conditioning: crop top-left (0, 0), as the pipeline's default crops_coords_top_left.
SDXL_CROP_TOP_LEFT = (0, 0)


@dataclass
class TextConditioning:
    """What the text encoders hand the UNet for a batch of captions."""

    hidden_states: torch.Tensor  # [batch, tokens, cross_attention_dim]
    pooled: Optional[torch.Tensor] = None  # [batch, dim]: SDXL's text_embeds, else None


class TrainableTextEncoders(nn.Module):
    """The frozen text encoders of a pipeline with the placeholder rows of each one trainable.

    Holds one :class:`~textinv.tokens.TrainableTokens` per text encoder (``tokens[name]``), so
    preparing this one module with accelerate makes DDP all-reduce every encoder's vectors.
    ``forward(*input_ids)`` encodes a batch the way the family's pipeline does.
    """

    def __init__(self, parts: ModelParts, tokens: dict[str, TrainableTokens]) -> None:
        super().__init__()
        self.tokens = nn.ModuleDict(tokens)
        # Not a submodule: the frozen encoders are not ours to move, save or sync.
        self._parts = [parts]

    @property
    def parts(self) -> ModelParts:
        return self._parts[0]

    @property
    def vectors(self) -> torch.Tensor:
        """The first text encoder's vectors (the only ones, except for SDXL)."""
        return self._token_list()[0].vectors

    def _token_list(self) -> list[TrainableTokens]:
        return [trainable for trainable in self.tokens.values() if isinstance(trainable, TrainableTokens)]

    def vectors_by_encoder(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.tokens.keys(), (trainable.vectors for trainable in self._token_list())))

    @torch.no_grad()
    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        """Set every encoder's vectors (e.g. from a checkpoint); the names must match."""
        if set(vectors) != set(self.tokens):
            raise UserError(
                f"the checkpoint holds vectors for {', '.join(sorted(vectors))} but this model's text encoders are "
                f"{', '.join(self.tokens)}; resume with the model it was trained on"
            )
        for name, trainable in zip(self.tokens.keys(), self._token_list()):
            trainable.vectors.copy_(vectors[name].to(trainable.vectors))

    def all_finite(self) -> bool:
        # One read of a device value for every encoder (each read waits for the GPU).
        return bool(torch.stack([torch.isfinite(t.vectors).all() for t in self._token_list()]).all())

    def write_into_encoder(self) -> None:
        """Copy the learned vectors into every encoder's embedding rows (for saving the pipeline)."""
        for trainable in self._token_list():
            trainable.write_into_encoder()

    def detach_hook(self) -> None:
        for trainable in self._token_list():
            trainable.detach_hook()

    def forward(
        self,
        *input_ids: torch.Tensor,
        attention_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> TextConditioning:
        encoders = self.parts.text_encoders
        if len(input_ids) != len(encoders):
            raise ValueError(f"{len(input_ids)} id tensors for {len(encoders)} text encoders")
        masks = list(attention_masks) if attention_masks is not None else [None] * len(encoders)
        if len(encoders) == 1:
            return TextConditioning(encoders[0].text_encoder(input_ids[0], attention_mask=masks[0])[0])
        # SDXL: penultimate layers side by side; the pooled output is the last encoder's.
        hidden, pooled = [], None
        for part, ids, mask in zip(encoders, input_ids, masks):
            output = part.text_encoder(ids, attention_mask=mask, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        return TextConditioning(torch.cat(hidden, dim=-1), pooled)


def add_placeholder(
    parts: ModelParts,
    token: str,
    num_vectors: int,
    initializer: Optional[str],
    start_vectors: Optional[dict[str, torch.Tensor]] = None,
    start_source: str = "",
) -> TrainableTextEncoders:
    """Add ``token`` (and ``token_1``...) to every tokenizer and text encoder of ``parts``.

    Each encoder's vectors start from ``start_vectors[encoder name]`` (an embedding file) or from
    the rows of ``initializer`` in that encoder's own vocabulary. Every check runs before any
    tokenizer changes, so a refused token leaves the model as it was.
    """
    initial: dict[str, torch.Tensor] = {}
    if start_vectors is not None:
        wanted = [part.name for part in parts.text_encoders]
        if set(start_vectors) != set(wanted):
            raise UserError(
                f"--init_embeddings {start_source!r} has vectors for {' + '.join(sorted(start_vectors))} but this "
                f"{parts.family} model's text encoders are {' + '.join(wanted)}; give an embedding made for this model family"
            )
    for part in parts.text_encoders:
        check_new_token(part.tokenizer, token, num_vectors)
        weight = part.text_encoder.get_input_embeddings().weight
        if start_vectors is not None:
            vectors = start_vectors[part.name]
            if vectors.shape[1] != weight.shape[1]:
                raise UserError(
                    f"--init_embeddings {start_source!r} has {vectors.shape[1]}-dim vectors for {part.name} but the model's "
                    f"{part.name} uses {weight.shape[1]}; give an embedding made for this model family"
                )
            initial[part.name] = vectors.detach().to(torch.float32).clone()  # exact, whatever the frozen dtype
        else:
            if initializer is None:
                raise UserError("--initializer_token is required: a one-token word the vectors start from, e.g. 'toy'")
            initial[part.name] = weight[initializer_ids(part.tokenizer, initializer, num_vectors)].detach().clone()
    trainables = {}
    for part in parts.text_encoders:
        ids = add_placeholder_token(part.tokenizer, part.text_encoder, token, initial[part.name])
        trainables[part.name] = TrainableTokens(part.text_encoder, ids[0], initial[part.name])
        logger.debug("%s: %s is id %d (%d vector(s))", part.name, token, ids[0], len(ids))
    return TrainableTextEncoders(parts, trainables)


def tokenize(tokenizer: Any, captions: Sequence[str]) -> Any:
    """A batch of captions as the pipelines tokenize prompts: padded to model_max_length, truncated."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def uses_attention_mask(text_encoder: Any) -> bool:
    return bool(getattr(getattr(text_encoder, "config", None), "use_attention_mask", False))


def sdxl_time_ids(noisy_latents: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """[batch, 6] (original h, w, crop top, left, target h, w) for latents of this size, in pixels."""
    height, width = (int(side) * vae_scale_factor for side in noisy_latents.shape[-2:])
    row = torch.tensor([height, width, *SDXL_CROP_TOP_LEFT, height, width], dtype=torch.float32)
    return row.repeat(noisy_latents.shape[0], 1)


def bucket_time_ids(
    original_sizes: Sequence[Optional[tuple[int, int]]], noisy_latents: torch.Tensor, vae_scale_factor: int
) -> Optional[torch.Tensor]:
    """SDXL's time ids for examples that carry their image's original (height, width): (original size,
    crop (0, 0), target = the latent's size in pixels); None when none carries one (the default ids)."""
    if all(size is None for size in original_sizes):
        return None
    default = sdxl_time_ids(noisy_latents, vae_scale_factor)
    rows = [
        row if size is None else torch.tensor([*size, *SDXL_CROP_TOP_LEFT, *row[4:].tolist()], dtype=torch.float32)
        for row, size in zip(default, original_sizes)
    ]
    return torch.stack(rows)


def predict(
    model: Any,
    parts: Any,
    captions: Sequence[str],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    device: torch.device,
    tokenizer: Any = None,
    time_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The UNet's prediction for noisy latents captioned with ``captions``.

    ``model`` is the (possibly DDP-wrapped) :class:`TrainableTextEncoders`; a plain callable from
    input ids to hidden states also works, with ``tokenizer`` (for stand-ins in tests). ``time_ids``
    ([batch, 6], SDXL only) replaces the default of :func:`sdxl_time_ids`.
    """
    encoders = getattr(parts, "text_encoders", None)
    pairs = [(part.tokenizer, part.text_encoder) for part in encoders] if encoders else [(tokenizer, None)]
    input_ids, masks = [], []
    for each_tokenizer, text_encoder in pairs:
        batch = tokenize(each_tokenizer, captions)
        input_ids.append(batch.input_ids.to(device))
        masks.append(batch.attention_mask.to(device) if uses_attention_mask(text_encoder) else None)
    extra = {"attention_masks": masks} if any(mask is not None for mask in masks) else {}
    conditioning = model(*input_ids, **extra)
    if isinstance(conditioning, torch.Tensor):
        conditioning = TextConditioning(conditioning)
    unet = parts.unet
    unet_dtype = unet.dtype
    unet_inputs: dict[str, Any] = {}
    if conditioning.pooled is not None:
        unet_inputs["added_cond_kwargs"] = {
            "text_embeds": conditioning.pooled.to(unet_dtype),
            "time_ids": (time_ids if time_ids is not None else sdxl_time_ids(noisy_latents, parts.vae_scale_factor)).to(
                device, unet_dtype
            ),
        }
    return unet(
        noisy_latents.to(device, unet_dtype),
        timesteps.to(device),
        conditioning.hidden_states.to(unet_dtype),
        **unet_inputs,
    ).sample

"""One in-memory :class:`Embedding` type, and reading/writing every textual-inversion file format.

Formats (detected by content, never by the file name alone):

``diffusers``
    ``learned_embeds.safetensors`` / ``.bin``: ``{token: float32 [num_vectors, dim]}`` (older files:
    ``[dim]``, or one key per vector ``tok``, ``tok_1``...). Source: diffusers' textual_inversion
    example and ``TextualInversionLoaderMixin.load_textual_inversion``.
``a1111`` / ``a1111-emb_params``
    AUTOMATIC1111 web UI ``.pt``: ``{string_to_token: {'*': 265}, string_to_param: {'*': [n, dim]},
    name, step, sd_checkpoint, sd_checkpoint_name}`` (its ``Embedding.save`` in
    modules/textual_inversion/textual_inversion.py); other trainers write ``{'emb_params': [n, dim]}``,
    which the web UI also reads (one-key dictionaries), in ``.pt`` or ``.safetensors``.
``sdxl`` / ``comfyui``
    ``{clip_l: [n, 768], clip_g: [n, 1280], t5xxl: [n, 4096]}`` (the keys present) in safetensors: ComfyUI's layout
    for every multi-encoder model, and the one the web UI and Forge read for SDXL. ``sdxl`` names the
    ``{clip_l, clip_g}`` case (the same keys).
``onetrainer`` / ``diffusers-advanced``
    ``{clip_l, clip_g, t5}``: OneTrainer's keys (T5 under ``t5``: OneTrainer#514; its output embeddings
    ``*_out`` are not supported) and those of diffusers' advanced_diffusion_training scripts'
    ``<name>_emb.safetensors``. Read, both are named ``onetrainer``.
``pdparams``
    ppdiffusers ``learned_embeds.pdparams``: ``paddle.save({token: tensor})``, a pickle (protocol 2-4)
    in which Paddle stores tensors as numpy arrays and adds a ``StructuredToParameterName@@`` name
    table (paddle/framework/io.py ``_build_saved_state_dict``). Read and written without Paddle.
``a1111-png``
    The web UI's embedding images: a PNG ``tEXt`` chunk ``sd-ti-embedding`` holding base64 JSON in
    which tensors are ``{'TORCHTENSOR': nested list}`` (its textual_inversion/image_embedding.py).
    Read only.

In memory an :class:`Embedding`'s vectors are keyed by encoder *role*: ``text_encoder`` for single-encoder
families, ``clip_l``/``clip_g``/``t5xxl`` for SDXL, SD3 and Flux, whose files may hold some of them only; T5's
vector count may differ from the CLIP encoders'.

Safety: ``.pt``/``.bin``/``.pdparams`` are pickles. Torch zip files are read with
``torch.load(weights_only=True)``; raw pickles with :class:`~textinv.embeddings.unpickle._DataOnlyUnpickler`,
which refuses every global but numpy arrays and plain containers, so no file can run code.

Modules:

``model``
    :class:`Embedding`, the roles, format names and size limits, and the checks every embedding passes.
``layouts``
    The multi-encoder files' keys per tool (ComfyUI, OneTrainer, diffusers' advanced scripts).
``unpickle``
    The restricted unpickler and the weights-only ``torch.load`` of pickled files.
``png``
    The web UI's embedding images (the PNG text chunk).
``read``
    :func:`read_embeddings` and :func:`detect_format`: from a file of any format to Embeddings.
``write``
    :func:`write_embedding` and :func:`save_diffusers`.
``modelspec``
    The header keys of the safetensors files textinv writes: Stability AI's ModelSpec (``modelspec.architecture``...)
    and ``textinv_base_model``. Training sets them (:attr:`Embedding.file_metadata`); reading keeps a file's own.
``describe``
    :func:`describe` and :func:`convert`.
``load``
    :func:`load_embeddings` into a diffusers pipeline, each role into the encoder its family keeps it in.
"""

from __future__ import annotations

from textinv.embeddings.describe import convert, describe, description_table
from textinv.embeddings.load import load_embeddings
from textinv.embeddings.model import (
    A1111_STAR_TOKEN_ID,
    CLIP_G,
    CLIP_L,
    DIFFUSERS_FILE_NAMES,
    FOLDER_FILE_NAMES,
    MAX_DIM,
    MAX_FILE_BYTES,
    MAX_UNPACKED_BYTES,
    MAX_VECTORS,
    MULTI_ENCODER_FORMATS,
    PADDLE_NAME_TABLE,
    PNG_SIGNATURE,
    PNG_TEXT_KEY,
    READ_FORMATS,
    SUFFIX_FORMATS,
    T5XXL,
    TEXT_ENCODER,
    WRITE_FORMATS,
    Embedding,
    family_of,
)
from textinv.embeddings.read import detect_format, read_embeddings
from textinv.embeddings.write import fitting_formats, save_diffusers, write_embedding

__all__ = [
    "A1111_STAR_TOKEN_ID",
    "CLIP_G",
    "CLIP_L",
    "DIFFUSERS_FILE_NAMES",
    "FOLDER_FILE_NAMES",
    "MAX_DIM",
    "MAX_FILE_BYTES",
    "MAX_UNPACKED_BYTES",
    "MAX_VECTORS",
    "MULTI_ENCODER_FORMATS",
    "PADDLE_NAME_TABLE",
    "PNG_SIGNATURE",
    "PNG_TEXT_KEY",
    "READ_FORMATS",
    "SUFFIX_FORMATS",
    "T5XXL",
    "TEXT_ENCODER",
    "WRITE_FORMATS",
    "Embedding",
    "convert",
    "describe",
    "description_table",
    "detect_format",
    "family_of",
    "fitting_formats",
    "load_embeddings",
    "read_embeddings",
    "save_diffusers",
    "write_embedding",
]

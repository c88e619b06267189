"""What a run leaves for other tools: the embedding files and the full pipeline.

Files are written in the layout each ecosystem reads (textinv.embeddings holds the codecs):
``learned_embeds.safetensors`` (diffusers), ``learned_embeds.pdparams`` (ppdiffusers), ``learned_embeds.pt``
(the A1111 web UI), one per ``--embedding_formats``, and ``learned_embeds-steps-N.*`` snapshots. With
``--lora_rank`` (pivotal tuning) each set of word files has its LoRA files beside it, tagged alike
(textinv.training.lora.lora_file_names): ``pytorch_lora_weights.safetensors``, ``pytorch_lora_weights-steps-N...``.
The pipeline keeps the base model's parts byte for byte, except the tokenizer(s) and text
encoder(s), which now hold the new token; it loads in diffusers and in ppdiffusers
(textinv.training.paddle_layout).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from textinv.config import TrainConfig, UserError
from textinv.embeddings import Embedding, save_diffusers
from textinv.embeddings import write_embedding as write_embedding_file
from textinv.events import EMBEDDING_FILE, RunContext
from textinv.files import atomic_dir, atomic_write
from textinv.models.loading import ModelParts
from textinv.training import paddle_layout
from textinv.training.file_metadata import run_file_metadata

logger = logging.getLogger(__name__)

EMBEDDING_STEM = "learned_embeds"
# File suffix of each --embedding_formats entry (textinv.config.EMBEDDING_FORMATS).
FORMAT_SUFFIXES = {"diffusers": ".safetensors", "pdparams": ".pdparams", "a1111": ".pt"}


def embedding_of(config: TrainConfig, trainable: Any, step: int) -> Embedding:
    """The trained vectors as an :class:`Embedding` (float32, on the CPU)."""
    return Embedding(
        token=config.placeholder_token,
        # Keyed by role (text_encoder; clip_l, clip_g, t5xxl), the keys of the files other tools read.
        vectors={role: v.detach().float().cpu().clone() for role, v in trainable.vectors_by_role().items()},
        step=step,
        file_metadata=run_file_metadata(config, trainable.parts.family),  # ModelSpec keys, in every safetensors file
    )


def snapshot_tag(step: Optional[int]) -> str:
    """What names a snapshot's files: ``-steps-N`` (nothing for the run's last files)."""
    return "" if step is None else f"-steps-{step}"


def embedding_file_name(format: str, step: Optional[int] = None, concept: str = "") -> str:
    """``learned_embeds.<suffix>``, or the snapshot ``learned_embeds-steps-N.<suffix>`` of step N; one word of several
    (--concepts) has its name in it: ``learned_embeds-<concept>.<suffix>``, ``learned_embeds-<concept>-steps-N...``."""
    word = f"-{concept}" if concept else ""
    return f"{EMBEDDING_STEM}{word}{snapshot_tag(step)}{FORMAT_SUFFIXES[format]}"


def formats_for_model(config: TrainConfig, parts: ModelParts) -> TrainConfig:
    """``config`` with the embedding formats this model can have: formats an entry point chose by default
    (the root script's pdparams) that cannot hold two encoders' vectors are left out for SDXL, with a
    log line; formats the user named are checked (:func:`check_embedding_formats`)."""
    formats = config.embedding_formats
    if config.extra.get("default_embedding_formats") and parts.family.multi_encoder:
        kept = [name for name in formats if name == "diffusers"]
        if kept != formats:
            logger.info(
                "writing diffusers' learned_embeds.safetensors only: %s holds one text encoder's vectors, and this "
                "%s model has two",
                " ".join(name for name in formats if name != "diffusers"),
                parts.family,
            )
            return dataclasses.replace(config, embedding_formats=kept)
    check_embedding_formats(formats, parts)
    return config


def check_embedding_formats(formats: Sequence[str], parts: ModelParts) -> None:
    """Refuse, before training, a format that cannot hold this model's vectors."""
    if parts.family.multi_encoder:
        single = [name for name in formats if name != "diffusers"]
        if single:
            keys = "/".join(parts.family.roles)
            raise UserError(
                f"--embedding_formats {' '.join(single)} holds one text encoder's vectors, but this {parts.family.title} "
                f"model has {len(parts.text_encoders)}; use diffusers (learned_embeds.safetensors is the {keys} file "
                "ComfyUI, A1111 and diffusers read)"
            )


def save_embedding_files(
    formats: Sequence[str], embedding: Embedding, output_dir: Path, step: Optional[int] = None, concept: str = ""
) -> list[Path]:
    """Write ``embedding`` once per format, each file atomically (a kill never leaves a torn one)."""
    written = []
    for format in formats:
        path = output_dir / embedding_file_name(format, step, concept)
        written.append(
            save_diffusers(embedding, path) if format == "diffusers" else write_embedding_file(embedding, path, format)
        )
    return written


def write_embedding(run: RunContext, step: int, name: str = EMBEDDING_FILE) -> Path:
    """Write the current vectors to ``output_dir/name`` in diffusers' format (main process only)."""
    path = run.output_dir / name
    if run.is_main_process:
        save_diffusers(embedding_of(run.config, run.trainable, step), path)
    return path


def write_lora_files(
    run: RunContext, lora: Any, embedding: Embedding, tag: str = "", weights_by_component: Any = None
) -> list[Path]:
    """With ``lora`` (pivotal tuning), its files tagged ``tag`` (textinv.training.lora.lora_file_names), the word
    ``embedding`` in the bundle: the adapters' current weights or ``weights_by_component`` (main process only)."""
    if lora is None or not run.is_main_process:
        return []
    from textinv.training.lora import save_lora_files

    return save_lora_files(run.parts, lora, embedding, run.output_dir, tag, weights_by_component)


def write_embedding_files(run: RunContext, step: int, lora: Any = None) -> list[Path]:
    """Write the current vectors as ``output_dir/learned_embeds.*``, one per --embedding_formats, and with ``lora``
    (pivotal tuning) the LoRA files too (main process only)."""
    if not run.is_main_process:
        return []
    embedding = embedding_of(run.config, run.trainable, step)
    written = save_embedding_files(run.config.embedding_formats, embedding, run.output_dir, concept=run.concept)
    return written + write_lora_files(run, lora, embedding)


def write_snapshot(run: RunContext, step: int, lora: Any = None) -> list[Path]:
    """``learned_embeds-steps-N.*``, the snapshot every ``--save_steps``, and with ``lora`` (pivotal tuning) the
    adapters of step N as ``pytorch_lora_weights-steps-N.safetensors`` and ``learned_embeds_lora-steps-N...``
    (main process only)."""
    if not run.is_main_process:
        return []
    embedding = embedding_of(run.config, run.trainable, step)
    written = save_embedding_files(run.config.embedding_formats, embedding, run.output_dir, step, run.concept)
    return written + write_lora_files(run, lora, embedding, snapshot_tag(step))


def write_final_files(
    run: RunContext, embedding: Embedding, lora: Any = None, words: Sequence[tuple[str, Embedding]] = ()
) -> list[Path]:
    """What a completed run leaves (main process): the embedding files, the LoRA files with --lora_rank, and the
    full pipeline unless --only_save_embeds. ``words``: with several words (--concepts), each one's name and vectors
    (``embedding`` is then the first's); the pipeline holds them all."""
    from textinv.models.quiet import quiet_loading

    config, parts = run.config, run.parts
    written = []
    for concept, one in words or [("", embedding)]:
        written.extend(save_embedding_files(config.embedding_formats, one, run.output_dir, concept=concept))
    written.extend(write_lora_files(run, lora, embedding))
    if not config.only_save_embeds:
        # The text encoder(s) saved are the base model's as stored plus the learned rows, whatever
        # precision training's copies ran in (bf16/fp16 would round every weight).
        with quiet_loading():  # no "Writing model shards" bars
            written.extend(save_pipeline(parts, run.output_dir, config.ppdiffusers_weights, run.trainable))
    return written


def save_pipeline(
    parts: ModelParts, output_dir: Path, paddle_weights: bool = False, trainable: Any = None
) -> list[Path]:
    """Write the full pipeline: the base model's parts, with the new tokenizer(s) and text encoder(s).

    Other parts are copied from the base folder (not re-saved from memory, so they stay
    byte-identical). With ``trainable`` (the run's TrainableTextEncoders) each text encoder is the base
    model's, read again as stored, plus the learned rows (:func:`base_encoder_with_token`): training's
    copy may be in bf16/fp16. model_index.json goes last: it marks the pipeline complete.
    ``paddle_weights`` adds ppdiffusers' own weight layout (--ppdiffusers_weights).
    """
    source = Path(parts.source)
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    # Every trained tokenizer and text encoder holds the new token (SDXL: both pairs); the others are copied.
    trained = set(trainable.tokens) if trainable is not None else {part.name for part in parts.text_encoders}
    tokenizers = {part.tokenizer_name: part.tokenizer for part in parts.text_encoders if part.name in trained}
    encoders = {part.name: part for part in parts.text_encoders if part.name in trained}
    written, pytorch_only = [], []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        target = output_dir / name
        with atomic_dir(target) as tmp:
            if name in tokenizers:
                paddle_layout.save_tokenizer(tokenizers[name], tmp)
            elif name in encoders:
                clip = encoders[name].kind == "clip"
                part = encoders[name]
                encoder = part.text_encoder if trainable is None else base_encoder_with_token(part, source, trainable)
                paddle_layout.save_text_encoder(encoder, tmp, paddle_weights and clip)
                del encoder
                pytorch_only += [name] if paddle_weights and not clip else []
            else:
                shutil.copytree(source / name, tmp, dirs_exist_ok=True)
                converted = spec[0] == "diffusers" and paddle_weights and paddle_layout.write_paddle_model_index(tmp)
                holds_weights = any(tmp.glob("*.safetensors")) or any(tmp.glob("*.bin"))
                pytorch_only += [name] if paddle_weights and holds_weights and not converted else []
        written.append(target)
    if pytorch_only:
        logger.warning(
            "--ppdiffusers_weights: %s stay in PyTorch's layout only; load this pipeline in ppdiffusers with "
            "from_diffusers=True (or leave those parts out)",
            ", ".join(pytorch_only),
        )
    written.append(atomic_write(output_dir / "model_index.json", lambda tmp: _copy(source / "model_index.json", tmp)))
    return written


def base_encoder_with_token(part: Any, source: Path, trainable: Any) -> Any:
    """The base model's text encoder as stored (its dtype, every weight's bytes), on the CPU, with the
    placeholder rows set to the learned vectors (written in that dtype). Saving training's copy instead
    would round every weight when the frozen parts ran in bf16/fp16 (--mixed_precision)."""
    import torch

    from textinv.models.quiet import quiet_loading

    with quiet_loading():
        encoder = type(part.text_encoder).from_pretrained(source / part.name, dtype="auto")
    rows = part.text_encoder.get_input_embeddings().weight.shape[0]
    if encoder.get_input_embeddings().weight.shape[0] != rows:
        encoder.resize_token_embeddings(rows, mean_resizing=False)  # the new rows are set below
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        for word in trainable.each():  # --concepts: every word's rows
            tokens = word.tokens[part.name]
            weight[tokens.first_id : tokens.first_id + tokens.num_vectors] = tokens.vectors.detach().to(weight)
    return encoder


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)

"""Inspecting an embedding file (:func:`describe`) and converting it to another format (:func:`convert`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from textinv.embeddings.model import _check_values
from textinv.embeddings.modelspec import renamed, shown_items
from textinv.embeddings.read import _parse, _resolve_input, read_embeddings
from textinv.embeddings.write import write_embedding
from textinv.errors import UserError


def describe(path: str | Path) -> dict[str, Any]:
    """What an embedding file holds: its format, and per token its family, step and, per encoder role, the number of
    vectors (``counts``; ``num_vectors`` is the first role's), width (``dims``), dtype in the file and vector norms;
    and its safetensors header's keys (``metadata``: ModelSpec's and textinv's, empty when the file has none)."""
    resolved = _resolve_input(path)
    fmt, embeddings = _parse(resolved)
    tokens = []
    for embedding in embeddings:
        _check_values(embedding, f"embedding {embedding.token!r} in {str(resolved)!r}")
        tokens.append(
            {
                "token": embedding.token,
                "num_vectors": embedding.num_vectors,
                "counts": embedding.counts(),
                "dims": embedding.dims(),
                "dtype": dict(embedding.metadata.get("dtype", {})),
                "family": embedding.family,
                "step": embedding.step,
                "norms": {
                    name: [round(float(n), 6) for n in tensor.norm(dim=1)] for name, tensor in embedding.vectors.items()
                },
                "metadata": dict(shown_items(embedding.file_metadata)),
            }
        )
    info = {"file": str(resolved), "format": fmt, "bytes": resolved.stat().st_size, "tokens": tokens}
    if fmt == "lora-bundle":
        from safetensors import safe_open

        from textinv.embeddings.bundle import lora_summary

        with safe_open(str(resolved), framework="pt") as handle:  # the bundle reader only accepts safetensors
            info["lora"] = lora_summary({k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {}))
    return info


def convert(
    src: str | Path,
    dst: str | Path,
    to: Optional[str] = None,
    token: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Read the one token in ``src`` and write it to ``dst`` as ``to`` (default: by ``dst``'s suffix).

    Tensors are written as read (as float32), so a conversion between the multi-encoder layouts (sdxl, comfyui,
    onetrainer, diffusers-advanced) changes only the keys."""
    dst = Path(dst).expanduser()
    if dst.exists() and not overwrite:
        raise UserError(f"{str(dst)!r} already exists; pass --overwrite to replace it")
    embeddings = read_embeddings(src)
    if len(embeddings) != 1:
        names = ", ".join(e.token for e in embeddings)
        raise UserError(f"{str(src)!r} holds {len(embeddings)} tokens ({names}); the output formats hold one")
    embedding = embeddings[0]  # its safetensors header's keys (file_metadata) are written again when dst can hold them
    if token is not None:
        if not token.strip():
            raise UserError("--token must not be empty")
        embedding.file_metadata = renamed(embedding.file_metadata, embedding.token, token)
        embedding.token = token
    return write_embedding(embedding, dst, to)


def description_table(info: dict[str, Any]) -> str:
    """:func:`describe`'s result as the table ``textinv inspect`` prints: a row per token and encoder role."""
    lines = [f"{info['file']}: {info['format']}, {len(info['tokens'])} token(s)"]
    rows = [("token", "vectors", "encoder", "dim", "dtype", "family", "step", "vector norms")]
    for entry in info["tokens"]:
        for encoder, dim in entry["dims"].items():
            norms = entry["norms"][encoder]
            shown = " ".join(f"{n:.3f}" for n in norms[:8]) + (f" ... ({len(norms)})" if len(norms) > 8 else "")
            step = "-" if entry["step"] is None else str(entry["step"])
            dtype = entry["dtype"].get(encoder, "?")
            count = str(entry.get("counts", {}).get(encoder, entry["num_vectors"]))
            rows.append((entry["token"], count, encoder, str(dim), dtype, entry["family"], step, shown))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    for entry in info["tokens"]:  # the header's keys (ModelSpec's...), when the file has them
        metadata = entry.get("metadata") or {}
        if metadata:
            lines.append(f"metadata of {entry['token']}:")
            width = max(len(key) for key in metadata)
            lines.extend(f"  {key.ljust(width)}  {_one_line(value)}" for key, value in metadata.items())
    lora = info.get("lora")
    if lora:  # a LoRA with the words bundled (issue 26)
        lines.append(
            f"LoRA: rank {lora['rank']}, alpha {lora['alpha']}, {lora['modules']} modules of "
            f"{', '.join(lora['components'])}" + (f" ({lora['targets']})" if lora["targets"] else "")
        )
    return "\n".join(lines)


def _one_line(value: str, limit: int = 160) -> str:
    """A header value on one line of the table: other tools' descriptions have paragraphs, thumbnails are data URLs."""
    flat = " ".join(str(value).split())
    return flat if len(flat) <= limit else f"{flat[:limit]}... ({len(flat)} characters)"

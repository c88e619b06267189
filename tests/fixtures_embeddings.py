"""Embedding files in the exact layouts other tools write, built by the tests themselves.

Most real third-party embedding files may not be committed (their licences are unknown or AGPL; see
tests/data/ATTRIBUTION.md), so the standalone tests read look-alikes written here instead. Each
builder reproduces its original's container byte for byte when given the original's contents (the
interop tests in test_embeddings.py check that against the originals), so a look-alike differs from
the real file only in its numbers:

- torch zip files as torch 1.6-2.0's ``torch.save`` wrote them (what the published files are): the
  stored (uncompressed) zip records ``<archive>/data.pkl``, ``<archive>/data/<key>`` and
  ``<archive>/version`` (``3``), each entry's data 64-byte aligned by an ``FB`` padding extra field,
  data descriptors, and zip64 end records; none of the ``byteorder``/``.format_version``/
  ``.data/serialization_id`` records newer torch adds. The pickle is protocol 2 with
  ``torch._utils._rebuild_tensor_v2`` and persistent ids ``('storage', torch.FloatStorage, key,
  location, numel)``, so a tensor can say it was saved on ``cuda:0`` (as the web UI's files do).
- safetensors files through the safetensors library (header JSON, ``__metadata__`` first, padded
  with spaces to 8 bytes), with the originals' metadata.
- the web UI's embedding PNG: signature, IHDR, one ``tEXt`` chunk ``sd-ti-embedding`` holding
  base64 of ``json.dumps`` of the embedding dictionary (tensors as ``{"TORCHTENSOR": nested list}``),
  then IDAT and IEND, as Pillow writes it with a ``PngInfo``. The originals also hide the data in
  their pixels; textinv does not read pixels, so the look-alike's pixels are plain grey.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import struct
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

# The third-party files the tests know, by name (see tests/data/ATTRIBUTION.md and, for the ones
# that are not committed, ../shared/data/SOURCES.md).
VENDORED = ("fastai_diffusion-nbs_learned_embeds.bin", "padmanabh_pop_art.bin", "cloneofsimo_lora_kiriko2.ti.pt")
NOT_COMMITTED = (
    "ttekcor_learned_embeds.safetensors",
    "bad-hands-5.pt",
    "EasyNegative.pt",
    "empty.pt",
    "test_embedding.png",
    "Kaleidia_SDXL-Detail.safetensors",
)
VENDORED_DIR = Path(__file__).resolve().parent / "data" / "embeddings"

_ALIGNMENT = 64  # torch's PyTorchStreamWriter aligns every record's data to 64 bytes
# The legacy typed-storage classes torch.save names in the pickle.
_STORAGE_TYPES = {
    torch.float32: torch.FloatStorage,
    torch.float16: torch.HalfStorage,
    torch.bfloat16: torch.BFloat16Storage,
    torch.float64: torch.DoubleStorage,
    torch.int64: torch.LongStorage,
}


# --- torch zip (torch.save) -----------------------------------------------------------------------
class _Storage:
    """A tensor's storage as torch.save pickles it: a persistent id and the raw bytes."""

    def __init__(self, tensor: torch.Tensor, key: str, location: str) -> None:
        self.tensor = tensor.detach().cpu().contiguous().clone()  # a storage of exactly its elements
        self.key = key
        self.location = location


class _TorchPickler(pickle.Pickler):
    """The pickler of torch.save (protocol 2), with the device each storage is said to live on."""

    def __init__(self, buffer: io.BytesIO, location: str) -> None:
        super().__init__(buffer, protocol=2)
        self.location = location
        self.storages: list[_Storage] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            storage = _Storage(obj, str(len(self.storages)), self.location)
            self.storages.append(storage)
            compact = storage.tensor
            args: tuple[Any, ...] = (
                storage,
                0,
                tuple(compact.shape),
                compact.stride(),
                obj.requires_grad,
                OrderedDict(),
            )
            return torch._utils._rebuild_tensor_v2, args
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            storage_type = _STORAGE_TYPES[obj.tensor.dtype]
            return ("storage", storage_type, obj.key, obj.location, obj.tensor.numel())
        return None


def torch_save_bytes(obj: Any, archive: str = "archive", location: str = "cpu") -> bytes:
    """``obj`` as torch 1.6-2.0's ``torch.save`` wrote it into a file named ``<archive>.pt``."""
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer, location)
    pickler.dump(obj)
    records = [("data.pkl", buffer.getvalue())]
    records += [(f"data/{s.key}", bytes(s.tensor.untyped_storage())) for s in pickler.storages]
    records.append(("version", b"3\n"))
    return _zip_records([(f"{archive}/{name}", data) for name, data in records])


def _zip_records(records: list[tuple[str, bytes]]) -> bytes:
    """A zip the way PyTorchStreamWriter (miniz) writes one: stored, aligned, zip64 end records."""
    out = bytearray()
    central = bytearray()
    for name, data in records:
        encoded = name.encode()
        offset = len(out)
        before_data = offset + 30 + len(encoded) + 4
        padding = (-before_data) % _ALIGNMENT
        extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
        crc = zlib.crc32(data)
        # local header: version 0, flags 0x0808 (data descriptor, UTF-8), stored, no time, sizes later
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(encoded), len(extra))
        out += encoded + extra + data
        out += struct.pack("<IIII", 0x08074B50, crc, len(data), len(data))
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            0,
            0,
            0x0808,
            0,
            0,
            0,
            crc,
            len(data),
            len(data),
            len(encoded),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += encoded
    central_offset = len(out)
    out += central
    zip64_end = len(out)
    count = len(records)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count, len(central), central_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), central_offset, 0)
    return bytes(out)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def diffusers_bin(path: Path, token: str, vector: torch.Tensor, archive: str = "archive") -> Path:
    """diffusers' textual_inversion.py ``learned_embeds.bin``: ``{token: float32 [dim]}``, one vector."""
    return _write(path, torch_save_bytes({token: vector}, archive))


def a1111_pt(
    path: Path,
    name: str,
    vectors: torch.Tensor,
    step: int,
    sd_checkpoint: Optional[str],
    sd_checkpoint_name: Optional[str],
    location: str = "cuda:0",
) -> Path:
    """The web UI's ``.pt``: string_to_token {'*': 265}, string_to_param {'*': [n, dim]} saved from
    the GPU with requires_grad set, name, step and the checkpoint it was trained on."""
    star = "*"
    data = {
        "string_to_token": {star: 265},
        "string_to_param": {star: vectors.detach().clone().requires_grad_(True)},
        "name": name,
        "step": step,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }
    return _write(path, torch_save_bytes(data, location=location))


def emb_params_pt(path: Path, vectors: torch.Tensor) -> Path:
    """A ``.pt`` holding only ``{'emb_params': [n, dim]}`` (EasyNegative's trainer): no name, no step."""
    return _write(path, torch_save_bytes({"emb_params": vectors}))


def empty_pt(path: Path) -> Path:
    """``torch.save({})``: a valid torch file with no embedding in it."""
    return _write(path, torch_save_bytes({}))


# --- safetensors ----------------------------------------------------------------------------------
def diffusers_safetensors(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers' ``learned_embeds.safetensors``: ``{token: float32 [1, dim]}``, metadata format=pt."""
    from safetensors.torch import save_file

    save_file({token: vectors.contiguous()}, str(path), metadata={"format": "pt"})
    return path


def sdxl_safetensors(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """An SDXL embedding: ``clip_l`` [n, 768] and ``clip_g`` [n, 1280], no metadata."""
    from safetensors.torch import save_file

    save_file({"clip_g": clip_g.contiguous(), "clip_l": clip_l.contiguous()}, str(path))
    return path


# --- the web UI's embedding PNG -------------------------------------------------------------------
PNG_KEY = "sd-ti-embedding"


def a1111_png_text(data: dict[str, Any]) -> str:
    """The base64 text the web UI stores: ``json.dumps`` with tensors as {"TORCHTENSOR": list}."""

    class _Encoder(json.JSONEncoder):  # the web UI's EmbeddingEncoder
        def default(self, obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
            return json.JSONEncoder.default(self, obj)

    return base64.b64encode(json.dumps(data, cls=_Encoder).encode()).decode()


def a1111_png(path: Path, name: str, vectors: torch.Tensor, step: int, size: tuple[int, int] = (64, 64)) -> Path:
    """The web UI's embedding image: the embedding dictionary in a ``tEXt`` chunk before the pixels."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    info = PngInfo()
    info.add_text(PNG_KEY, a1111_png_text(data))
    Image.new("RGB", size, (128, 128, 128)).save(path, pnginfo=info)
    return path


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk of a PNG."""
    chunks, position = [], 8
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunks.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


# --- the look-alike set ---------------------------------------------------------------------------
def _vectors(rows: int, dim: int, seed: int) -> torch.Tensor:
    # The scale of real learned vectors (CLIP token embeddings have norms near 0.4-1.5).
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * 0.02


def write_lookalikes(folder: Path) -> Path:
    """Every third-party file the tests know, under its own name: the vendored originals copied, the
    rest written in their exact layouts with seeded random vectors of the same shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in VENDORED:
        shutil.copyfile(VENDORED_DIR / name, folder / name)
    diffusers_safetensors(folder / "ttekcor_learned_embeds.safetensors", "<detail-schemas>", _vectors(1, 768, 1))
    a1111_pt(folder / "bad-hands-5.pt", "bad-hands-5", _vectors(2, 768, 2), 1364, "7ab762a7", "blossom-extract")
    emb_params_pt(folder / "EasyNegative.pt", _vectors(8, 768, 3))
    empty_pt(folder / "empty.pt")
    a1111_png(folder / "test_embedding.png", "rick", _vectors(8, 768, 4), 60)
    sdxl_safetensors(folder / "Kaleidia_SDXL-Detail.safetensors", _vectors(2, 768, 5), _vectors(2, 1280, 6))
    return folder

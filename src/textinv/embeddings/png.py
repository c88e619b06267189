"""The web UI's embedding images: the base64 JSON in a PNG's ``sd-ti-embedding`` text chunk."""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from pathlib import Path
from typing import Any, Optional

from textinv.embeddings.model import MAX_FILE_BYTES, PNG_SIGNATURE, PNG_TEXT_KEY
from textinv.errors import UserError, first_line


def _load_png(path: Path) -> dict[str, Any]:
    """The web UI's embedding dictionary from a PNG's ``sd-ti-embedding`` text chunk."""
    # Not Pillow's PngImagePlugin (Image.open(path).text): a text chunk after the image data is only read once
    # every pixel is decoded (load()), its text limit is PngImagePlugin.MAX_TEXT_CHUNK (1 MiB) rather than this
    # reader's MAX_FILE_BYTES, and its errors are SyntaxError/ValueError texts, not the checksum/truncation lines here.
    data = path.read_bytes()
    text: Optional[bytes] = None
    position = len(PNG_SIGNATURE)
    ended = False
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        crc = data[position + 8 + length : position + 12 + length]
        if len(body) != length or len(crc) != 4:
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt") and body.split(b"\0", 1)[0] == PNG_TEXT_KEY:
            if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
                raise UserError(f"{str(path)!r}: the embedding's PNG text chunk is corrupt (bad checksum)")
            text = _png_text(kind, body[len(PNG_TEXT_KEY) + 1 :], path)
        if kind == b"IEND":
            ended = True
            break
        position += 12 + length
    if not ended:
        raise UserError(f"{str(path)!r} is a truncated or corrupt PNG (it has no end chunk)")
    if text is None:
        raise UserError(
            f"{str(path)!r} is a PNG without an 'sd-ti-embedding' text chunk, so not a web UI embedding image "
            "(embeddings hidden only in the pixels are not read)"
        )
    try:
        return json.loads(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, RecursionError) as error:
        raise UserError(f"{str(path)!r}: its 'sd-ti-embedding' text is not base64 JSON ({first_line(error)})") from None


def _png_text(kind: bytes, rest: bytes, path: Path) -> bytes:
    """The text of a PNG tEXt/zTXt/iTXt chunk after its keyword."""
    compressed = False
    if kind == b"zTXt":
        compressed, rest = True, rest[1:]
    elif kind == b"iTXt":
        compressed, rest = rest[:1] == b"\x01", rest[2:]
        rest = rest.split(b"\0", 2)[-1]  # skip language tag and translated keyword
    if not compressed:
        return rest
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(rest, MAX_FILE_BYTES)
    except zlib.error as error:
        raise UserError(f"{str(path)!r}: its 'sd-ti-embedding' text chunk is corrupt ({error})") from None
    if inflater.unconsumed_tail:
        raise UserError(f"{str(path)!r}: its 'sd-ti-embedding' text unpacks to over {MAX_FILE_BYTES // 2**20} MiB")
    return text

"""Bytes on the wire: JSON encoding and decoding, request-body decompression (spec 3.11).

Decompression is bounded: output is produced in slices and refused as soon as it passes the
size limit, so a small compression bomb is never inflated in memory.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import brotli
import orjson

from asap.errors import HTTPError, ParseError

__all__ = ["SUPPORTED_ENCODINGS", "decompress", "dumps", "loads"]

SUPPORTED_ENCODINGS = ("br", "gzip")
_CHUNK = 64 * 1024


def dumps(value: Any) -> bytes:
    """Serialize compactly (``,`` and ``:`` separators), as the reference server does."""
    return orjson.dumps(value)


def loads(body: bytes) -> Any:
    """Parse a request body; raise :class:`ParseError` with the reason (spec 3.3 step 6)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # Slow path, only for bad input: explain the failure the way Python's json module does.
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError({"error": f"Invalid UTF-8 encoding: {exc}"}) from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ParseError({"error": f"Invalid JSON: {exc}"}) from None


def _too_large(limit: int, size: int | None = None) -> HTTPError:
    shown = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return HTTPError(413, f"Decompressed request size ({shown}) exceeds maximum ({limit} bytes)")


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    data = body
    try:
        while True:
            out += inflater.decompress(data, _CHUNK)
            if len(out) > limit:
                raise _too_large(limit)
            data = inflater.unconsumed_tail
            if not data:
                break
        out += inflater.flush()
    except zlib.error as exc:
        raise HTTPError(400, f"Invalid compressed data: {exc}") from None
    if len(out) > limit:
        raise _too_large(limit, len(out))
    if not inflater.eof:
        raise HTTPError(400, "Invalid compressed data: truncated gzip stream")
    return bytes(out)


def _unbrotli(body: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    try:
        out = bytearray(decoder.process(body, output_buffer_limit=_CHUNK))
        # The whole input is buffered now; drain the output slice by slice.
        while not decoder.is_finished() and len(out) <= limit:
            chunk = decoder.process(b"", output_buffer_limit=_CHUNK)
            if not chunk:
                break
            out += chunk
    except brotli.error as exc:
        raise HTTPError(400, f"Invalid compressed data: {exc}") from None
    if len(out) > limit:
        raise _too_large(limit)
    if not decoder.is_finished():
        raise HTTPError(400, "Invalid compressed data: truncated brotli stream")
    return bytes(out)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a request's ``Content-Encoding`` within ``limit`` bytes (spec 3.3 step 5).

    Raises :class:`HTTPError`: 415 for an unsupported encoding, 400 for bad data, 413 when the
    output would pass ``limit``.
    """
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return body
    if name == "gzip":
        return _gunzip(body, limit)
    if name == "br":
        return _unbrotli(body, limit)
    raise HTTPError(
        415,
        f"Unsupported Content-Encoding: {encoding}. Supported: {', '.join(SUPPORTED_ENCODINGS)}",
    )

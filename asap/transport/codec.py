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

__all__ = ["MAX_DEPTH", "SUPPORTED_ENCODINGS", "decompress", "dumps", "loads"]

SUPPORTED_ENCODINGS = ("br", "gzip")
_CHUNK = 64 * 1024


def dumps(value: Any) -> bytes:
    """Serialize compactly (``,`` and ``:`` separators), as the reference server does."""
    return orjson.dumps(value)


MAX_DEPTH = 128
"""Deepest nesting of arrays and objects a request may have (replies add a few levels)."""


def loads(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a request body; raise :class:`ParseError` with the reason (spec 3.3 step 6).

    Only what orjson accepts is accepted (strict RFC 8259: no NaN, no lone surrogates,
    integers within 64 bits), so every accepted value can be written back in a reply.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError({"error": _explain(body, exc)}) from None
    # Depth can only exceed the limit when there are at least that many brackets.
    if body.count(b"[") + body.count(b"{") > max_depth and _too_deep(value, max_depth):
        raise ParseError({"error": f"Invalid JSON: nesting deeper than {max_depth} levels"})
    return value


def _explain(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """Explain a rejected body the way Python's json module does (slow path, bad input only)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"Invalid UTF-8 encoding: {error}"
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as error:
        return f"Invalid JSON: {error}"
    return f"Invalid JSON: {exc}"  # valid for Python, not for strict JSON (e.g. NaN)


def _too_deep(value: Any, max_depth: int) -> bool:
    level: list[Any] = [value]
    for _ in range(max_depth):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


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

"""Bytes on the wire: JSON encoding and decoding, request-body decompression (spec 3.11).

Decompression is bounded: output is produced in slices and refused as soon as it passes the
size limit, so a small compression bomb is never inflated in memory.
"""

from __future__ import annotations

import json
import re
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
    if body.count(b"[") + body.count(b"{") > max_depth and _too_deep(bytes(body), max_depth):
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


_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")
_RUN = re.compile(rb"\[+|\]+")


def _too_deep(body: bytes, max_depth: int) -> bool:
    """Whether valid JSON text nests arrays and objects more than ``max_depth`` levels deep.

    Read from the text, in time linear in its size whatever its shape (walking the parsed
    value took seconds for 10 MiB of small or deeply nested containers). Escaped backslashes
    and quotes go, then all but quotes and brackets, then strings (what lies between quotes).
    Each removal of the ``[]`` pairs left then strips one level (the innermost pairs);
    once a pass gains little, the depth of what remains is counted over runs of brackets.
    """
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    text = b"".join(text.split(b'"')[::2]).translate(_ONE_BRACKET)
    removed = 0
    while removed < max_depth:
        shorter = text.replace(b"[]", b"")
        removed += 1
        if not shorter:
            return False
        gained = len(text) - len(shorter)
        text = shorter
        if gained * 32 < len(text):  # few pairs per pass: counting runs is cheaper now
            break
    depth, limit = 0, max_depth - removed
    for run in _RUN.finditer(text):
        if text[run.start()] == 0x5B:  # "["
            depth += run.end() - run.start()
            if depth > limit:
                return True
        else:
            depth -= run.end() - run.start()
    return False


def _too_large(limit: int, size: int | None = None) -> HTTPError:
    shown = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return HTTPError(413, f"Decompressed request size ({shown}) exceeds maximum ({limit} bytes)")


def _gunzip(body: bytes, limit: int) -> bytes:
    """Every gzip member of ``body`` (RFC 1952 2.2), as ``gzip.decompress`` reads them; bytes
    after a member that do not start another one are invalid."""
    out = bytearray()
    try:
        rest = _inflate_member(body, out, limit)
        while rest:
            if not rest.startswith(b"\x1f\x8b"):
                raise HTTPError(400, "Invalid compressed data: trailing bytes after gzip stream")
            rest = _inflate_member(rest, out, limit)
    except zlib.error as exc:
        raise HTTPError(400, f"Invalid compressed data: {exc}") from None
    return bytes(out)


def _inflate_member(data: bytes, out: bytearray, limit: int) -> bytes:
    """Inflate the gzip member ``data`` starts with into ``out``, 64 KiB at a time, refusing
    output past ``limit``; return the bytes after it.

    The loop ends on the member's end (``eof``), not on an empty ``unconsumed_tail``: once a
    member ends in a call capped by ``max_length``, zlib leaves the bytes after it in the tail
    as well as in ``unused_data``, and every later call returns nothing (a request of a few
    hundred bytes kept the event loop spinning for good).
    """
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    while not inflater.eof:
        chunk = inflater.decompress(data, _CHUNK)
        out += chunk
        if len(out) > limit:
            raise _too_large(limit)
        tail = inflater.unconsumed_tail
        if not chunk and len(tail) == len(data):  # no input taken, no output given
            break
        data = tail
    if not inflater.eof:
        raise HTTPError(400, "Invalid compressed data: truncated gzip stream")
    return inflater.unused_data


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

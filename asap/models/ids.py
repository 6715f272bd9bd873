"""Identifiers: ULIDs (spec 1.2) and W3C trace/span ids (spec 6.3)."""

from __future__ import annotations

import os
import time

__all__ = ["generate_id", "generate_span_id", "generate_task_id", "generate_trace_id"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FIVE_BITS = bytes.maketrans(bytes(range(256)), bytes(ord(_CROCKFORD[b % 32]) for b in range(256)))
"""Any byte to the Crockford character of its low 5 bits (256 is a multiple of 32, so a
uniform byte gives a uniform character)."""
_stamp: tuple[int, str] = (-1, "")


def _time_part(milliseconds: int) -> str:
    """The 10 characters of a ULID's 48-bit timestamp (computed once per millisecond)."""
    global _stamp
    if _stamp[0] != milliseconds:
        chars = [_CROCKFORD[(milliseconds >> shift) & 31] for shift in range(45, -1, -5)]
        _stamp = (milliseconds, "".join(chars))
    return _stamp[1]


def generate_id() -> str:
    """Return a new ULID: 26 characters of Crockford base32, sortable by creation time
    (48 bits of milliseconds, then 80 random bits, 5 from each of 16 random bytes)."""
    prefix = _time_part(time.time_ns() // 1_000_000)
    return prefix + os.urandom(16).translate(_FIVE_BITS).decode()


def generate_task_id() -> str:
    """Return a task id as the reference forms it: ``task_`` + ULID (spec 3.4)."""
    return "task_" + generate_id()


def generate_trace_id() -> str:
    """Return a W3C trace id: 32 lowercase hex characters."""
    return os.urandom(16).hex()


def generate_span_id() -> str:
    """Return a W3C span id: 16 lowercase hex characters."""
    return os.urandom(8).hex()

"""Identifiers: ULIDs (spec 1.2) and W3C trace/span ids (spec 6.3)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator

__all__ = ["generate_id", "generate_span_id", "generate_task_id", "generate_trace_id"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FIVE_BITS = bytes.maketrans(bytes(range(256)), bytes(ord(_CROCKFORD[b % 32]) for b in range(256)))
"""Any byte to the Crockford character of its low 5 bits (256 is a multiple of 32, so a
uniform byte gives a uniform character)."""
_stamp: tuple[int, str] = (-1, "")


class _RandomBytes:
    """Bytes from ``os.urandom``, read 4 KiB at a time: a request needs five random values,
    and on a virtual machine each ``getrandom`` system call costs several microseconds.

    Thread-safe without a lock on the common path: each take gets its own 16-byte slot of the
    buffer from an ``itertools.count`` (whose ``next`` the GIL makes atomic); only a refill
    takes the lock. A forked child starts with a fresh buffer (it must not hand out the ids
    its parent does)."""

    SIZE = 4096
    SLOT = 16
    """Bytes per take, at most."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # new in a child: another thread may have held it
        self._pool: tuple[bytes, Iterator[int]] = (b"", itertools.count())

    def take(self, n: int) -> bytes:
        """``n`` (at most :attr:`SLOT`) random bytes no other take gets."""
        buffer, slots = self._pool
        start = next(slots) * self.SLOT
        if start + n <= len(buffer):
            return buffer[start : start + n]
        with self._lock:  # this buffer is used up: the first taker here reads another
            if self._pool[0] is buffer:
                self._pool = (os.urandom(self.SIZE), itertools.count(1))
                return self._pool[0][:n]
        return self.take(n)


_random = _RandomBytes()


_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
"""The two characters of every 10-bit value."""


def _time_part(milliseconds: int) -> tuple[int, str]:
    """A millisecond and the 10 characters of its 48-bit ULID timestamp (kept as
    ``_stamp``: computed once per millisecond)."""
    global _stamp
    text = "".join([_PAIRS[(milliseconds >> shift) & 1023] for shift in (40, 30, 20, 10, 0)])
    _stamp = (milliseconds, text)
    return _stamp


def generate_id() -> str:
    """Return a new ULID: 26 characters of Crockford base32, sortable by creation time
    (48 bits of milliseconds, then 80 random bits, 5 from each of 16 random bytes)."""
    milliseconds = time.time_ns() // 1_000_000
    stamp = _stamp if _stamp[0] == milliseconds else _time_part(milliseconds)
    return stamp[1] + _random.take(16).translate(_FIVE_BITS).decode()


def generate_task_id() -> str:
    """Return a task id as the reference forms it: ``task_`` + ULID (spec 3.4)."""
    return "task_" + generate_id()


def generate_trace_id() -> str:
    """Return a W3C trace id: 32 lowercase hex characters."""
    return _random.take(16).hex()


def generate_span_id() -> str:
    """Return a W3C span id: 16 lowercase hex characters."""
    return _random.take(8).hex()

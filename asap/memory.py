"""Give memory back to the system after large requests (glibc only; elsewhere a no-op).

A 10 MiB body, or an envelope of a million small objects, is freed once answered, but glibc
keeps the pages: its threshold for serving a block with its own ``mmap`` rises after large
frees (up to 32 MiB), so later large blocks come from the heap, whose free pages stay
resident. Hostile input then leaves an agent 100 MB bigger for good. :func:`tune` fixes the
threshold at 128 KiB (large blocks are mapped and unmapped) and :func:`trim`, run by the
agent every few seconds, returns free heap pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

__all__ = ["trim", "tune"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGE = 128 * 1024


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only, not musl)
        return libc
    except (OSError, AttributeError):
        return None


_libc = _glibc()


def tune() -> bool:
    """Serve blocks of 128 KiB and more with their own mappings, and trim the heap top above
    128 KiB of free space. True when applied."""
    if _libc is None:
        return False
    return bool(_libc.mallopt(_M_MMAP_THRESHOLD, _LARGE)) and bool(
        _libc.mallopt(_M_TRIM_THRESHOLD, _LARGE)
    )


def trim() -> None:
    """Return free pages of the heap to the system."""
    if _libc is not None:
        _libc.malloc_trim(0)

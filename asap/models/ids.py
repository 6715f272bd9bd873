"""Identifiers: ULIDs (spec 1.2) and W3C trace/span ids (spec 6.3)."""

from __future__ import annotations

import os

from ulid import ULID

__all__ = ["generate_id", "generate_span_id", "generate_task_id", "generate_trace_id"]


def generate_id() -> str:
    """Return a new ULID: 26 characters of Crockford base32, sortable by creation time."""
    return str(ULID())


def generate_task_id() -> str:
    """Return a task id as the reference forms it: ``task_`` + ULID (spec 3.4)."""
    return "task_" + str(ULID())


def generate_trace_id() -> str:
    """Return a W3C trace id: 32 lowercase hex characters."""
    return os.urandom(16).hex()


def generate_span_id() -> str:
    """Return a W3C span id: 16 lowercase hex characters."""
    return os.urandom(8).hex()

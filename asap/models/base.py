"""Base model shared by every protocol model (spec 1.1).

Protocol models are frozen, reject unknown keys, and serialize every field (nulls included),
exactly as the reference does. Timestamps are written in UTC with a ``Z`` suffix.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer

__all__ = ["ASAPBaseModel", "UTCDateTime", "format_timestamp", "utc_now", "utc_timestamp"]


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def format_timestamp(value: datetime) -> str:
    """Format a datetime the way the reference does (spec 1.2).

    UTC values get ``Z`` and microseconds, with the fraction dropped when it is zero; naive values
    count as UTC; any other offset is written as given.
    """
    if value.tzinfo is UTC:  # the usual case, 3x faster
        return value.isoformat()[:-6] + "Z"
    offset = value.utcoffset()
    if offset is None or offset.total_seconds() == 0:
        text = value.replace(tzinfo=None).isoformat()
        return text + "Z"
    return value.isoformat()


_second: tuple[int, str] = (-1, "")


def utc_timestamp() -> str:
    """The current time as :func:`format_timestamp` writes it, without a datetime (the text
    of the second is kept: a reply envelope needs one, and formatting a datetime costs more
    than the rest of its fields)."""
    global _second
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    if _second[0] != seconds:
        _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{_second[1]}.{micros:06d}Z" if micros else _second[1] + "Z"


UTCDateTime = Annotated[datetime, PlainSerializer(format_timestamp, return_type=str)]
"""A datetime that serializes as spec 1.2 prescribes."""


class ASAPBaseModel(BaseModel):
    """Frozen, strict-keys base of every protocol model (spec 1.1)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        validate_default=True,
        use_enum_values=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON-ready dict this model puts on the wire (every field, nulls included)."""
        return self.model_dump(mode="json", by_alias=True)

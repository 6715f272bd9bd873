"""Request rate limits, ``"10/second;100/minute"`` style (spec 3.10).

Fixed windows per key, kept in memory with a bounded number of keys. A request is charged
against every window of the limit; the first window that is full answers with the seconds
until it resets.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from asap.errors import ConfigurationError

__all__ = ["RateLimit", "RateLimiter", "parse_rate_limit", "retry_after"]

_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_ITEM = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d*)\s*(second|minute|hour|day)s?\s*$")


@dataclass(frozen=True)
class RateLimit:
    """``count`` requests per ``seconds``; ``text`` is how the reply names it."""

    count: int
    seconds: int
    text: str


def retry_after(limit: RateLimit, now: float) -> int:
    """Whole seconds (at least 1) until the window of ``limit`` that holds ``now`` ends."""
    return max(1, math.ceil((int(now // limit.seconds) + 1) * limit.seconds - now))


OFF = frozenset({"off", "none", "unlimited"})


def parse_rate_limit(spec: str) -> list[RateLimit]:
    """Parse ``"10/second;100/minute"`` (also ``"5 per 2 minutes"``); ``off`` is no limit
    (an empty list)."""
    if spec.strip().lower() in OFF:
        return []
    limits = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        match = _ITEM.match(part)
        if match is None:
            raise ConfigurationError(
                f"ASAP_RATE_LIMIT: cannot parse {part!r}; use e.g. '100/second;5000/minute'"
            )
        count, multiple, unit = int(match[1]), int(match[2] or 1), match[3]
        if count < 1 or multiple < 1:
            raise ConfigurationError(f"ASAP_RATE_LIMIT: {part!r} must be positive")
        limits.append(RateLimit(count, multiple * _UNITS[unit], f"{count} per {multiple} {unit}"))
    if not limits:
        raise ConfigurationError("ASAP_RATE_LIMIT is empty")
    return limits


class RateLimiter:
    """Counts hits per key in fixed windows; ``clock`` is injectable for tests."""

    def __init__(
        self,
        limits: list[RateLimit],
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[tuple[str, int, int], tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"RateLimiter({'; '.join(limit.text for limit in self.limits)})"

    def hit(
        self, key: str, cost: int = 1, limits: list[RateLimit] | None = None
    ) -> tuple[int, RateLimit] | None:
        """Charge ``cost`` hits to ``key`` (under ``limits``, default this limiter's); return
        (retry-after seconds, limit) when refused. A refused request is not charged."""
        now = self.clock()
        updates = []
        for limit in self.limits if limits is None else limits:
            window = int(now // limit.seconds)
            slot = (key, limit.seconds, limit.count)
            start, used = self._windows.get(slot, (window, 0))
            if start != window:
                start, used = window, 0
            if used + cost > limit.count:
                return retry_after(limit, now), limit
            updates.append((slot, (start, used + cost)))
        if len(self._windows) > self.max_keys:
            self._prune(now)
        self._windows.update(updates)
        return None

    def _prune(self, now: float) -> None:
        self._windows = {
            slot: entry for slot, entry in self._windows.items() if entry[0] == now // slot[1]
        }
        if len(self._windows) > self.max_keys:  # still too many live keys: forget them all
            self._windows.clear()

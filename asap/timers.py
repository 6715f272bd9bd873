"""One event-loop timer for many callbacks: what task deadlines and idempotency heartbeats
share. Under load an agent has a deadline and often a heartbeat per request, nearly all of
which end before they are due; a timer each (``call_later``, ``asyncio.timeout``) cost more
than the rest of a short task's bookkeeping."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable

__all__ = ["Alarms"]


class Alarms:
    """Calls each callback set with :meth:`set` at its time unless :meth:`cancel` comes
    first, with one timer on the running loop, armed at the earliest time. An alarm cancelled
    early is just dropped: the timer, if armed for it, finds nothing due and re-arms."""

    def __init__(self) -> None:
        self._due: dict[Hashable, tuple[float, Callable[[], object]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def set(self, key: Hashable, delay: float, callback: Callable[[], object]) -> None:
        """Call ``callback()`` ``delay`` seconds from now (replacing ``key``'s alarm)."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        self._due[key] = (at, callback)
        if at < self._timer_at or self._timer_loop is not loop:
            self._arm(loop, at)

    def cancel(self, key: Hashable) -> None:
        """Drop ``key``'s alarm, if any."""
        self._due.pop(key, None)

    def __len__(self) -> int:
        return len(self._due)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None and self._timer_loop is loop:  # else a loop that ended
            self._timer.cancel()
        self._timer = loop.call_at(at, self._fire, loop)
        self._timer_at, self._timer_loop = at, loop

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now, earliest = loop.time(), math.inf
        for key, (at, callback) in list(self._due.items()):
            if at <= now:
                del self._due[key]
                callback()
            else:
                earliest = min(earliest, at)
        if earliest < self._timer_at:  # a callback may have set an earlier one meanwhile
            self._arm(loop, earliest)

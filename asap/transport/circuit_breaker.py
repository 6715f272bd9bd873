"""A circuit breaker per target: a transition table, an injected clock, no I/O.

States and transitions::

    CLOSED    --failure, count reaches threshold-->  OPEN
    CLOSED    --success-->                           CLOSED (count reset)
    OPEN      --attempt after reset_timeout-->       HALF_OPEN (one probe admitted)
    HALF_OPEN --success-->                           CLOSED
    HALF_OPEN --failure-->                           OPEN (timer restarted)

Invariants: while OPEN no call is admitted before ``reset_timeout`` has passed; in HALF_OPEN
exactly one probe is in flight at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["CircuitBreaker", "CircuitState", "TRANSITIONS"]


class CircuitState(StrEnum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TRANSITIONS: dict[tuple[CircuitState, str], CircuitState] = {
    (CircuitState.CLOSED, "success"): CircuitState.CLOSED,
    (CircuitState.CLOSED, "trip"): CircuitState.OPEN,
    (CircuitState.OPEN, "timeout"): CircuitState.HALF_OPEN,
    (CircuitState.HALF_OPEN, "success"): CircuitState.CLOSED,
    (CircuitState.HALF_OPEN, "failure"): CircuitState.OPEN,
}
"""(state, event) -> next state; events not listed leave the state unchanged."""


class CircuitBreaker:
    """Stop calling a target after ``threshold`` consecutive failures, for ``reset_timeout`` s."""

    def __init__(
        self,
        threshold: int = 5,
        reset_timeout: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState, CircuitState], None] | None = None,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        if reset_timeout <= 0:
            raise ValueError(f"reset_timeout must be positive, got {reset_timeout}")
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.on_change = on_change
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._probe_in_flight = False

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self.state.value}, failures={self.consecutive_failures}/"
            f"{self.threshold})"
        )

    def _move(self, event: str) -> None:
        new = TRANSITIONS.get((self.state, event), self.state)
        if new is not self.state:
            old, self.state = self.state, new
            if self.on_change is not None:
                self.on_change(old, new)

    def can_attempt(self) -> bool:
        """Whether a call may go out now (in HALF_OPEN this admits the single probe)."""
        if self.state is CircuitState.OPEN:
            assert self.opened_at is not None
            if self.clock() - self.opened_at < self.reset_timeout:
                return False
            self._move("timeout")
        if self.state is CircuitState.HALF_OPEN:
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        return True

    def retry_after(self) -> float:
        """Seconds until an open circuit admits a probe (0 when it already would)."""
        if self.state is not CircuitState.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.reset_timeout - (self.clock() - self.opened_at))

    def release(self) -> None:
        """The call ended without telling anything about the target (e.g. it was cancelled)."""
        self._probe_in_flight = False

    def record_success(self) -> None:
        """The call succeeded: close the circuit and forget earlier failures."""
        self._probe_in_flight = False
        self.consecutive_failures = 0
        self._move("success")

    def record_failure(self) -> None:
        """The call failed: count it, and open the circuit at the threshold."""
        self._probe_in_flight = False
        self.consecutive_failures += 1
        if self.state is CircuitState.HALF_OPEN:
            self.opened_at = self.clock()
            self._move("failure")
        elif self.state is CircuitState.CLOSED and self.consecutive_failures >= self.threshold:
            self.opened_at = self.clock()
            self._move("trip")

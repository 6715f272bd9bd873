"""Run each idempotent request once (spec pitfall 7; the reference ignores the key).

A request's key is ``config.idempotency_key``, else ``params.idempotency_key``, else the
``X-Idempotency-Key`` header, scoped by sender. The first request with a key runs; a later one
gets the stored outcome; one that arrives while the first is still running waits for it. A key
reused for a different request is refused rather than answered with another request's result.

:class:`IdempotencyStore` is the interface; :class:`MemoryIdempotencyStore` keeps records in
one process, bounded by a TTL and an entry cap (oldest evicted first).
"""

from __future__ import annotations

import asyncio
import copy
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from asap.errors import ASAPError, InvalidParamsError
from asap.timers import Alarms

__all__ = [
    "IdempotencyRecord",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "Heartbeat",
    "Heartbeats",
    "SharedIdempotencyStore",
    "key_reused",
]


@dataclass(frozen=True)
class IdempotencyRecord:
    """The stored outcome of a request: what its reply carried."""

    fingerprint: str
    task_id: str
    status: str
    result: dict[str, Any] | None


def key_reused(key: str) -> InvalidParamsError:
    """The error for a key that already belongs to a different request."""
    return InvalidParamsError(
        {
            "error": "Idempotency key reused for a different request",
            "idempotency_key": key,
        }
    )


class IdempotencyStore(ABC):
    """Where outcomes of idempotent requests live."""

    @abstractmethod
    async def run_once(
        self,
        key: str,
        fingerprint: str,
        compute: Callable[[], Awaitable[IdempotencyRecord]],
    ) -> tuple[IdempotencyRecord, bool]:
        """Return the outcome for ``key`` and whether it is a replay.

        Runs ``compute`` only if no outcome is stored or being computed; a concurrent caller
        waits for the one running. Raises :func:`key_reused` when ``fingerprint`` differs.
        If ``compute`` raises, nothing is stored and waiters compete to run it again.
        """


@dataclass
class _Entry:
    fingerprint: str
    expires: float
    record: IdempotencyRecord | None = None
    running: asyncio.Future[IdempotencyRecord] | None = None


class MemoryIdempotencyStore(IdempotencyStore):
    """Records in this process, at most ``max_entries``, each kept ``ttl`` seconds."""

    def __init__(
        self,
        ttl: float = 3600.0,
        max_entries: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be positive and max_entries at least 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.running is None and entry.expires <= self.clock():
            del self._entries[key]
            return None
        return entry

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries:
            oldest_key = next(iter(self._entries))
            if self._entries[oldest_key].running is not None:
                self._entries.move_to_end(oldest_key)  # never drop a request in flight
                if all(e.running is not None for e in self._entries.values()):
                    return
                continue
            del self._entries[oldest_key]

    async def run_once(
        self,
        key: str,
        fingerprint: str,
        compute: Callable[[], Awaitable[IdempotencyRecord]],
    ) -> tuple[IdempotencyRecord, bool]:
        while True:
            entry = self._get(key)
            if entry is None:
                break
            if entry.fingerprint != fingerprint:
                raise key_reused(key)
            if entry.record is not None:
                return _copy(entry.record), True
            assert entry.running is not None
            try:
                return _copy(await asyncio.shield(entry.running)), True
            except Exception:
                continue  # the first run failed: try again (one waiter will run it)
        future: asyncio.Future[IdempotencyRecord] = asyncio.get_running_loop().create_future()
        entry = _Entry(fingerprint, self.clock() + self.ttl, running=future)
        self._entries[key] = entry
        try:
            record = await compute()
        except BaseException as exc:
            if self._entries.get(key) is entry:
                del self._entries[key]
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            future.exception()  # mark retrieved: waiters may not exist
            raise
        entry.record, entry.running = record, None
        entry.expires = self.clock() + self.ttl
        future.set_result(record)
        self._evict()
        return _copy(record), False


def _copy(record: IdempotencyRecord) -> IdempotencyRecord:
    """A copy the caller may change without changing what is stored."""
    return replace(record, result=copy.deepcopy(record.result))


def warn(event: str, **values: Any) -> None:
    """Log a warning of the idempotency stores (looked up here: importing configures nothing)."""
    from asap.observability.logging import get_logger

    get_logger("asap.idempotency").warning(event, **values)


class Heartbeats:
    """Keeps the running claims of one shared store alive: each is extended (its ``extend``
    called) every ``period`` seconds until it ends, with one timer for all of them
    (:class:`~asap.timers.Alarms`). Nearly every computation ends before its first beat, so
    a claim costs a dictionary entry rather than a timer of its own; each beat runs as a
    task."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._alarms = Alarms()

    def start(self, key: str, extend: Callable[[], Awaitable[object]]) -> Heartbeat:
        """Begin extending a claim; stop with :meth:`Heartbeat.stop` or ``cancel``."""
        beat = Heartbeat(self._alarms, self.period, key, extend)
        beat.wait()
        return beat


class Heartbeat:
    """One claim kept alive by :class:`Heartbeats`."""

    __slots__ = ("_alarms", "_extend", "_period", "_stopped", "key", "task")

    def __init__(
        self, alarms: Alarms, period: float, key: str, extend: Callable[[], Awaitable[object]]
    ) -> None:
        self._alarms, self._period, self.key, self._extend = alarms, period, key, extend
        self.task: asyncio.Task[None] | None = None
        self._stopped = False

    def wait(self) -> None:
        """Beat ``period`` seconds from now."""
        self._alarms.set(self, self._period, self._beat)

    def _beat(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._extend()
        except ASAPError as exc:  # storage trouble: the next beat may get through
            warn("idempotency_heartbeat_failed", key=self.key, error=str(exc))
        self.task = None
        if not self._stopped:
            self.wait()

    def cancel(self) -> None:
        """Stop beating (a beat in flight is cancelled)."""
        self._stopped = True
        self._alarms.cancel(self)
        if self.task is not None:
            self.task.cancel()

    async def stop(self) -> None:
        """Stop beating and wait until a beat in flight has ended."""
        task = self.task
        self.cancel()
        if task is not None:
            await asyncio.wait([task])


@dataclass
class _Running:
    """A key this process is working on: duplicates from this process wait on ``future``."""

    fingerprint: str
    future: asyncio.Future[IdempotencyRecord]


class SharedIdempotencyStore(IdempotencyStore):
    """Base of the stores other processes share (SQLite, Redis).

    Duplicates inside this process wait on the first caller's future; the first caller runs
    :meth:`_lead`, the backend's claim-compute-or-poll protocol across processes.
    """

    takeover: float
    """Seconds after which the claim of a runner that stopped its heartbeat may be taken."""

    def __init__(self) -> None:
        self._running: dict[str, _Running] = {}

    async def run_once(
        self,
        key: str,
        fingerprint: str,
        compute: Callable[[], Awaitable[IdempotencyRecord]],
    ) -> tuple[IdempotencyRecord, bool]:
        while (local := self._running.get(key)) is not None:
            if local.fingerprint != fingerprint:
                raise key_reused(key)
            try:
                return _copy(await asyncio.shield(local.future)), True
            except Exception:
                continue  # that run failed: compete to run it again
        future: asyncio.Future[IdempotencyRecord] = asyncio.get_running_loop().create_future()
        local = _Running(fingerprint, future)
        self._running[key] = local
        try:
            record, replay = await self._lead(key, fingerprint, compute)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            future.exception()  # mark retrieved: there may be no waiter
            raise
        finally:
            if self._running.get(key) is local:
                del self._running[key]
        future.set_result(record)
        return record, replay

    @abstractmethod
    async def _lead(
        self, key: str, fingerprint: str, compute: Callable[[], Awaitable[IdempotencyRecord]]
    ) -> tuple[IdempotencyRecord, bool]:
        """Claim ``key`` across processes and compute, or wait for the claimant's outcome."""

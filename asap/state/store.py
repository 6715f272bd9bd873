"""Durable state: snapshots (spec 5), task records and idempotency records, behind small ABCs.

Backends are chosen by URL (``ASAP_STORAGE_URL``) in :func:`asap.state.open_storage`:
``memory://`` (this process only), ``sqlite:///path`` (the default: a local file, no server)
and ``redis://host:port/db`` (shared by every worker and host). Each backend implements all
three stores and the same contract (``tests/state/test_contract.py``).

Contract, for every backend:
- stores hand out copies: changing a returned object never changes what is stored;
- snapshot versions are monotonic per task; :meth:`SnapshotStore.append` allocates the next
  version atomically, even across processes; :meth:`SnapshotStore.save` never overwrites an
  existing version (it raises :class:`SnapshotConflictError`);
- task updates are compare-and-set on the status (:meth:`TaskStore.update` with
  ``expect``), so two workers cannot both move a task, and the spec 2.3 transitions hold;
- finished tasks are kept until purged (:meth:`TaskStore.purge`, oldest first; the agent's
  lease loop calls :meth:`Storage.purge_finished` with ``ASAP_TASK_RETENTION_SECONDS``);
- no call blocks the event loop;
- stored data is JSON (tuples come back as lists; sets and non-string keys are refused by the
  durable backends).
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import orjson

from asap.errors import ASAPError
from asap.models.entities import StateSnapshot
from asap.models.enums import TaskStatus, can_transition
from asap.models.ids import generate_id
from asap.transport.idempotency import IdempotencyStore, MemoryIdempotencyStore
from asap.transport.ratelimit import RateLimit, RateLimiter

__all__ = [
    "PURGE_BATCH",
    "GuardStore",
    "MemoryGuardStore",
    "MemorySnapshotStore",
    "MemoryTaskStore",
    "SnapshotConflictError",
    "SnapshotStore",
    "Storage",
    "StorageError",
    "TaskRecord",
    "TaskStore",
]


PURGE_BATCH = 1000
"""Finished tasks deleted per :meth:`TaskStore.purge` call by :meth:`Storage.purge_finished`."""


class StorageError(ASAPError):
    """A storage backend failed (its own exception is the ``__cause__``)."""

    code = "asap:resource/storage_error"
    rpc_code = -32040


class SnapshotConflictError(StorageError):
    """A snapshot with this task id and version already exists."""


class SnapshotStore(ABC):
    """Versioned snapshots of task state (spec 5, async)."""

    @abstractmethod
    async def save(self, snapshot: StateSnapshot) -> None:
        """Store ``snapshot`` under its own version; raise :class:`SnapshotConflictError` if
        that version exists."""

    @abstractmethod
    async def append(
        self, task_id: str, data: dict[str, Any], *, checkpoint: bool = False
    ) -> StateSnapshot:
        """Store ``data`` as the task's next version (latest + 1, or 1) and return it."""

    @abstractmethod
    async def get(self, task_id: str, version: int | None = None) -> StateSnapshot | None:
        """A version, or the latest (highest) when ``version`` is None; None if absent."""

    async def get_by_id(self, task_id: str, snapshot_id: str) -> StateSnapshot | None:
        """The task's snapshot whose ``id`` is ``snapshot_id``, or None."""
        for version in reversed(await self.list_versions(task_id)):
            snapshot = await self.get(task_id, version)
            if snapshot is not None and snapshot.id == snapshot_id:
                return snapshot
        return None

    @abstractmethod
    async def list_versions(self, task_id: str) -> list[int]:
        """The task's versions, ascending."""

    @abstractmethod
    async def delete(self, task_id: str, version: int | None = None) -> bool:
        """Delete one version, or all when ``version`` is None; whether anything was deleted."""

    async def delete_many(self, task_ids: list[str]) -> None:
        """Delete every snapshot of these tasks (one statement or round trip where the
        backend allows)."""
        for task_id in task_ids:
            await self.delete(task_id)


@dataclass
class TaskRecord:
    """A task as the server tracks it (spec 2.3 statuses), with what is needed to resume it."""

    id: str
    conversation_id: str
    skill_id: str
    sender: str
    status: TaskStatus
    request: dict[str, Any]
    """The request envelope as received (wire form): enough to run the task again. Empty
    once the task has finished (nothing runs it again), and in a record not stored yet."""
    result: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    owner: str | None = None
    """The agent instance running it."""
    lease_until: float | None = None
    """Unix time until which ``owner`` holds it; past that another instance may take over."""
    cancel_requested: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (status as its string); shares its values with the record."""
        data = dict(vars(self))
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        """Inverse of :meth:`to_dict` (shares the values of ``data``)."""
        values = dict(data)
        values["status"] = TaskStatus(values["status"])
        return cls(**values)

    def copy(self) -> TaskRecord:
        """A deep copy: changing it does not change this record."""
        return copy.deepcopy(self)


class TaskStore(ABC):
    """Task records. Updates are compare-and-set on the status."""

    @abstractmethod
    async def create(self, record: TaskRecord) -> None:
        """Store a new task; raise :class:`StorageError` if the id exists."""

    async def create_many(self, records: list[TaskRecord]) -> None:
        """Store several new tasks (one transaction where the backend has them); an id that is
        already stored is left as it is."""
        for record in records:
            if await self.get(record.id) is None:
                await self.create(record)

    @abstractmethod
    async def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None."""

    @abstractmethod
    async def update(
        self, task_id: str, *, expect: frozenset[TaskStatus] | None = None, **changes: Any
    ) -> TaskRecord | None:
        """Apply ``changes`` atomically if the task exists and (when given) its status is in
        ``expect``; a ``status`` change must be a legal transition. Return the updated record,
        or None when nothing was applied. ``updated_at`` is set to now."""

    @abstractmethod
    async def expired(self, now: float) -> list[TaskRecord]:
        """Tasks submitted or working whose lease ended before ``now`` (their owner is gone)."""

    @abstractmethod
    async def claim(self, task_id: str, owner: str, lease_until: float, now: float) -> bool:
        """Atomically take over a submitted or working task whose lease ended before ``now``
        (set ``owner`` and ``lease_until``); True only for the one caller that got it."""

    @abstractmethod
    async def renew(self, task_ids: list[str], owner: str, lease_until: float) -> None:
        """Extend the lease of the tasks ``owner`` still holds."""

    @abstractmethod
    async def cancel_requested(self, task_ids: list[str]) -> list[str]:
        """Which of ``task_ids`` have a cancellation request."""

    @abstractmethod
    async def purge(self, finished_before: float, limit: int = 1000) -> list[str]:
        """Delete up to ``limit`` finished tasks (terminal status) whose ``updated_at`` (when
        they finished) is before ``finished_before``, oldest first; return their ids. Active
        tasks are never deleted, however old. Safe to run in several processes at once: each
        deleted id is returned by one of them. Snapshots are the caller's to delete
        (:meth:`SnapshotStore.delete_many`; :meth:`Storage.purge_finished` does both)."""


def check_transition(record: TaskRecord, changes: dict[str, Any]) -> None:
    """Raise ``InvalidTransitionError`` for an illegal status change (spec 2.3)."""
    new = changes.get("status")
    if new is not None and new != record.status and not can_transition(record.status, new):
        from asap.errors import InvalidTransitionError

        raise InvalidTransitionError(record.status.value, TaskStatus(new).value, record.id)


def apply_changes(
    record: TaskRecord, expect: frozenset[TaskStatus] | None, changes: dict[str, Any]
) -> TaskRecord | None:
    """``record`` with ``changes`` applied (a new object), or None when ``expect`` does not
    match. Unknown fields raise ``TypeError``; an illegal status change raises
    ``InvalidTransitionError`` (spec 2.3). Every backend's ``update`` goes through here."""
    if expect is not None and record.status not in expect:
        return None
    unknown = set(changes) - (set(TaskRecord.__dataclass_fields__) - {"id"})
    if unknown:
        raise TypeError(f"TaskStore.update: cannot change {sorted(unknown)}")
    changes = dict(changes)
    if "status" in changes:
        changes["status"] = TaskStatus(changes["status"])
    check_transition(record, changes)
    data = record.to_dict() | changes
    data["updated_at"] = time.time()
    return TaskRecord.from_dict(data)


def to_json(value: Any, what: str) -> str:
    """``value`` as JSON text; :class:`StorageError` when it has no JSON form."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:  # orjson.JSONEncodeError
        raise StorageError(f"{what} is not JSON-serializable: {exc}") from exc


def load_task(text: str | bytes) -> TaskRecord:
    """A task record from the JSON of its ``to_dict()`` (as every backend stores it)."""
    return TaskRecord.from_dict(orjson.loads(text))


def can_claim(record: TaskRecord, now: float) -> bool:
    """Whether the lease of a submitted or working task ended before ``now``."""
    return (
        record.status in (TaskStatus.SUBMITTED, TaskStatus.WORKING)
        and record.lease_until is not None
        and record.lease_until < now
    )


class MemorySnapshotStore(SnapshotStore):
    """Snapshots in this process (copies in and out)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[int, StateSnapshot]] = {}
        self._lock = asyncio.Lock()

    async def save(self, snapshot: StateSnapshot) -> None:
        async with self._lock:
            versions = self._data.setdefault(snapshot.task_id, {})
            if snapshot.version in versions:
                raise SnapshotConflictError(
                    f"Snapshot {snapshot.task_id} v{snapshot.version} already exists"
                )
            versions[snapshot.version] = snapshot.model_copy(deep=True)

    async def append(
        self, task_id: str, data: dict[str, Any], *, checkpoint: bool = False
    ) -> StateSnapshot:
        async with self._lock:
            versions = self._data.setdefault(task_id, {})
            snapshot = StateSnapshot(
                id=f"snap_{generate_id()}",
                task_id=task_id,
                version=max(versions, default=0) + 1,
                data=copy.deepcopy(data),
                checkpoint=checkpoint,
            )
            versions[snapshot.version] = snapshot
            return snapshot.model_copy(deep=True)

    async def get(self, task_id: str, version: int | None = None) -> StateSnapshot | None:
        versions = self._data.get(task_id) or {}
        if not versions:
            return None
        found = versions.get(max(versions) if version is None else version)
        return found.model_copy(deep=True) if found is not None else None

    async def list_versions(self, task_id: str) -> list[int]:
        return sorted(self._data.get(task_id) or {})

    async def delete(self, task_id: str, version: int | None = None) -> bool:
        async with self._lock:
            versions = self._data.get(task_id)
            if not versions:
                return False
            if version is None:
                del self._data[task_id]
                return True
            return versions.pop(version, None) is not None


class MemoryTaskStore(TaskStore):
    """Task records in this process, kept as JSON: a copy in or out is one orjson call, and
    the day of finished records kept by default is one string per task, which the garbage
    collector does not walk (as live objects, each full collection over them paused
    the agent for tens of milliseconds under load)."""

    def __init__(self) -> None:
        self._tasks: dict[str, str] = {}
        self._finished: list[tuple[float, str]] = []
        """Heap of (updated_at, id) of every terminal record written, for :meth:`purge`
        (an entry whose record changed or went since is skipped there)."""
        self._active: set[str] = set()
        """Ids of the records not finished: what :meth:`expired` looks through."""

    def _put(self, record: TaskRecord) -> None:
        self._tasks[record.id] = to_json(record.to_dict(), "task record")
        if record.status.is_terminal():
            self._active.discard(record.id)
            heapq.heappush(self._finished, (record.updated_at, record.id))
        else:
            self._active.add(record.id)

    def _load(self, task_id: str) -> TaskRecord | None:
        text = self._tasks.get(task_id)
        return load_task(text) if text is not None else None

    async def create(self, record: TaskRecord) -> None:
        if record.id in self._tasks:
            raise StorageError(f"Task {record.id} already exists")
        self._put(record)

    async def get(self, task_id: str) -> TaskRecord | None:
        return self._load(task_id)

    async def update(
        self, task_id: str, *, expect: frozenset[TaskStatus] | None = None, **changes: Any
    ) -> TaskRecord | None:
        record = self._load(task_id)
        updated = apply_changes(record, expect, changes) if record is not None else None
        if updated is None:
            return None
        self._put(updated)
        return updated

    async def expired(self, now: float) -> list[TaskRecord]:
        records = (self._load(task_id) for task_id in self._active)
        return [r for r in records if r is not None and can_claim(r, now)]

    async def claim(self, task_id: str, owner: str, lease_until: float, now: float) -> bool:
        record = self._load(task_id)
        if record is None or not can_claim(record, now):
            return False
        record.owner, record.lease_until, record.updated_at = owner, lease_until, time.time()
        self._put(record)
        return True

    async def renew(self, task_ids: list[str], owner: str, lease_until: float) -> None:
        for task_id in task_ids:
            record = self._load(task_id)
            if record is not None and record.owner == owner and not record.status.is_terminal():
                record.lease_until = lease_until
                self._put(record)

    async def cancel_requested(self, task_ids: list[str]) -> list[str]:
        return [t for t in task_ids if (r := self._load(t)) is not None and r.cancel_requested]

    async def purge(self, finished_before: float, limit: int = 1000) -> list[str]:
        heap = self._finished
        purged: list[str] = []
        while heap and heap[0][0] < finished_before and len(purged) < limit:
            updated_at, task_id = heapq.heappop(heap)
            record = self._load(task_id)
            if record is not None and record.updated_at == updated_at:  # else a stale entry
                del self._tasks[task_id]
                purged.append(task_id)
        return purged


class GuardStore(ABC):
    """Short-lived records of the security layer: replay nonces and rate-limit windows."""

    @abstractmethod
    async def use_nonce(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; False when it is already recorded (a replay)."""

    @abstractmethod
    async def charge(
        self, key: str, limits: list[RateLimit], cost: int = 1
    ) -> tuple[int, RateLimit] | None:
        """Charge ``cost`` requests to ``key`` in every window of ``limits``; when one is
        full, charge nothing and return (seconds until it resets, that limit)."""


class MemoryGuardStore(GuardStore):
    """Nonces and rate windows of this process only (bounded: the oldest nonces go first;
    the timestamp window rejects replays older than it anyway)."""

    def __init__(self, max_nonces: int = 1_000_000) -> None:
        self.max_nonces = max_nonces
        self._nonces: dict[str, float] = {}  # insertion order = expiry order (one TTL)
        self._limiter = RateLimiter([])

    async def use_nonce(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        nonces = self._nonces
        stale: list[str] = []
        for old, expires in itertools.islice(nonces.items(), 64):  # expire from the front
            if expires > now and len(nonces) - len(stale) < self.max_nonces:
                break
            stale.append(old)
        for old in stale:
            del nonces[old]
        known = nonces.get(key)
        if known is not None and known > now:
            return False
        nonces.pop(key, None)
        nonces[key] = now + ttl
        return True

    async def charge(
        self, key: str, limits: list[RateLimit], cost: int = 1
    ) -> tuple[int, RateLimit] | None:
        return self._limiter.hit(key, cost, limits)


@dataclass
class Storage:
    """The stores of one backend, opened and closed together."""

    url: str
    snapshots: SnapshotStore
    tasks: TaskStore
    idempotency: IdempotencyStore
    shared: bool = False
    """True when other hosts see the same state (Redis). Processes on one host also share
    a SQLite file."""
    guard: GuardStore = field(default_factory=MemoryGuardStore)
    """Replay nonces and rate-limit windows; shared like the rest except that the SQLite
    backend counts rates per process (a write per request would cost more than it saves)."""

    async def purge_finished(
        self, finished_before: float, *, batch: int = PURGE_BATCH, max_batches: int = 10
    ) -> list[str]:
        """Delete the tasks that finished before ``finished_before`` and their snapshots, in
        batches of ``batch`` (:meth:`TaskStore.purge`) until one comes back short, at most
        ``max_batches`` of them (the rest waits for the next call); the ids deleted."""
        purged: list[str] = []
        for _ in range(max_batches):
            ids = await self.tasks.purge(finished_before, batch)
            if ids:
                await self.snapshots.delete_many(ids)
            purged += ids
            if len(ids) < batch:
                break
        return purged

    async def aclose(self) -> None:
        """Release connections and threads."""
        for store in (self.snapshots, self.tasks, self.idempotency):
            closer = getattr(store, "aclose", None)
            if closer is not None:
                await closer()


def memory_storage(url: str = "memory://", **options: Any) -> Storage:
    """Everything in this process; lost when it exits."""
    return Storage(
        url,
        MemorySnapshotStore(),
        MemoryTaskStore(),
        MemoryIdempotencyStore(
            options.get("idempotency_ttl", 3600.0), options.get("idempotency_max_entries", 10_000)
        ),
    )

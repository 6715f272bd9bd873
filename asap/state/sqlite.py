"""SQLite backend: the three stores in one local file (``sqlite:///path``), standard library only.

Every statement runs on one dedicated thread per :class:`~asap.state.store.Storage`, on one
connection created in that thread, so the event loop never waits on the disk. Several processes
may share a file: WAL lets readers run beside the writer, and each multi-step write is one
``BEGIN IMMEDIATE`` transaction (the write lock is taken before reading), which makes
``append``, ``update``, ``claim`` and the idempotency claim atomic across processes.

The ``snapshots`` table has the columns of spec 5, but a save never overwrites a version.
Task rows keep status, owner, lease and cancellation in columns (for the queries) beside the
whole record as JSON. An idempotency row is the claim on its key: ``pending`` while its runner
computes (kept alive by a heartbeat, so a row whose ``expires`` passed belongs to a runner that
died), then ``done`` with the outcome until its TTL ends.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson

from asap.errors import ConfigurationError
from asap.models.base import utc_now
from asap.models.entities import StateSnapshot
from asap.models.enums import TaskStatus
from asap.models.ids import generate_id
from asap.state.store import (
    SnapshotConflictError,
    SnapshotStore,
    Storage,
    StorageError,
    TaskRecord,
    TaskStore,
    check_transition,
)
from asap.transport.idempotency import IdempotencyRecord, IdempotencyStore, key_reused

__all__ = ["SQLiteIdempotencyStore", "SQLiteSnapshotStore", "SQLiteTaskStore", "sqlite_storage"]

P = ParamSpec("P")
T = TypeVar("T")

OPTIONS = frozenset(
    {"busy_timeout", "idempotency_ttl", "idempotency_takeover", "idempotency_max_entries"}
)
"""Options :func:`sqlite_storage` accepts (``idempotency_max_entries`` is the memory backend's
and ignored here: rows are bounded by their TTL)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    task_id TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL,
    checkpoint INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
    PRIMARY KEY (task_id, version));
CREATE INDEX IF NOT EXISTS snapshots_by_id ON snapshots (task_id, id);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, owner TEXT, lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_lease ON tasks (status, lease_until);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    token TEXT, record TEXT, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires);
"""

ACTIVE = ("submitted", "working")
POLL_FIRST, POLL_MAX = 0.01, 0.2
"""Seconds between two looks at a key another process is computing (doubling)."""
CHUNK = 500
"""Ids per ``IN (...)``: below SQLite's oldest limit on bound parameters (999)."""


def database_path(url: str) -> str:
    """The file (or ``:memory:``) a ``sqlite:///relative``, ``sqlite:////abs`` URL names."""
    prefix = "sqlite:///"
    path = url[len(prefix) :].split("?", 1)[0] if url.startswith(prefix) else ""
    if not path:
        raise ConfigurationError(
            f"ASAP_STORAGE_URL: {url!r} names no SQLite file; use sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db or sqlite:///:memory:"
        )
    return path


def to_json(value: Any, what: str) -> str:
    """``value`` as JSON text; :class:`StorageError` when it has no JSON form."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:  # orjson.JSONEncodeError
        raise StorageError(f"{what} is not JSON-serializable: {exc}") from exc


def apply_changes(
    record: TaskRecord, expect: frozenset[TaskStatus] | None, changes: dict[str, Any]
) -> TaskRecord | None:
    """``record`` with ``changes`` (None when ``expect`` or ``_expect_lease`` do not match)."""
    changes = dict(changes)
    if "_expect_lease" in changes and changes.pop("_expect_lease") != record.lease_until:
        return None
    if expect is not None and record.status not in expect:
        return None
    unknown = set(changes) - set(TaskRecord.__dataclass_fields__) | ({"id"} & set(changes))
    if unknown:
        raise TypeError(f"TaskStore.update: cannot change {sorted(unknown)}")
    if "status" in changes:
        changes["status"] = TaskStatus(changes["status"])
    check_transition(record, changes)
    data = record.to_dict() | changes
    data["updated_at"] = time.time()
    return TaskRecord.from_dict(data)


def can_claim(record: TaskRecord, now: float) -> bool:
    """Whether the lease of a submitted or working task ended before ``now``."""
    return (
        record.status.value in ACTIVE and record.lease_until is not None and record.lease_until < now
    )


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction that holds the write lock from its first read."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database:
    """One SQLite connection living on its own thread; :meth:`run` sends work there."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asap-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Database({self.path!r}, closed={self._closed})"

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            deadline = time.monotonic() + self.busy_timeout
            while True:  # switching to WAL may report "locked" without waiting on the handler
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.executescript(SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self._conn is None:
            raise StorageError(f"SQLite storage {self.path!r} is closed")
        return fn(self._conn, *args, **kwargs)

    async def open(self) -> None:
        """Create the connection, the pragmas and the tables (on the worker thread)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        except sqlite3.Error as exc:
            self._executor.shutdown(wait=False)
            raise StorageError(f"SQLite: cannot open {self.path!r}: {exc}") from exc

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(connection, *args, **kwargs)`` on the worker thread, errors translated."""
        if self._closed:
            raise StorageError(f"SQLite storage {self.path!r} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn, args, kwargs)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite {self.path!r}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the connection and stop the thread; later calls are no-ops."""
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)


def snapshot_from_row(row: tuple[Any, ...]) -> StateSnapshot:
    task_id, snapshot_id, version, data, checkpoint, created_at = row
    return StateSnapshot.model_validate(
        {
            "id": snapshot_id,
            "task_id": task_id,
            "version": version,
            "data": orjson.loads(data),
            "checkpoint": bool(checkpoint),
            "created_at": created_at,
        }
    )


SNAPSHOT_COLUMNS = "task_id, id, version, data, checkpoint, created_at"
INSERT_SNAPSHOT = f"INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"


class SQLiteSnapshotStore(SnapshotStore):
    """Snapshots in the ``snapshots`` table (spec 5 columns)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def __repr__(self) -> str:
        return f"SQLiteSnapshotStore({self._db.path!r})"

    async def save(self, snapshot: StateSnapshot) -> None:
        row = (
            snapshot.task_id,
            snapshot.id,
            snapshot.version,
            to_json(snapshot.data, "snapshot data"),
            int(snapshot.checkpoint),
            snapshot.created_at.isoformat(),
        )

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(INSERT_SNAPSHOT, row)
            except sqlite3.IntegrityError as exc:
                raise SnapshotConflictError(
                    f"Snapshot {snapshot.task_id} v{snapshot.version} already exists"
                ) from exc

        await self._db.run(insert)

    async def append(
        self, task_id: str, data: dict[str, Any], *, checkpoint: bool = False
    ) -> StateSnapshot:
        text = to_json(data, "snapshot data")
        snapshot_id, created_at = f"snap_{generate_id()}", utc_now()

        def insert_next(conn: sqlite3.Connection) -> int:
            with immediate(conn):
                (version,) = conn.execute(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM snapshots WHERE task_id = ?",
                    (task_id,),
                ).fetchone()
                row = (task_id, snapshot_id, version, text, int(checkpoint), created_at.isoformat())
                conn.execute(INSERT_SNAPSHOT, row)
            return int(version)

        version = await self._db.run(insert_next)
        return StateSnapshot(
            id=snapshot_id,
            task_id=task_id,
            version=version,
            data=orjson.loads(text),
            checkpoint=checkpoint,
            created_at=created_at,
        )

    async def get(self, task_id: str, version: int | None = None) -> StateSnapshot | None:
        if version is None:
            sql, args = "WHERE task_id = ? ORDER BY version DESC LIMIT 1", (task_id,)
        else:
            sql, args = "WHERE task_id = ? AND version = ?", (task_id, version)
        return await self._fetch_one(sql, args)

    async def get_by_id(self, task_id: str, snapshot_id: str) -> StateSnapshot | None:
        return await self._fetch_one("WHERE task_id = ? AND id = ?", (task_id, snapshot_id))

    async def _fetch_one(self, where: str, args: tuple[Any, ...]) -> StateSnapshot | None:
        def fetch(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots {where}", args
            ).fetchone()
            return row

        row = await self._db.run(fetch)
        return snapshot_from_row(row) if row is not None else None

    async def list_versions(self, task_id: str) -> list[int]:
        def fetch(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT version FROM snapshots WHERE task_id = ? ORDER BY version", (task_id,)
            )
            return [int(version) for (version,) in rows]

        return await self._db.run(fetch)

    async def delete(self, task_id: str, version: int | None = None) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            if version is None:
                cursor = conn.execute("DELETE FROM snapshots WHERE task_id = ?", (task_id,))
            else:
                cursor = conn.execute(
                    "DELETE FROM snapshots WHERE task_id = ? AND version = ?", (task_id, version)
                )
            return cursor.rowcount > 0

        return await self._db.run(remove)

    async def aclose(self) -> None:
        """Close the shared connection (once for the three stores)."""
        await self._db.aclose()

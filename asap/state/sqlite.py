"""SQLite backend: the three stores in one local file (``sqlite:///path``), standard library only.

Every statement runs on one dedicated thread per :class:`~asap.state.store.Storage`, on one
connection created in that thread, so the event loop never waits on the disk. Several processes
may share a file: WAL lets readers run beside the writer, and each multi-step write is one
``BEGIN IMMEDIATE`` transaction (the write lock is taken before reading), which makes
``append``, ``update``, ``claim`` and the idempotency claim atomic across processes.

The ``snapshots`` table has the columns of spec 5, but a save never overwrites a version.
Task rows keep status, owner, lease and cancellation in columns (for the queries) beside the
whole record as JSON; a partial index on the ``updated_at`` of finished rows (an expression on
that JSON, so files written before it need no migration; it is built when such a file is
first opened) finds what :meth:`SQLiteTaskStore.purge` deletes without reading the table. An
idempotency row is the claim on its key: ``pending`` while its runner computes (kept alive by
a heartbeat, so a row whose ``expires`` passed belongs to a runner that died), then ``done``
with the outcome until its TTL ends.

Checkpoints (copying the write-ahead log back into the database file, with an fsync) run on a
third connection in a thread of their own, every :data:`CHECKPOINT_INTERVAL` seconds, never
inside a commit: SQLite's automatic checkpoint ran in whichever commit crossed 1,000 pages of
log, which stalled the event loop, or the writes queued behind the worker thread, for several
milliseconds at a time (the p99 latency of keyed requests).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson

from asap.errors import ConfigurationError
from asap.models.base import utc_now
from asap.models.entities import StateSnapshot
from asap.models.enums import TaskStatus
from asap.models.ids import generate_id
from asap.state.store import (
    MemoryGuardStore,
    SnapshotConflictError,
    SnapshotStore,
    Storage,
    StorageError,
    TaskRecord,
    TaskStore,
    apply_changes,
    load_task,
    to_json,
)
from asap.transport.idempotency import (
    Heartbeats,
    IdempotencyRecord,
    SharedIdempotencyStore,
    key_reused,
    warn,
)

__all__ = ["SQLiteIdempotencyStore", "SQLiteSnapshotStore", "SQLiteTaskStore", "sqlite_storage"]

P = ParamSpec("P")
T = TypeVar("T")

OPTIONS = frozenset(
    {"busy_timeout", "idempotency_ttl", "idempotency_takeover", "idempotency_max_entries"}
)
"""Options :func:`sqlite_storage` accepts (``idempotency_max_entries`` is the memory backend's
and ignored here: rows are bounded by their TTL)."""

TERMINAL = tuple(status.value for status in TaskStatus if status.is_terminal())
FINISHED_AT = "json_extract(record, '$.updated_at')"
"""When a finished task finished (its record's ``updated_at``): the key of ``tasks_finished``.
The queries must spell it, and the ``status IN`` list, exactly as the index does, or SQLite
does not use the index."""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS snapshots (
    task_id TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL,
    checkpoint INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
    PRIMARY KEY (task_id, version));
CREATE INDEX IF NOT EXISTS snapshots_by_id ON snapshots (task_id, id);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, owner TEXT, lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_lease ON tasks (status, lease_until);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks ({FINISHED_AT}) WHERE status IN {TERMINAL};
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    token TEXT, record TEXT, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires);
CREATE TABLE IF NOT EXISTS nonces (key TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nonces_by_expiry ON nonces (expires);
"""

ACTIVE = ("submitted", "working")
CHECKPOINT_INTERVAL = 1.0
"""Seconds between two checkpoints (passive: they never wait for, nor block, a writer)."""
POLL_FIRST, POLL_MAX = 0.01, 0.2
"""Seconds between two looks at a key another process is computing (doubling)."""


def database_path(url: str) -> str:
    """The file a ``sqlite:///relative`` (to the working directory), ``sqlite:////absolute``
    or ``sqlite:///:memory:`` URL names."""
    prefix = "sqlite:///"
    path = url[len(prefix) :] if url.startswith(prefix) else ""
    if not path or "?" in path or "#" in path:
        raise ConfigurationError(
            f"ASAP_STORAGE_URL: {url!r} names no SQLite file; use sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db or sqlite:///:memory:"
        )
    return path


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


def _rowcount(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> int:
    return conn.execute(sql, args).rowcount


@dataclass(slots=True)
class _Write:
    """A write waiting for a group commit, and its caller's future."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


def _apply(
    conn: sqlite3.Connection, writes: list[_Write]
) -> list[tuple[_Write, Any, BaseException | None]]:
    """Run ``writes`` in the transaction open on ``conn`` and commit: each write's result or
    exception (every write's, when the commit fails). They run together in one savepoint;
    should one raise, that savepoint is rolled back and they run again each in its own, so
    that only the failing one is lost (writes depend on nothing but the database, so running
    one again gives what it would have given)."""
    done: list[tuple[_Write, Any, BaseException | None]] = []
    try:
        conn.execute("SAVEPOINT asap_writes")
        try:
            done = [(write, write.fn(conn, *write.args), None) for write in writes]
        except Exception:
            conn.execute("ROLLBACK TO asap_writes")
            done = [_apply_alone(conn, write) for write in writes]
        conn.execute("RELEASE asap_writes")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:  # nothing was committed: every write failed
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return [(w, None, exc) for w in writes]
    return done


def _apply_alone(
    conn: sqlite3.Connection, write: _Write
) -> tuple[_Write, Any, BaseException | None]:
    """One write in a savepoint of its own: rolled back alone if it raises."""
    conn.execute("SAVEPOINT asap_write")
    try:
        result = write.fn(conn, *write.args)
    except Exception as exc:
        conn.execute("ROLLBACK TO asap_write")
        return write, None, exc
    finally:
        conn.execute("RELEASE asap_write")
    return write, result, None


def _deliver(done: list[tuple[_Write, Any, BaseException | None]]) -> None:
    """Hand each write's outcome to its caller (unless the caller stopped waiting)."""
    for write, result, error in done:
        if write.future.done():
            continue
        if error is None:
            write.future.set_result(result)
        else:
            write.future.set_exception(error)


class Database:
    """SQLite for the event loop: work runs on a connection of its own worker thread, except
    that a short call made while that thread is idle runs at once on a second connection in
    the loop's thread, which does not wait for locks: a commit takes ~0.1 ms, a trip to the
    thread and back can take milliseconds on a busy machine. If another process holds the
    write lock, the call goes to the thread, which waits up to ``busy_timeout``. Calls keep
    their order: none runs in the loop's thread while earlier ones are queued. Short
    independent writes (:meth:`write`) are the exception: they are group-committed, many in
    one transaction."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asap-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._direct: sqlite3.Connection | None = None
        self._queued = 0
        self._closed = False
        self._writes: deque[_Write] = deque()
        """Writes waiting for the worker thread's next group commit (see :meth:`write`)."""
        self._committing = False
        self._direct_writes: list[_Write] = []
        """Writes for the end of this event-loop step, on the loop's connection."""
        self._checkpoints: ThreadPoolExecutor | None = None
        """The checkpointer's thread (a file database only), its connection made there."""
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._checkpointing: asyncio.Future[None] | None = None

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
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self._conn is None:
            raise StorageError(f"SQLite storage {self.path!r} is closed")
        return fn(self._conn, *args, **kwargs)

    async def open(self) -> None:
        """Create the connections, the pragmas and the tables."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
            if self.path != ":memory:":  # a second connection would be another database
                self._direct = sqlite3.connect(self.path, timeout=0, isolation_level=None)
                self._direct.execute("PRAGMA busy_timeout = 0")
                self._direct.execute("PRAGMA synchronous = NORMAL")
                self._direct.execute("PRAGMA wal_autocheckpoint = 0")
                self._checkpoints = ThreadPoolExecutor(1, thread_name_prefix="asap-sqlite-wal")
                self._checkpoint_later()
        except BaseException as exc:
            self._closed = True
            if self._direct is not None:
                self._direct.close()
                self._direct = None
            # on the worker thread (sqlite3 requires it), after a _connect still running there
            self._executor.submit(self._disconnect)
            self._executor.shutdown(wait=False)
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"SQLite: cannot open {self.path!r}: {exc}") from exc
            raise

    def _checkpoint_later(self) -> None:
        loop = asyncio.get_running_loop()
        self._checkpoint_timer = loop.call_later(CHECKPOINT_INTERVAL, self._start_checkpoint)

    def _start_checkpoint(self) -> None:
        """Every interval: a passive checkpoint on the checkpointer's thread, unless the
        last one is still running."""
        if self._closed or self._checkpoints is None:
            return
        if self._checkpointing is None or self._checkpointing.done():
            loop = asyncio.get_running_loop()
            self._checkpointing = loop.run_in_executor(self._checkpoints, self._checkpoint)
        self._checkpoint_later()

    def _checkpoint(self) -> None:
        """(On the checkpointer's thread.) Copy what the log holds back into the file, as far
        as no reader still needs it; another process's checkpoint running is no error."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                warn("sqlite_checkpoint_failed", path=self.path, error=str(exc))

    def _close_checkpoints(self) -> None:
        """(On the checkpointer's thread.)"""
        conn, self._checkpoint_conn = self._checkpoint_conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(connection, *args, **kwargs)``, errors translated: at once when the worker
        thread is idle and no other process holds the lock, else on the worker thread."""
        if self._closed:
            raise StorageError(f"SQLite storage {self.path!r} is closed")
        if self._direct is not None and not self._queued:
            try:
                return fn(self._direct, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StorageError(f"SQLite {self.path!r}: {exc}") from exc
            except sqlite3.Error as exc:
                raise StorageError(f"SQLite {self.path!r}: {exc}") from exc
        return await self.run_in_thread(fn, *args, **kwargs)

    async def run_in_thread(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(connection, *args, **kwargs)`` on the worker thread (long work, such as a
        batch of many rows, which must not hold up the event loop), errors translated."""
        if self._closed:
            raise StorageError(f"SQLite storage {self.path!r} is closed")
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            return await loop.run_in_executor(self._executor, self._call, fn, args, kwargs)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite {self.path!r}: {exc}") from exc
        finally:
            self._queued -= 1

    async def write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(connection, *args, **kwargs)`` as a short, independent write, errors
        translated, *group-committed*: the writes made while the event loop runs one step go
        in one ``BEGIN IMMEDIATE`` transaction, each inside a savepoint (a write that raises
        is rolled back alone), with one commit for all: at the end of that step on the loop's
        own connection when the worker thread is idle and no other process holds the lock,
        else in one trip to the worker thread. Under load, a commit per write and a trip to
        the thread per write cost more than the writes. ``fn`` must not begin or end
        transactions, and writes of one group are not ordered against other calls in
        flight, so each caller awaits its write before the next step of its own."""
        if self._closed:
            raise StorageError(f"SQLite storage {self.path!r} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        write = _Write(partial(fn, **kwargs) if kwargs else fn, args, future)
        if self._direct is not None and not self._queued:
            self._direct_writes.append(write)
            if len(self._direct_writes) == 1:
                loop.call_soon(self._commit_direct, loop)
        else:
            self._to_thread(loop, [write])
        try:
            return await future
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite {self.path!r}: {exc}") from exc

    def _commit_direct(self, loop: asyncio.AbstractEventLoop) -> None:
        writes, self._direct_writes = self._direct_writes, []
        conn = self._direct
        if self._closed or conn is None:
            closed = StorageError(f"SQLite storage {self.path!r} is closed")
            _deliver([(w, None, closed) for w in writes])
            return
        if self._queued:  # the thread has work (and may hold the lock): join it there
            self._to_thread(loop, writes)
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):  # another process writes: wait
                self._to_thread(loop, writes)  # in the thread (busy_timeout)
                return
            _deliver([(w, None, exc) for w in writes])
            return
        _deliver(_apply(conn, writes))

    def _to_thread(self, loop: asyncio.AbstractEventLoop, writes: list[_Write]) -> None:
        self._writes.extend(writes)
        if not self._committing:
            self._committing = True
            self._queued += 1
            asyncio.ensure_future(self._commit_writes(loop))

    async def _commit_writes(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._writes:
                try:
                    done = await loop.run_in_executor(self._executor, self._group_commit)
                except BaseException as exc:  # no write ran (e.g. the storage closed)
                    done = [(w, None, exc) for w in self._writes]
                    self._writes.clear()
                    _deliver(done)
                    if not isinstance(exc, Exception):
                        raise
                    return
                _deliver(done)
        finally:
            self._committing = False
            self._queued -= 1

    def _group_commit(self) -> list[tuple[_Write, Any, BaseException | None]]:
        """(In the worker thread.) Run the writes queued now in one transaction."""
        writes = []
        while self._writes:
            writes.append(self._writes.popleft())
        if self._conn is None:
            closed = StorageError(f"SQLite storage {self.path!r} is closed")
            return [(w, None, closed) for w in writes]
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(w, None, exc) for w in writes]
        return _apply(self._conn, writes)

    async def fetchone(self, sql: str, *args: Any) -> Any:
        """The first row of ``sql``, or None."""
        return await self.run(lambda conn: conn.execute(sql, args).fetchone())

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        """Every row of ``sql``."""
        return await self.run(lambda conn: conn.execute(sql, args).fetchall())

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; how many rows it changed."""
        return await self.run(_rowcount, sql, args)

    async def execute_write(self, sql: str, *args: Any) -> int:
        """:meth:`execute` for a short write of its own (group-committed under load, see
        :meth:`write`)."""
        return await self.write(_rowcount, sql, args)

    async def aclose(self) -> None:
        """Close the connection and stop the thread; later calls are no-ops."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
        if self._checkpoints is not None:  # after a checkpoint running now
            await loop.run_in_executor(self._checkpoints, self._close_checkpoints)
            self._checkpoints.shutdown(wait=False)
        if self._direct is not None:
            with suppress(sqlite3.Error):
                self._direct.close()
            self._direct = None
        await loop.run_in_executor(self._executor, self._disconnect)
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
            return await self._fetch_one("WHERE task_id = ? ORDER BY version DESC LIMIT 1", task_id)
        return await self._fetch_one("WHERE task_id = ? AND version = ?", task_id, version)

    async def get_by_id(self, task_id: str, snapshot_id: str) -> StateSnapshot | None:
        return await self._fetch_one("WHERE task_id = ? AND id = ?", task_id, snapshot_id)

    async def _fetch_one(self, where: str, *args: Any) -> StateSnapshot | None:
        row = await self._db.fetchone(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots {where}", *args)
        return snapshot_from_row(row) if row is not None else None

    async def list_versions(self, task_id: str) -> list[int]:
        rows = await self._db.fetchall(
            "SELECT version FROM snapshots WHERE task_id = ? ORDER BY version", task_id
        )
        return [int(version) for (version,) in rows]

    async def delete(self, task_id: str, version: int | None = None) -> bool:
        if version is None:
            return await self._db.execute("DELETE FROM snapshots WHERE task_id = ?", task_id) > 0
        sql = "DELETE FROM snapshots WHERE task_id = ? AND version = ?"
        return await self._db.execute(sql, task_id, version) > 0

    async def delete_many(self, task_ids: list[str]) -> None:
        if not task_ids:
            return
        text = to_json(task_ids, "task ids")
        sql = "DELETE FROM snapshots WHERE task_id IN (SELECT value FROM json_each(?))"
        await self._db.run_in_thread(lambda conn: conn.execute(sql, (text,)))

    async def aclose(self) -> None:
        """Close the shared connection (once for the three stores)."""
        await self._db.aclose()


WRITE_TASK = (
    "UPDATE tasks SET status = ?, owner = ?, lease_until = ?, cancel_requested = ?, record = ? "
    "WHERE id = ?"
)

PURGE_TASKS = (
    "DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks INDEXED BY tasks_finished "
    f"WHERE status IN {TERMINAL} AND {FINISHED_AT} < ? ORDER BY {FINISHED_AT} LIMIT ?) "
    f"RETURNING id, {FINISHED_AT}"
)
"""Delete the oldest finished tasks, found through the ``tasks_finished`` index: named, since
without statistics the planner prefers ``tasks_by_lease`` (every finished row, then a sort),
and SQLite refuses the statement rather than scan should the index not apply."""

INSERT_MANY = (
    "INSERT OR IGNORE INTO tasks (status, owner, lease_until, cancel_requested, record, id) "
    "SELECT json_extract(value, '$.status'), json_extract(value, '$.owner'), "
    "json_extract(value, '$.lease_until'), json_extract(value, '$.cancel_requested'), "
    "value, json_extract(value, '$.id') FROM json_each(?)"
)
"""Insert the tasks of a JSON array of records (the same columns as :func:`task_values`)."""


KEEP_BOUND_MAX = 1 << 20
"""Characters of a batch's JSON the insert statement may keep bound until the next batch."""


def task_values(record: TaskRecord) -> tuple[Any, ...]:
    """Parameters of :data:`WRITE_TASK` (and of the insert, same order)."""
    return (
        record.status.value,
        record.owner,
        record.lease_until,
        int(record.cancel_requested),
        to_json(record.to_dict(), "task record"),
        record.id,
    )


class SQLiteTaskStore(TaskStore):
    """Task records in the ``tasks`` table; every change is one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def __repr__(self) -> str:
        return f"SQLiteTaskStore({self._db.path!r})"

    async def create(self, record: TaskRecord) -> None:
        values = task_values(record)

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO tasks (status, owner, lease_until, cancel_requested, record, id) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    values,
                )
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"Task {record.id} already exists") from exc

        await self._db.run(insert)

    async def create_many(self, records: list[TaskRecord]) -> None:
        # One statement over one JSON array, in a transaction of its own (a writing statement
        # takes the write lock when it starts, as BEGIN IMMEDIATE does): SQLite loops over
        # the rows itself, so the worker thread takes the GIL back once per batch, not per
        # row or per statement. Under load each time costs the busy event loop a hand-over.
        text = to_json(records, "task records")

        def insert_all(conn: sqlite3.Connection) -> None:
            conn.execute(INSERT_MANY, (text,))
            if len(text) > KEEP_BOUND_MAX:
                # the cached statement keeps its last parameter: bind a small one, so a
                # batch of large tasks does not stay in memory until the next batch
                conn.execute(INSERT_MANY, ("[]",))

        await self._db.run_in_thread(insert_all)

    async def get(self, task_id: str) -> TaskRecord | None:
        row = await self._db.fetchone("SELECT record FROM tasks WHERE id = ?", task_id)
        return load_task(row[0]) if row is not None else None

    async def update(
        self, task_id: str, *, expect: frozenset[TaskStatus] | None = None, **changes: Any
    ) -> TaskRecord | None:
        def compare_and_set(conn: sqlite3.Connection) -> TaskRecord | None:
            with immediate(conn):
                row = conn.execute("SELECT record FROM tasks WHERE id = ?", (task_id,)).fetchone()
                if row is None:
                    return None
                updated = apply_changes(load_task(row[0]), expect, changes)
                if updated is not None:
                    conn.execute(WRITE_TASK, task_values(updated))
                return updated

        return await self._db.run(compare_and_set)

    async def expired(self, now: float) -> list[TaskRecord]:
        sql = f"SELECT record FROM tasks WHERE status IN {ACTIVE} AND lease_until < ?"
        return [load_task(text) for (text,) in await self._db.fetchall(sql, now)]

    async def claim(self, task_id: str, owner: str, lease_until: float, now: float) -> bool:
        expired = f"AND status IN {ACTIVE} AND lease_until < ?"

        def take(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                sql = f"SELECT record FROM tasks WHERE id = ? {expired}"
                row = conn.execute(sql, (task_id, now)).fetchone()
                if row is None:
                    return False
                record = load_task(row[0])
                record.owner, record.lease_until = owner, lease_until
                record.updated_at = time.time()
                cursor = conn.execute(f"{WRITE_TASK} {expired}", (*task_values(record), now))
                return cursor.rowcount == 1

        return await self._db.run(take)

    async def renew(self, task_ids: list[str], owner: str, lease_until: float) -> None:
        held = f"SELECT record FROM tasks WHERE id = ? AND owner = ? AND status NOT IN {TERMINAL}"

        def extend(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                for task_id in dict.fromkeys(task_ids):
                    row = conn.execute(held, (task_id, owner)).fetchone()
                    if row is not None:
                        record = load_task(row[0])
                        record.lease_until = lease_until
                        conn.execute(WRITE_TASK, task_values(record))

        await self._db.run(extend)

    async def cancel_requested(self, task_ids: list[str]) -> list[str]:
        asked = "SELECT 1 FROM tasks WHERE id = ? AND cancel_requested = 1"

        def fetch(conn: sqlite3.Connection) -> list[str]:
            return [t for t in task_ids if conn.execute(asked, (t,)).fetchone() is not None]

        return await self._db.run(fetch)

    async def purge(self, finished_before: float, limit: int = 1000) -> list[str]:
        def delete(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            rows: list[tuple[str, float]] = conn.execute(
                PURGE_TASKS, (finished_before, limit)
            ).fetchall()
            return rows

        rows = await self._db.run_in_thread(delete)  # thousands of rows: not on the loop
        return [task_id for task_id, _ in sorted(rows, key=lambda row: row[1])]

    async def aclose(self) -> None:
        """Close the shared connection (once for the three stores)."""
        await self._db.aclose()


LOOK = "SELECT state, fingerprint, record FROM idempotency WHERE key = ? AND expires > ?"


class SQLiteIdempotencyStore(SharedIdempotencyStore):
    """Outcomes in the ``idempotency`` table, shared by every process using the file.

    A row inserted as ``pending`` is the claim: its runner computes while duplicates poll it;
    a runner that dies stops its heartbeat, so its row expires after ``takeover`` seconds and
    the next caller claims the key. Outcomes are kept ``ttl`` seconds.
    """

    def __init__(self, db: Database, ttl: float = 3600.0, takeover: float = 60.0) -> None:
        if ttl <= 0 or takeover <= 0:
            raise ValueError("idempotency_ttl and idempotency_takeover must be positive")
        super().__init__()
        self._db = db
        self.ttl = ttl
        self.takeover = takeover
        self._heartbeats = Heartbeats(takeover / 3)
        self._next_sweep = 0.0

    def __repr__(self) -> str:
        return (
            f"SQLiteIdempotencyStore({self._db.path!r}, ttl={self.ttl}, takeover={self.takeover})"
        )

    async def _lead(
        self, key: str, fingerprint: str, compute: Callable[[], Awaitable[IdempotencyRecord]]
    ) -> tuple[IdempotencyRecord, bool]:
        token, delay, look = generate_id(), POLL_FIRST, False
        while True:
            if look:
                row = await self._db.fetchone(LOOK, key, time.time())
                state, owner, text = row if row is not None else ("absent", "", None)
            else:
                state, owner, text = await self._db.write(
                    self._claim, key, fingerprint, token, time.time()
                )
            if state == "claimed":
                return await self._compute(key, token, compute), False
            if state == "absent":  # the runner failed or its row expired: claim it
                look = False
                continue
            if owner != fingerprint:
                raise key_reused(key)
            if state == "done" and text is not None:
                return IdempotencyRecord(**orjson.loads(text)), True
            await asyncio.sleep(delay)
            delay, look = min(delay * 2, POLL_MAX), True

    def _claim(
        self, conn: sqlite3.Connection, key: str, fp: str, token: str, now: float
    ) -> tuple[str, str, str | None]:
        """Take ``key`` (``claimed``) or say what holds it: (state, fingerprint, record).

        One statement (its own transaction) claims a free or expired key; expired rows are
        swept now and then."""
        if now >= self._next_sweep:  # drop every expired row now and then (only this thread)
            self._next_sweep = now + min(self.ttl, 60.0)
            conn.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))
        cursor = conn.execute(
            "INSERT INTO idempotency (key, fingerprint, state, token, record, expires) "
            "VALUES (?, ?, 'pending', ?, NULL, ?) ON CONFLICT (key) DO UPDATE SET "
            "fingerprint = excluded.fingerprint, state = 'pending', token = excluded.token, "
            "record = NULL, expires = excluded.expires WHERE idempotency.expires <= ?",
            (key, fp, token, now + self.takeover, now),
        )
        if cursor.rowcount == 1:
            return "claimed", fp, None
        row = conn.execute(
            "SELECT state, fingerprint, record FROM idempotency WHERE key = ?", (key,)
        ).fetchone()
        return row if row is not None else ("absent", "", None)

    async def _compute(
        self, key: str, token: str, compute: Callable[[], Awaitable[IdempotencyRecord]]
    ) -> IdempotencyRecord:
        heartbeat = self._heartbeats.start(
            key,
            lambda: self._db.execute_write(
                "UPDATE idempotency SET expires = ? WHERE key = ? AND token = ?",
                *(time.time() + self.takeover, key, token),
            ),
        )
        try:
            record = await compute()
            text = to_json(vars(record), "idempotency record")
        except BaseException:
            heartbeat.cancel()
            try:
                await self._db.execute_write(
                    "DELETE FROM idempotency WHERE key = ? AND token = ?", key, token
                )
            except StorageError as exc:  # the row expires after `takeover` anyway
                warn("idempotency_release_failed", key=key, error=str(exc))
            raise
        await heartbeat.stop()
        done = await self._db.execute_write(
            "UPDATE idempotency SET state = 'done', record = ?, expires = ?, token = NULL "
            "WHERE key = ? AND token = ?",
            *(text, time.time() + self.ttl, key, token),
        )
        if not done:
            warn("idempotency_claim_lost", key=key, takeover=self.takeover)
        return record

    async def aclose(self) -> None:
        """Close the shared connection (once for the three stores)."""
        await self._db.aclose()


class SQLiteGuardStore(MemoryGuardStore):
    """Nonces in the file, so every process on the host sees them; rate windows in memory
    (per process: a write per request would cost more than the limit saves)."""

    PURGE_EVERY = 1000

    def __init__(self, db: Database) -> None:
        super().__init__()
        self._db = db
        self._uses = 0

    async def use_nonce(self, key: str, ttl: float) -> bool:
        now = time.time()
        self._uses += 1
        purge = self._uses % self.PURGE_EVERY == 0

        def use(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                if purge:
                    conn.execute("DELETE FROM nonces WHERE expires <= ?", (now,))
                cursor = conn.execute(
                    "INSERT INTO nonces (key, expires) VALUES (?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET expires = excluded.expires WHERE nonces.expires <= ?",
                    (key, now + ttl, now),
                )
                return cursor.rowcount == 1

        return await self._db.run(use)


async def sqlite_storage(url: str, **options: Any) -> Storage:
    """Open (creating if needed) the SQLite file ``url`` names.

    Options: ``busy_timeout`` (seconds a writer waits for another process's lock, 15),
    ``idempotency_ttl`` (seconds an outcome is kept, 3600), ``idempotency_takeover`` (seconds
    after which the claim of a runner that stopped sending heartbeats may be taken, 60).
    """
    unknown = set(options) - OPTIONS - {"key_prefix"}  # key_prefix: the Redis backend's
    if unknown:
        raise ConfigurationError(f"unknown SQLite storage options: {sorted(unknown)}")
    db = Database(database_path(url), float(options.get("busy_timeout", 15.0)))
    idempotency = SQLiteIdempotencyStore(
        db,
        float(options.get("idempotency_ttl", 3600.0)),
        float(options.get("idempotency_takeover", 60.0)),
    )
    await db.open()
    return Storage(
        url,
        SQLiteSnapshotStore(db),
        SQLiteTaskStore(db),
        idempotency,
        guard=SQLiteGuardStore(db),
    )

"""One contract, every storage backend: memory, SQLite and a real Redis (style rule 19).

The Redis case is skipped only outside CI when no Redis answers at ``ASAP_TEST_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``); with ``CI`` set a missing Redis fails the run. Each Redis
test works under its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from asap.errors import ConfigurationError, InvalidParamsError, InvalidTransitionError
from asap.models.entities import StateSnapshot
from asap.models.enums import TaskStatus
from asap.state import open_storage
from asap.state.sqlite import Database
from asap.state.store import SnapshotConflictError, Storage, StorageError, TaskRecord
from asap.transport.idempotency import Heartbeats, IdempotencyRecord
from tests.conftest import delete_redis_keys

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("ASAP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SUBMITTED, WORKING = TaskStatus.SUBMITTED, TaskStatus.WORKING
COMPLETED, FAILED = TaskStatus.COMPLETED, TaskStatus.FAILED


@dataclass
class Backend:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    async def open(self, **options: Any) -> Storage:
        return await open_storage(self.url, **self.options, **options)


def require_redis() -> None:
    """Skip (outside CI) or fail (in CI) when Redis is not reachable."""
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {exc!r} (start redis-server)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", "memory://")
    elif request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path}/state.db")
    else:
        require_redis()
        prefix = f"asap-test:{uuid.uuid4().hex}:"
        yield Backend("redis", REDIS_URL, {"key_prefix": prefix})
        delete_redis_keys(prefix, REDIS_URL)


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    opened = await backend.open()
    yield opened
    await opened.aclose()


def task(task_id: str = "task-1", **values: Any) -> TaskRecord:
    fields: dict[str, Any] = {
        "id": task_id,
        "conversation_id": "conv-1",
        "skill_id": "echo",
        "sender": "urn:asap:agent:client",
        "status": SUBMITTED,
        "request": {"payload": {"input": {"message": "hi"}}},
    }
    return TaskRecord(**(fields | values))


def outcome(result: Any = "ok") -> IdempotencyRecord:
    return IdempotencyRecord("fp", "task-1", "completed", {"value": result})


# Snapshots


async def test_snapshots_are_copied_in_and_out(storage: Storage) -> None:
    data = {"nested": {"items": [1, 2]}}
    appended = await storage.snapshots.append("t", data)
    data["nested"]["items"].append(3)
    appended.data["nested"]["items"].append(4)
    fetched = await storage.snapshots.get("t")
    assert fetched is not None and fetched.data == {"nested": {"items": [1, 2]}}
    fetched.data["nested"]["items"].clear()
    saved = StateSnapshot(id="s2", task_id="t", version=2, data={"k": ["v"]})
    await storage.snapshots.save(saved)
    saved.data["k"].append("changed")
    again = await storage.snapshots.get("t", 2)
    assert again is not None and again.data == {"k": ["v"]}
    first = await storage.snapshots.get("t", 1)
    assert first is not None and first.data == {"nested": {"items": [1, 2]}}


async def test_append_allocates_the_next_version(storage: Storage) -> None:
    versions = [(await storage.snapshots.append("t", {"i": i})).version for i in range(3)]
    assert versions == [1, 2, 3]
    await storage.snapshots.save(StateSnapshot(id="s9", task_id="t", version=9, data={}))
    assert (await storage.snapshots.append("t", {}, checkpoint=True)).version == 10
    assert (await storage.snapshots.append("other", {})).version == 1


async def test_concurrent_appends_lose_nothing(storage: Storage) -> None:
    snapshots = await asyncio.gather(*(storage.snapshots.append("t", {"i": i}) for i in range(20)))
    assert sorted(s.version for s in snapshots) == list(range(1, 21))
    assert await storage.snapshots.list_versions("t") == list(range(1, 21))


async def test_get_latest_by_version_and_missing(storage: Storage) -> None:
    assert await storage.snapshots.get("t") is None
    first = await storage.snapshots.append("t", {"step": 1})
    second = await storage.snapshots.append("t", {"step": 2}, checkpoint=True)
    assert await storage.snapshots.get("t") == second
    assert await storage.snapshots.get("t", 1) == first
    assert await storage.snapshots.get("t", 3) is None
    assert await storage.snapshots.get("other") is None
    latest = await storage.snapshots.get("t")
    assert latest is not None and latest.checkpoint and latest.created_at == second.created_at


async def test_get_by_id(storage: Storage) -> None:
    first = await storage.snapshots.append("t", {"step": 1})
    await storage.snapshots.append("t", {"step": 2})
    assert await storage.snapshots.get_by_id("t", first.id) == first
    assert await storage.snapshots.get_by_id("t", "snap_missing") is None
    assert await storage.snapshots.get_by_id("other", first.id) is None


async def test_list_versions_ascending(storage: Storage) -> None:
    for version in (3, 1, 12, 2):
        await storage.snapshots.save(
            StateSnapshot(id=f"s{version}", task_id="t", version=version, data={})
        )
    assert await storage.snapshots.list_versions("t") == [1, 2, 3, 12]
    assert await storage.snapshots.list_versions("other") == []


async def test_delete_one_all_and_missing(storage: Storage) -> None:
    for i in range(3):
        await storage.snapshots.append("t", {"i": i})
    await storage.snapshots.append("keep", {})
    assert await storage.snapshots.delete("t", 2) is True
    assert await storage.snapshots.delete("t", 2) is False
    assert await storage.snapshots.list_versions("t") == [1, 3]
    assert await storage.snapshots.delete("t") is True
    assert await storage.snapshots.list_versions("t") == []
    assert await storage.snapshots.get("t") is None
    assert await storage.snapshots.delete("t") is False
    assert await storage.snapshots.delete("missing", 1) is False
    assert await storage.snapshots.list_versions("keep") == [1]


async def test_save_never_overwrites(storage: Storage) -> None:
    await storage.snapshots.save(StateSnapshot(id="a", task_id="t", version=1, data={"v": "a"}))
    with pytest.raises(SnapshotConflictError):
        await storage.snapshots.save(StateSnapshot(id="b", task_id="t", version=1, data={"v": "b"}))
    kept = await storage.snapshots.get("t", 1)
    assert kept is not None and kept.id == "a" and kept.data == {"v": "a"}


# Tasks


async def test_task_create_get_and_duplicate(storage: Storage) -> None:
    assert await storage.tasks.get("task-1") is None
    record = task(progress={"percent": 10}, lease_until=123.5, owner="worker-a")
    await storage.tasks.create(record)
    assert await storage.tasks.get("task-1") == record
    with pytest.raises(StorageError):
        await storage.tasks.create(task(skill_id="other"))
    fetched = await storage.tasks.get("task-1")
    assert fetched is not None and fetched.skill_id == "echo"


async def test_task_records_are_copied_in_and_out(storage: Storage) -> None:
    record = task()
    await storage.tasks.create(record)
    record.request["payload"]["input"]["message"] = "changed"
    record.status = COMPLETED
    fetched = await storage.tasks.get("task-1")
    assert fetched is not None
    assert fetched.status is SUBMITTED
    assert fetched.request["payload"]["input"]["message"] == "hi"
    fetched.request.clear()
    again = await storage.tasks.get("task-1")
    assert again is not None and again.request
    updated = await storage.tasks.update("task-1", progress={"percent": 5})
    assert updated is not None
    updated.progress = {"percent": 99}
    again = await storage.tasks.get("task-1")
    assert again is not None and again.progress == {"percent": 5}


async def test_a_record_without_a_json_form_is_refused_and_nothing_is_stored(
    storage: Storage,
) -> None:
    with pytest.raises(StorageError, match="not JSON-serializable"):
        await storage.tasks.create(task(result={"when": object()}))
    assert await storage.tasks.get("task-1") is None
    await storage.tasks.create(task())
    with pytest.raises(StorageError, match="not JSON-serializable"):
        await storage.tasks.update("task-1", progress={"at": object()})
    stored = await storage.tasks.get("task-1")
    assert stored is not None and stored.progress is None


async def test_update_is_compare_and_set(storage: Storage) -> None:
    await storage.tasks.create(task(updated_at=0.0))
    assert await storage.tasks.update("task-1", expect=frozenset({WORKING}), status=WORKING) is None
    assert (await storage.tasks.get("task-1")).status is SUBMITTED  # type: ignore[union-attr]
    updated = await storage.tasks.update(
        "task-1", expect=frozenset({SUBMITTED}), status=WORKING, progress={"percent": 50}
    )
    assert updated is not None and updated.status is WORKING and updated.updated_at > 0
    assert await storage.tasks.get("task-1") == updated
    assert await storage.tasks.update("missing", status=WORKING) is None
    await asyncio.gather(*(storage.tasks.get("task-1") for _ in range(2)))  # open connections
    results = await asyncio.gather(
        storage.tasks.update("task-1", expect=frozenset({WORKING}), status=COMPLETED),
        storage.tasks.update("task-1", expect=frozenset({WORKING}), status=FAILED),
    )
    assert sum(r is not None for r in results) == 1
    winner = next(r for r in results if r is not None)
    assert await storage.tasks.get("task-1") == winner


async def test_illegal_transitions_raise(storage: Storage) -> None:
    await storage.tasks.create(task())
    with pytest.raises(InvalidTransitionError):
        await storage.tasks.update("task-1", status=COMPLETED)
    assert (await storage.tasks.get("task-1")).status is SUBMITTED  # type: ignore[union-attr]
    await storage.tasks.update("task-1", status=WORKING)
    await storage.tasks.update("task-1", status=COMPLETED, result={"ok": True})
    for status in (WORKING, FAILED, TaskStatus.CANCELLED):
        with pytest.raises(InvalidTransitionError):
            await storage.tasks.update("task-1", status=status)
    final = await storage.tasks.get("task-1")
    assert final is not None and final.status is COMPLETED and final.result == {"ok": True}


async def test_claim_only_an_expired_lease(storage: Storage) -> None:
    now = time.time()
    await storage.tasks.create(task("live", owner="a", lease_until=now + 60))
    await storage.tasks.create(task("dead", owner="a", lease_until=now - 1, status=WORKING))
    await storage.tasks.create(task("no-lease"))
    await storage.tasks.create(task("done", owner="a", lease_until=now - 1, status=COMPLETED))
    assert not await storage.tasks.claim("live", "b", now + 30, now)
    assert not await storage.tasks.claim("no-lease", "b", now + 30, now)
    assert not await storage.tasks.claim("done", "b", now + 30, now)
    assert not await storage.tasks.claim("missing", "b", now + 30, now)
    assert await storage.tasks.claim("dead", "b", now + 30, now)
    claimed = await storage.tasks.get("dead")
    assert claimed is not None and (claimed.owner, claimed.lease_until) == ("b", now + 30)
    assert claimed.status is WORKING
    assert not await storage.tasks.claim("dead", "c", now + 30, now)
    live = await storage.tasks.get("live")
    assert live is not None and live.owner == "a"


async def test_concurrent_claims_have_one_winner(storage: Storage) -> None:
    now = time.time()
    await storage.tasks.create(task(owner="gone", lease_until=now - 5))
    await asyncio.gather(*(storage.tasks.get("task-1") for _ in range(8)))  # open connections
    results = await asyncio.gather(
        *(storage.tasks.claim("task-1", f"worker-{i}", now + 30, now) for i in range(8))
    )
    assert results.count(True) == 1
    record = await storage.tasks.get("task-1")
    assert record is not None and record.owner == f"worker-{results.index(True)}"


async def test_renew_only_for_the_owner(storage: Storage) -> None:
    now = time.time()
    await storage.tasks.create(task("mine", owner="a", lease_until=now + 1))
    await storage.tasks.create(task("theirs", owner="b", lease_until=now + 1))
    await storage.tasks.create(task("over", owner="a", lease_until=now + 1, status=COMPLETED))
    await storage.tasks.renew(["mine", "theirs", "over", "missing"], "a", now + 100)
    leases = {t: (await storage.tasks.get(t)).lease_until for t in ("mine", "theirs", "over")}  # type: ignore[union-attr]
    assert leases == {"mine": now + 100, "theirs": now + 1, "over": now + 1}
    await storage.tasks.renew([], "a", now + 200)


async def test_expired_lists_active_tasks_with_past_leases(storage: Storage) -> None:
    now = time.time()
    await storage.tasks.create(task("old-submitted", lease_until=now - 10))
    await storage.tasks.create(task("old-working", lease_until=now - 1, status=WORKING))
    await storage.tasks.create(task("fresh", lease_until=now + 10, status=WORKING))
    await storage.tasks.create(task("no-lease", status=WORKING))
    await storage.tasks.create(task("input", lease_until=now - 1, status=TaskStatus.INPUT_REQUIRED))
    await storage.tasks.create(task("finished", lease_until=now - 1, status=COMPLETED))
    expired = await storage.tasks.expired(now)
    assert sorted(r.id for r in expired) == ["old-submitted", "old-working"]
    assert all(isinstance(r, TaskRecord) for r in expired)
    await storage.tasks.update("old-working", status=COMPLETED)
    assert [r.id for r in await storage.tasks.expired(now)] == ["old-submitted"]
    await storage.tasks.update("fresh", lease_until=now - 0.5)
    assert sorted(r.id for r in await storage.tasks.expired(now)) == ["fresh", "old-submitted"]
    assert await storage.tasks.expired(now - 100) == []


async def test_cancel_requested(storage: Storage) -> None:
    for task_id in ("a", "b", "c"):
        await storage.tasks.create(task(task_id))
    assert await storage.tasks.cancel_requested(["a", "b", "c"]) == []
    await storage.tasks.update("c", cancel_requested=True)
    await storage.tasks.update("a", cancel_requested=True)
    assert await storage.tasks.cancel_requested(["c", "b", "a", "missing"]) == ["c", "a"]
    assert await storage.tasks.cancel_requested([]) == []


# Idempotency


class Counter:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls, self.delay, self.fail = 0, delay, fail

    async def __call__(self) -> IdempotencyRecord:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("compute failed")
        return outcome(self.calls)


async def test_run_once_runs_once_then_replays(storage: Storage) -> None:
    compute = Counter()
    first = await storage.idempotency.run_once("key", "fp", compute)
    second = await storage.idempotency.run_once("key", "fp", compute)
    assert first == (outcome(1), False)
    assert second == (outcome(1), True)
    assert compute.calls == 1
    assert await storage.idempotency.run_once("other", "fp", compute) == (outcome(2), False)


async def test_concurrent_duplicates_run_once(storage: Storage) -> None:
    compute = Counter(delay=0.05)
    results = await asyncio.gather(
        *(storage.idempotency.run_once("key", "fp", compute) for _ in range(6))
    )
    assert compute.calls == 1
    assert [record for record, _ in results] == [outcome(1)] * 6
    assert sorted(replay for _, replay in results) == [False] + [True] * 5


async def test_outcomes_are_copied_out(storage: Storage) -> None:
    results = await asyncio.gather(
        *(storage.idempotency.run_once("key", "fp", Counter(delay=0.05)) for _ in range(3))
    )
    for record, _ in results:
        assert record.result is not None
        record.result["value"] = "changed"
    assert await storage.idempotency.run_once("key", "fp", Counter()) == (outcome(1), True)


async def test_key_reused_for_another_request(storage: Storage) -> None:
    await storage.idempotency.run_once("key", "fp", Counter())
    with pytest.raises(InvalidParamsError):
        await storage.idempotency.run_once("key", "other-fp", Counter())
    slow = Counter(delay=0.1)
    running = asyncio.ensure_future(storage.idempotency.run_once("busy", "fp", slow))
    await asyncio.sleep(0.02)
    with pytest.raises(InvalidParamsError):
        await storage.idempotency.run_once("busy", "other-fp", Counter())
    assert await running == (outcome(1), False)


async def test_failed_compute_stores_nothing(storage: Storage) -> None:
    with pytest.raises(RuntimeError):
        await storage.idempotency.run_once("key", "fp", Counter(fail=True))
    compute = Counter()
    assert await storage.idempotency.run_once("key", "fp", compute) == (outcome(1), False)
    failing, waiting = Counter(delay=0.05, fail=True), Counter()
    results = await asyncio.gather(
        storage.idempotency.run_once("again", "fp", failing),
        storage.idempotency.run_once("again", "fp", waiting),
        return_exceptions=True,
    )
    assert isinstance(results[0], RuntimeError)
    assert results[1] == (outcome(1), False)  # the waiter ran it once the first run failed
    assert (failing.calls, waiting.calls) == (1, 1)


async def test_outcomes_expire_after_the_ttl(backend: Backend) -> None:
    storage = await backend.open(idempotency_ttl=1.0)
    try:
        compute = Counter()
        await storage.idempotency.run_once("key", "fp", compute)
        assert (await storage.idempotency.run_once("key", "fp", compute))[1] is True
        deadline = time.monotonic() + 10
        while True:  # the key belongs to "fp" until its outcome expires
            try:
                again = await storage.idempotency.run_once("key", "other-fp", compute)
                break
            except InvalidParamsError:
                assert time.monotonic() < deadline, "the outcome never expired"
                await asyncio.sleep(0.05)
        assert again == (outcome(2), False)
    finally:
        await storage.aclose()


# Backend-specific behaviour


async def test_bad_urls_and_options_fail_fast(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///"):
        with pytest.raises(ConfigurationError):
            await open_storage(url)
    with pytest.raises(ConfigurationError):
        await open_storage(f"sqlite:///{tmp_path}/x.db", idempotency_tll=5)
    with pytest.raises(StorageError) as caught:
        await open_storage(f"sqlite:///{tmp_path}")  # a directory
    assert isinstance(caught.value.__cause__, sqlite3.Error)


async def test_sqlite_memory_url_and_close_twice() -> None:
    storage = await open_storage("sqlite:///:memory:")
    await storage.snapshots.append("t", {})
    assert await storage.snapshots.list_versions("t") == [1]
    await storage.aclose()
    await storage.aclose()
    with pytest.raises(StorageError):
        await storage.snapshots.get("t")


# -- SQLite group commit ------------------------------------------------------------------------


def _insert(conn: sqlite3.Connection, key: str) -> int:
    return conn.execute("INSERT INTO nonces (key, expires) VALUES (?, 0)", (key,)).rowcount


async def _group_of_writes(db: Database, prefix: str) -> list[Any]:
    # 20 writes in one loop step, one of them a duplicate key (an IntegrityError)
    writes = [db.write(_insert, f"{prefix}-{i}") for i in range(19)]
    writes.insert(7, db.write(_insert, f"{prefix}-3"))
    return await asyncio.gather(*writes, return_exceptions=True)


def _stored(path: Path, prefix: str) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT key FROM nonces WHERE key LIKE ?", (prefix + "-%",))
        return sorted(key for (key,) in rows)


async def test_sqlite_group_commit_rolls_back_only_the_write_that_failed(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "g.db"), busy_timeout=5)
    await db.open()
    try:
        # the worker thread idle: the group commits on the loop's connection
        results = await _group_of_writes(db, "idle")
        assert [r for r in results if not isinstance(r, int)] == [results[7]]
        assert isinstance(results[7], StorageError) and "UNIQUE" in str(results[7])
        assert results[:7] + results[8:] == [1] * 19
        assert _stored(tmp_path / "g.db", "idle") == sorted(f"idle-{i}" for i in range(19))

        # the worker thread busy: the group goes there, behind its work
        release = threading.Event()
        busy = asyncio.ensure_future(db.run_in_thread(lambda _: release.wait(10)))
        await asyncio.sleep(0)
        group = asyncio.ensure_future(_group_of_writes(db, "busy"))
        await asyncio.sleep(0.05)
        assert not group.done()  # queued behind the thread's work
        release.set()
        await busy
        results = await group
        assert isinstance(results[7], StorageError) and "UNIQUE" in str(results[7])
        assert results[:7] + results[8:] == [1] * 19
        assert _stored(tmp_path / "g.db", "busy") == sorted(f"busy-{i}" for i in range(19))
    finally:
        await db.aclose()


async def test_sqlite_checkpoints_run_off_the_hot_connections(tmp_path: Path) -> None:
    """No commit checkpoints (SQLite's automatic checkpoint stalled the commit that crossed
    1,000 pages of log for milliseconds); the checkpointer's thread copies the log back into
    the file within about a second. In WAL mode only a checkpoint writes to the main file, so
    its growth shows the checkpointer at work: these few hundred KiB of rows are far below the
    4 MiB at which an automatic checkpoint would have run."""
    from asap.state.sqlite import CHECKPOINT_INTERVAL

    path = tmp_path / "c.db"
    db = Database(str(path), busy_timeout=5)
    await db.open()
    try:
        assert db._direct is not None
        assert db._direct.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        assert await db.run_in_thread(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()
        ) == (0,)
        before = path.stat().st_size
        for batch in range(20):
            await asyncio.gather(*(db.write(_insert, f"row-{batch}-{i}") for i in range(100)))
        assert (tmp_path / "c.db-wal").stat().st_size > 100_000
        deadline = time.monotonic() + 5 + 3 * CHECKPOINT_INTERVAL
        while time.monotonic() < deadline:  # a file's size has no event to wait on: poll it
            if path.stat().st_size > before:
                break
            await asyncio.sleep(0.05)
        assert path.stat().st_size > before
        assert len(_stored(path, "row")) == 2000
    finally:
        await db.aclose()


async def test_sqlite_group_commit_waits_for_another_process_lock(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    db = Database(str(path), busy_timeout=5)
    await db.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        group = asyncio.ensure_future(_group_of_writes(db, "locked"))
        await asyncio.sleep(0.1)
        assert not group.done()
        assert _stored(path, "locked") == []
        other.execute("COMMIT")
        results = await asyncio.wait_for(group, 5)
        assert isinstance(results[7], StorageError)
        assert _stored(path, "locked") == sorted(f"locked-{i}" for i in range(19))
    finally:
        other.close()
        await db.aclose()


async def test_sqlite_outbox_batch_waits_for_another_process_lock(tmp_path: Path) -> None:
    # The batch is one statement in a transaction of its own: it must wait for the lock
    # (busy_timeout) like BEGIN IMMEDIATE, not fail on a snapshot another writer made stale.
    path = tmp_path / "o.db"
    storage = await open_storage(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await storage.tasks.create(task("before"))
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE tasks SET owner = 'other' WHERE id = 'before'")
        batch = [task(f"batch-{n}", status=COMPLETED) for n in range(30)]
        writing = asyncio.ensure_future(storage.tasks.create_many(batch))
        await asyncio.sleep(0.1)
        assert not writing.done()
        other.execute("COMMIT")
        await asyncio.wait_for(writing, 5)
        stored = [await storage.tasks.get(f"batch-{n}") for n in range(30)]
        assert all(record is not None and record.status is COMPLETED for record in stored)
    finally:
        other.close()
        await storage.aclose()


async def test_redis_errors_become_storage_errors() -> None:
    with pytest.raises(StorageError) as caught:
        await open_storage("redis://127.0.0.1:1/0")
    from asap.state.resp import RedisError

    assert isinstance(caught.value.__cause__, RedisError)


# Several processes on one backend


WORKER = """
import asyncio, os, sys
from asap.state import open_storage
from asap.transport.idempotency import IdempotencyRecord

async def main(url, prefix, mode, counter, takeover):
    options = {"idempotency_takeover": float(takeover)}
    if prefix:
        options["key_prefix"] = prefix
    storage = await open_storage(url, **options)
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        if mode == "append":
            for i in range(25):
                await storage.snapshots.append("shared", {"pid": os.getpid(), "i": i})
            return
        async def compute():
            with open(counter, "a") as file:
                file.write(f"{os.getpid()}\\n")
            if mode == "die":
                os._exit(3)
            await asyncio.sleep(0.3)
            return IdempotencyRecord("fp", "task-1", "completed", {"pid": os.getpid()})
        record, replay = await storage.idempotency.run_once("shared", "fp", compute)
        print(record.result["pid"], replay, flush=True)
    finally:
        await storage.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


async def run_workers(
    backend: Backend, mode: str, counter: Path, count: int = 4, takeover: float = 60.0
) -> list[tuple[int | None, str]]:
    """Start ``count`` worker processes, release them together, return (exit code, stdout)."""
    prefix = backend.options.get("key_prefix", "")
    args = [backend.url, prefix, mode, str(counter), str(takeover)]
    pipe = asyncio.subprocess.PIPE
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, *args, stdin=pipe, stdout=pipe, stderr=pipe, cwd=ROOT
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdin is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line == b"ready\n", await proc.communicate()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        results = []
        for proc in procs:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            if mode != "die":
                assert proc.returncode == 0, err.decode()
            results.append((proc.returncode, out.decode()))
        return results
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


durable = pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)


@durable
async def test_processes_appending_lose_no_version(storage: Storage, backend: Backend) -> None:
    await run_workers(backend, "append", Path(os.devnull))
    assert await storage.snapshots.list_versions("shared") == list(range(1, 101))
    snapshots = [await storage.snapshots.get("shared", v) for v in range(1, 101)]
    per_process: dict[int, list[int]] = {}
    for snapshot in snapshots:
        assert snapshot is not None
        per_process.setdefault(snapshot.data["pid"], []).append(snapshot.data["i"])
    assert len(per_process) == 4
    assert all(steps == list(range(25)) for steps in per_process.values())


@durable
async def test_processes_run_once_compute_once(
    storage: Storage, backend: Backend, tmp_path: Path
) -> None:
    counter = tmp_path / "computed"
    results = await run_workers(backend, "run_once", counter)
    runners = counter.read_text().split()
    assert len(runners) == 1
    lines = sorted(out.split() for _, out in results)
    assert lines == sorted([[runners[0], "False"]] + [[runners[0], "True"]] * 3)
    record, replay = await storage.idempotency.run_once("shared", "fp", Counter())
    assert replay and record.result == {"pid": int(runners[0])}


@durable
async def test_claim_of_a_dead_runner_is_taken_over(
    storage: Storage, backend: Backend, tmp_path: Path
) -> None:
    counter = tmp_path / "computed"
    [(code, _)] = await run_workers(backend, "die", counter, count=1, takeover=0.5)
    assert code == 3 and len(counter.read_text().split()) == 1
    started = time.monotonic()
    compute = Counter()
    assert await storage.idempotency.run_once("shared", "fp", compute) == (outcome(1), False)
    assert time.monotonic() - started < 5


@durable
async def test_state_survives_reopening(backend: Backend) -> None:
    first, record = await backend.open(), task()
    try:
        await first.snapshots.append("t", {"step": 1})
        await first.tasks.create(record)
        await first.idempotency.run_once("key", "fp", Counter())
    finally:
        await first.aclose()
    second = await backend.open()
    try:
        assert await second.snapshots.list_versions("t") == [1]
        assert (await second.snapshots.append("t", {"step": 2})).version == 2
        assert await second.tasks.get("task-1") == record
        assert await second.idempotency.run_once("key", "fp", Counter()) == (outcome(1), True)
    finally:
        await second.aclose()


@durable
async def test_heartbeat_keeps_a_long_claim(backend: Backend) -> None:
    """The runner's claim expires 1.5 s after its last heartbeat (one every 0.5 s): a
    2.5 s computation keeps it, and a duplicate waits for its outcome."""
    first, second = await backend.open(idempotency_takeover=1.5), await backend.open()
    try:
        slow, other = Counter(delay=2.5), Counter()
        running = asyncio.ensure_future(first.idempotency.run_once("key", "fp", slow))
        deadline = time.monotonic() + 10
        while not slow.calls:  # claimed once it computes
            assert time.monotonic() < deadline, "the first caller never claimed the key"
            await asyncio.sleep(0.01)
        assert await second.idempotency.run_once("key", "fp", other) == (outcome(1), True)
        assert await running == (outcome(1), False)
        assert (slow.calls, other.calls) == (1, 0)
    finally:
        await first.aclose()
        await second.aclose()


async def test_one_timer_keeps_every_claim_alive_until_it_ends() -> None:
    beats = Heartbeats(0.05)
    counts = {"a": 0, "b": 0, "c": 0}

    def extend(name: str) -> Any:
        async def beat() -> None:
            counts[name] += 1
            if name == "c" and counts[name] == 1:
                raise StorageError("unreachable")  # logged; the next beat still comes

        return beat

    a = beats.start("a", extend("a"))
    await asyncio.sleep(0.02)
    b = beats.start("b", extend("b"))
    await asyncio.sleep(0.01)
    c = beats.start("c", extend("c"))
    b.cancel()  # ends before its first beat: nothing more for it, nothing lost for the rest
    deadline = time.monotonic() + 5
    while counts["a"] < 3 or counts["c"] < 3:
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.01)
    await a.stop()
    await c.stop()
    stopped = dict(counts)
    await asyncio.sleep(0.15)  # three periods: no beat after stop
    assert counts == stopped and counts["b"] == 0


# -- guard: replay nonces and rate windows --------------------------------------------------


async def test_a_nonce_is_used_once_until_it_expires(storage: Storage) -> None:
    guard = storage.guard
    assert await guard.use_nonce("alice n1", 1.0)
    assert not await guard.use_nonce("alice n1", 1.0)
    assert await guard.use_nonce("bob n1", 1.0)  # keys are the caller's to scope
    raced = await asyncio.gather(*(guard.use_nonce("race", 5) for _ in range(20)))
    assert sorted(raced) == [False] * 19 + [True]
    deadline = time.monotonic() + 5
    while not await guard.use_nonce("alice n1", 0.3):
        assert time.monotonic() < deadline, "an expired nonce was never forgotten"
        await asyncio.sleep(0.05)


async def test_a_nonce_used_by_another_storage_instance_is_a_replay(
    storage: Storage, backend: Backend
) -> None:
    """What another worker opening the same URL sees (memory storage is each one's own)."""
    other = await backend.open()
    try:
        assert await storage.guard.use_nonce("shared", 60)
        assert await other.guard.use_nonce("shared", 60) is (backend.name == "memory")
    finally:
        await other.aclose()


async def test_rate_windows_refuse_past_the_limit_and_charge_nothing_then(
    storage: Storage,
) -> None:
    from asap.transport.ratelimit import parse_rate_limit

    limits = parse_rate_limit("5/hour;100/day")
    guard = storage.guard
    assert await guard.charge("alice", limits, 3) is None
    refused = await guard.charge("alice", limits, 3)  # 6 > 5: refused whole
    assert refused is not None and refused[1].text == "5 per 1 hour" and refused[0] >= 1
    assert await guard.charge("alice", limits, 2) is None  # the refused 3 were not charged
    assert await guard.charge("alice", limits) is not None
    assert await guard.charge("bob", limits, 5) is None
    assert await guard.charge("anyone", [], 1000) is None


async def test_a_request_refused_by_a_later_window_is_charged_to_none(storage: Storage) -> None:
    """Refused by its second window, a request leaves the first one as it was (on Redis the
    windows are charged first and taken back, atomically)."""
    from asap.transport.ratelimit import parse_rate_limit

    hour = parse_rate_limit("10/hour")
    both = parse_rate_limit("10/hour;4/day")
    guard = storage.guard
    assert await guard.charge("carol", both, 3) is None
    refused = await guard.charge("carol", both, 2)  # the day's 3 + 2 > 4
    assert refused is not None and refused[1].text == "4 per 1 day"
    assert await guard.charge("carol", hour, 7) is None  # 3 + 7 = 10: the 2 were not charged
    assert await guard.charge("carol", hour, 1) is not None


async def test_redis_rate_windows_expire_and_a_refused_charge_writes_none() -> None:
    """Each window's key gets its expiry when a charge creates it: no counter outlives its
    window; a refused charge creates no key at all."""
    import redis

    from asap.transport.ratelimit import parse_rate_limit

    require_redis()
    prefix = f"asap-test:{uuid.uuid4().hex}:"
    storage = await open_storage(REDIS_URL, key_prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert await storage.guard.charge("dave", parse_rate_limit("5/minute"), 2) is None
        assert await storage.guard.charge("erin", parse_rate_limit("5/minute;1/hour"), 2)
        assert len(client.keys(f"{prefix}rate:*")) == 1
        assert await storage.guard.charge("erin", parse_rate_limit("5/minute;1/hour"), 1) is None
        keys = client.keys(f"{prefix}rate:*")
        assert len(keys) == 3
        assert all(0 < client.pttl(key) <= 3_601_000 for key in keys)
    finally:
        client.close()
        await storage.aclose()
        delete_redis_keys(prefix, REDIS_URL)


async def test_redis_rate_reservations_never_admit_more_than_the_limit_across_workers() -> None:
    """Two workers (two storages on one prefix) charge one sender concurrently: together they
    admit at most the limit, and at most a block (10 of 1,000) short of it per worker; what
    one worker holds unused when the other is refused is still its to use."""
    import redis

    from asap.transport.ratelimit import parse_rate_limit

    require_redis()
    prefix = f"asap-test:{uuid.uuid4().hex}:"
    workers = [await open_storage(REDIS_URL, key_prefix=prefix) for _ in range(2)]
    client = redis.Redis.from_url(REDIS_URL)
    limits = parse_rate_limit("1000/day")

    async def charge(n: int) -> int:
        cost = 3 if n % 7 == 0 else 1
        return cost if await workers[n % 2].guard.charge("frank", limits, cost) is None else 0

    try:
        admitted = sum(await asyncio.gather(*(charge(n) for n in range(1500))))
        (counter,) = [int(client.get(key)) for key in client.keys(f"{prefix}rate:*")]
        assert 1000 - 2 * 10 <= admitted <= counter <= 1000
        for worker in workers:  # now each is refused once it has used what it holds
            while await worker.guard.charge("frank", limits) is None:
                admitted += 1
        assert admitted == counter == 1000
    finally:
        client.close()
        for worker in workers:
            await worker.aclose()
        delete_redis_keys(prefix, REDIS_URL)


async def test_a_redis_rate_reservation_is_a_hundredth_of_the_window_or_exact() -> None:
    """1,000 a day: a worker reserves 10 at a time (one script per 10 requests); 150 a day:
    one at a time, as every limit under 200 per window is charged."""
    import redis

    from asap.transport.ratelimit import parse_rate_limit

    require_redis()
    prefix = f"asap-test:{uuid.uuid4().hex}:"
    storage = await open_storage(REDIS_URL, key_prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)

    def counted(sender: str) -> int:
        (key,) = client.keys(f"{prefix}rate:{{{sender}}}:*")
        return int(client.get(key))

    try:
        seen = []
        for _ in range(11):
            assert await storage.guard.charge("gina", parse_rate_limit("1000/day")) is None
            seen.append(counted("gina"))
        assert seen == [10] * 10 + [20]
        for n in range(1, 4):
            assert await storage.guard.charge("hugo", parse_rate_limit("150/day")) is None
            assert counted("hugo") == n
    finally:
        client.close()
        await storage.aclose()
        delete_redis_keys(prefix, REDIS_URL)


async def test_a_worker_trusts_a_refusal_of_redis_for_a_second() -> None:
    """Refused by Redis, a worker refuses the sender itself (a flood costs Redis nothing more)
    for ``room_known`` seconds (1 s by default): then it asks again, and sees counters deleted
    by hand. The trust period is set here rather than waited for."""
    import redis

    from asap.state.redis import RedisGuardStore
    from asap.transport.ratelimit import parse_rate_limit

    require_redis()
    prefix = f"asap-test:{uuid.uuid4().hex}:"
    storage = await open_storage(REDIS_URL, key_prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    limits = parse_rate_limit("150/day")
    guard = storage.guard
    assert isinstance(guard, RedisGuardStore) and guard.room_known == 1.0
    guard.room_known = 3600
    try:
        for _ in range(150):
            assert await guard.charge("ivan", limits) is None
        assert await guard.charge("ivan", limits) is not None
        client.delete(*client.keys(f"{prefix}rate:*"))  # Redis has room again
        assert await guard.charge("ivan", limits) is not None  # not asked: still trusted
        guard.room_known = 0  # the trust has run out
        assert await guard.charge("ivan", limits) is None
    finally:
        client.close()
        await storage.aclose()
        delete_redis_keys(prefix, REDIS_URL)


async def test_a_cancelled_reservation_lets_the_requests_waiting_for_it_go_on() -> None:
    """The request whose reservation the others wait for is cancelled in flight: they do
    not hang, one of them reserves instead, and all are admitted."""
    from asap.transport.ratelimit import parse_rate_limit

    require_redis()
    prefix = f"asap-test:{uuid.uuid4().hex}:"
    storage = await open_storage(REDIS_URL, key_prefix=prefix)
    limits = parse_rate_limit("1000/day")
    try:
        charges = [asyncio.ensure_future(storage.guard.charge("judy", limits)) for _ in range(30)]
        await asyncio.sleep(0)  # each has started: the first reserves, the rest wait for it
        charges[0].cancel()
        async with asyncio.timeout(5):
            assert await asyncio.gather(*charges[1:]) == [None] * 29
    finally:
        await storage.aclose()
        delete_redis_keys(prefix, REDIS_URL)


async def test_redis_rate_reservations_of_many_senders_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process keeps at most MAX_RESERVED senders' reservations (client addresses can be
    many): past that it forgets them, which only leaves their requests unused."""
    from asap.state import redis as redis_backend
    from asap.transport.ratelimit import parse_rate_limit

    require_redis()
    monkeypatch.setattr(redis_backend, "MAX_RESERVED", 4)
    prefix = f"asap-test:{uuid.uuid4().hex}:"
    storage = await open_storage(REDIS_URL, key_prefix=prefix)
    guard = storage.guard
    assert isinstance(guard, redis_backend.RedisGuardStore)
    try:
        for n in range(50):
            assert await guard.charge(f"sender-{n}", parse_rate_limit("1000/day")) is None
            assert len(guard._reserved) <= 4
    finally:
        await storage.aclose()
        delete_redis_keys(prefix, REDIS_URL)


async def test_create_many_stores_new_tasks_and_leaves_existing_ones(storage: Storage) -> None:
    """The outbox's batched write: one call for many short tasks, idempotent per id."""
    first = task("task-1", status=COMPLETED, result={"n": 1})
    await storage.tasks.create(first)
    batch = [task("task-1", status=COMPLETED, result={"n": "other"})] + [
        task(f"task-{n}", status=COMPLETED, result={"n": n}) for n in range(2, 250)
    ]
    await storage.tasks.create_many(batch)
    await storage.tasks.create_many([])
    stored = [await storage.tasks.get(f"task-{n}") for n in range(1, 250)]
    assert [r.result for r in stored if r is not None] == [{"n": n} for n in range(1, 250)]


# Retention: finished tasks are purged


TERMINAL = (COMPLETED, FAILED, TaskStatus.CANCELLED)


async def test_purge_deletes_only_finished_tasks_older_than_the_cutoff(storage: Storage) -> None:
    now = time.time()
    for n, status in enumerate(TERMINAL):
        await storage.tasks.create(task(f"old-{status}", status=status, updated_at=100.0 + n))
        await storage.tasks.create(task(f"new-{status}", status=status, updated_at=now))
    for status in (SUBMITTED, WORKING, TaskStatus.INPUT_REQUIRED):  # however old: kept
        await storage.tasks.create(task(f"active-{status}", status=status, updated_at=1.0))
    purged = await storage.tasks.purge(now - 60)
    assert purged == ["old-completed", "old-failed", "old-cancelled"]  # oldest first
    for status in TERMINAL:
        assert await storage.tasks.get(f"old-{status}") is None
        assert await storage.tasks.get(f"new-{status}") is not None
    for status in (SUBMITTED, WORKING, TaskStatus.INPUT_REQUIRED):
        assert await storage.tasks.get(f"active-{status}") is not None
    assert await storage.tasks.purge(now - 60) == []
    assert await storage.tasks.purge(now) == []  # before: not at


async def test_purge_respects_the_limit_oldest_first(storage: Storage) -> None:
    times = [50.0, 10.0, 70.0, 30.0, 20.0, 60.0, 40.0]
    await storage.tasks.create_many(  # the outbox's write marks them finished too
        [task(f"t{int(t)}", status=COMPLETED, updated_at=t) for t in times[:4]]
    )
    for t in times[4:]:
        await storage.tasks.create(task(f"t{int(t)}", status=FAILED, updated_at=t))
    assert await storage.tasks.purge(1000.0, limit=3) == ["t10", "t20", "t30"]
    assert await storage.tasks.purge(65.0, limit=3) == ["t40", "t50", "t60"]
    assert await storage.tasks.purge(1000.0, limit=0) == []
    assert await storage.tasks.purge(1000.0, limit=3) == ["t70"]
    assert await storage.tasks.purge(1000.0) == []


async def test_a_task_finishing_now_is_purged_only_once_its_time_has_passed(
    storage: Storage,
) -> None:
    await storage.tasks.create(task(status=WORKING, updated_at=1.0, lease_until=1.0))
    assert await storage.tasks.purge(time.time()) == []  # active
    finished = await storage.tasks.update("task-1", status=COMPLETED, result={"ok": 1})
    assert finished is not None and finished.updated_at > time.time() - 60
    assert await storage.tasks.purge(time.time() - 60) == []
    assert await storage.tasks.purge(finished.updated_at + 1) == ["task-1"]
    assert await storage.tasks.get("task-1") is None
    assert await storage.tasks.update("task-1", progress={"percent": 1}) is None


async def test_concurrent_purges_report_each_task_once(storage: Storage, backend: Backend) -> None:
    """Every worker purges on its own; together they delete each task once."""
    await storage.tasks.create_many(
        [task(f"t{n:03d}", status=COMPLETED, updated_at=float(n)) for n in range(200)]
    )
    other = await backend.open() if backend.name != "memory" else storage

    async def worker(store: Storage) -> list[str]:
        purged: list[str] = []
        while ids := await store.tasks.purge(1000.0, limit=70):  # [] when all were taken
            purged += ids
        return purged

    try:
        results = await asyncio.gather(*(worker(s) for s in (storage, other, storage, other)))
    finally:
        if other is not storage:
            await other.aclose()
    purged = [task_id for ids in results for task_id in ids]
    assert sorted(purged) == [f"t{n:03d}" for n in range(200)]  # each one reported once
    assert await storage.tasks.purge(1000.0) == []


async def test_purge_finished_deletes_tasks_and_their_snapshots_in_batches(
    storage: Storage,
) -> None:
    now = time.time()
    await storage.tasks.create_many(
        [task(f"old-{n:02d}", status=COMPLETED, updated_at=float(n)) for n in range(25)]
    )
    await storage.tasks.create(task("recent", status=COMPLETED, updated_at=now))
    await storage.tasks.create(task("running", status=WORKING, updated_at=1.0))
    for task_id in ("old-00", "old-07", "old-24", "recent", "running"):
        await storage.snapshots.append(task_id, {"step": 1})
        await storage.snapshots.append(task_id, {"step": 2}, checkpoint=True)
    first = await storage.purge_finished(now - 60, batch=10, max_batches=2)
    assert first == [f"old-{n:02d}" for n in range(20)]  # capped: 2 batches of 10
    assert await storage.snapshots.list_versions("old-00") == []
    assert await storage.snapshots.get("old-07") is None
    assert await storage.snapshots.list_versions("old-24") == [1, 2]  # its task is not purged
    assert await storage.purge_finished(now - 60, batch=10, max_batches=2) == [
        f"old-{n:02d}" for n in range(20, 25)
    ]
    assert await storage.snapshots.list_versions("old-24") == []
    assert await storage.purge_finished(now - 60) == []
    for task_id in ("recent", "running"):
        assert await storage.tasks.get(task_id) is not None
        assert await storage.snapshots.list_versions(task_id) == [1, 2]


async def test_delete_many_snapshots(storage: Storage) -> None:
    for task_id in ("a", "b", "c"):
        await storage.snapshots.append(task_id, {})
    await storage.snapshots.delete_many(["a", "c", "missing"])
    await storage.snapshots.delete_many([])
    assert [await storage.snapshots.list_versions(t) for t in ("a", "b", "c")] == [[], [1], []]
    assert await storage.snapshots.append("a", {}) == await storage.snapshots.get("a")


async def test_sqlite_purge_uses_the_finished_index(tmp_path: Path) -> None:
    """The point of the index: a purge reads the oldest finished rows, not the table."""
    from asap.state.sqlite import PURGE_TASKS

    path = tmp_path / "state.db"

    def check_plan(analyze: bool) -> None:
        conn = sqlite3.connect(path)
        try:
            if analyze:
                conn.execute("ANALYZE")
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {PURGE_TASKS}", (1.0, 9))]
        finally:
            conn.close()
        assert any("USING INDEX tasks_finished (<expr><?)" in step for step in plan), plan
        assert not any(step.startswith("SCAN") or "TEMP B-TREE" in step for step in plan), plan

    storage = await open_storage(f"sqlite:///{path}")
    try:
        check_plan(analyze=False)  # no statistics (as agents run): would pick tasks_by_lease
        await storage.tasks.create_many(
            [task(f"t{n}", status=(COMPLETED, WORKING)[n % 2], updated_at=n) for n in range(500)]
        )
        check_plan(analyze=False)
        check_plan(analyze=True)
        assert len(await storage.tasks.purge(1000.0)) == 250
    finally:
        await storage.aclose()


async def test_sqlite_file_from_before_retention_is_purged_without_migration(
    tmp_path: Path,
) -> None:
    """A file written by a version without the index gets it when opened."""
    from asap.state.sqlite import SCHEMA

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    try:
        conn.executescript("\n".join(s for s in SCHEMA.split("\n") if "tasks_finished" not in s))
        record = task("old-task", status=COMPLETED, updated_at=5.0)
        conn.execute(
            "INSERT INTO tasks (id, status, record) VALUES (?, ?, ?)",
            (record.id, record.status.value, json.dumps(record.to_dict())),
        )
        conn.commit()
    finally:
        conn.close()
    storage = await open_storage(f"sqlite:///{path}")
    try:
        assert await storage.tasks.get("old-task") == record
        assert await storage.tasks.purge(10.0) == ["old-task"]
    finally:
        await storage.aclose()


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_redis_purge_deletes_the_hash_and_leaves_the_finished_set(
    storage: Storage, backend: Backend
) -> None:
    prefix = backend.options["key_prefix"]
    client = redis_client()
    try:
        await storage.tasks.create(task(status=WORKING, lease_until=time.time() + 60))
        assert client.zscore(f"{prefix}finished", "task-1") is None
        done = await storage.tasks.update("task-1", status=COMPLETED, result={"ok": True})
        assert done is not None
        assert client.zscore(f"{prefix}finished", "task-1") == done.updated_at
        assert client.zscore(f"{prefix}leases", "task-1") is None
        assert await storage.tasks.purge(done.updated_at + 1) == ["task-1"]
        assert client.hget(f"{prefix}task:task-1", "record") is None
        assert client.exists(f"{prefix}task:task-1") == 0
        assert client.zcard(f"{prefix}finished") == 0
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_redis_record_finished_before_the_finished_set_stays_readable(
    storage: Storage, backend: Backend
) -> None:
    """A hash written by the previous version is read as before, and never purged (it is
    not in ``finished``)."""
    prefix = backend.options["key_prefix"]
    record = task("legacy", status=COMPLETED, updated_at=5.0)
    client = redis_client()
    try:
        client.hset(
            f"{prefix}task:legacy",
            mapping={
                "record": json.dumps(record.to_dict()),
                "status": "completed",
                "owner": "",
                "lease_until": "",
                "cancel_requested": "0",
                "rev": "1",
            },
        )
        assert await storage.tasks.get("legacy") == record
        assert await storage.tasks.purge(time.time()) == []
        assert await storage.tasks.get("legacy") == record
    finally:
        client.close()

"""Redis backend (``redis://host:port/db``, ``rediss://``): state shared by every worker and host.

Talks to Redis through :mod:`asap.state.resp`, a small client of our own (one connection per
process, concurrent commands pipelined on it; no extra package). Every key starts with
``key_prefix`` (``asap:``). Layout, ``{...}`` being a cluster hash tag:

- ``snapshots:{task}``: hash version -> snapshot JSON; ``versions:{task}``: sorted set of the
  versions (score = version). ``append`` and ``save`` are Lua scripts, so the next version is
  allocated and both keys written in one atomic step;
- ``task:<id>``: hash with the record JSON, ``status``, ``owner``, ``lease_until``,
  ``cancel_requested`` and a revision ``rev``; ``leases``: sorted set of the submitted or working
  tasks that have a lease (score = ``lease_until``) for :meth:`RedisTaskStore.expired`;
  ``finished``: sorted set of the finished tasks (score = ``updated_at``) for
  :meth:`RedisTaskStore.purge`. The same script writes the hash and both sets. A change
  reads the record, applies it in Python (spec 2.3 transitions), then writes it with a Lua
  compare-and-set on ``rev``, retrying when another writer came first. A task that finished
  before ``finished`` existed is not in it, so it is never purged (delete such keys by hand);
- ``idempotency:<key>``: ``SET NX PX`` of a pending value is the claim; the runner's heartbeat
  extends it, so it expires ``takeover`` seconds after a runner dies and the next caller claims
  the key; the outcome replaces it for ``ttl`` seconds.

Every :class:`asap.state.resp.RedisError` surfaces as :class:`~asap.state.store.StorageError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from asap.errors import ConfigurationError
from asap.models.base import utc_now
from asap.models.entities import StateSnapshot
from asap.models.enums import TaskStatus
from asap.models.ids import generate_id
from asap.state.resp import Arg, Client, RedisError, Script
from asap.state.store import (
    GuardStore,
    SnapshotConflictError,
    SnapshotStore,
    Storage,
    StorageError,
    TaskRecord,
    TaskStore,
    apply_changes,
    can_claim,
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
from asap.transport.ratelimit import RateLimit, retry_after

__all__ = [
    "RedisGuardStore",
    "RedisIdempotencyStore",
    "RedisSnapshotStore",
    "RedisTaskStore",
    "redis_storage",
]

T = TypeVar("T")

OPTIONS = frozenset(
    {"key_prefix", "idempotency_ttl", "idempotency_takeover", "idempotency_max_entries"}
)
"""Options :func:`redis_storage` accepts (``idempotency_max_entries`` is the memory backend's
and ignored here: entries are bounded by their TTL)."""
ACTIVE = (TaskStatus.SUBMITTED, TaskStatus.WORKING)
POLL_FIRST, POLL_MAX = 0.01, 0.2
"""Seconds between two looks at a key another process is computing (doubling)."""

APPEND_SNAPSHOT = """
local top = redis.call('ZREVRANGE', KEYS[2], 0, 0)
local version = 1
if top[1] then version = tonumber(top[1]) + 1 end
redis.call('HSET', KEYS[1], version, ARGV[1])
redis.call('ZADD', KEYS[2], version, version)
return version
"""
SAVE_SNAPSHOT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
return 1
"""
LATEST_SNAPSHOT = """
local top = redis.call('ZREVRANGE', KEYS[2], 0, 0)
if not top[1] then return false end
return {top[1], redis.call('HGET', KEYS[1], top[1])}
"""
DELETE_SNAPSHOTS = """
if ARGV[1] == '' then
  local found = redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  return found
end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""
WRITE_TASK_LUA = """
local function write()
  redis.call('HSET', KEYS[1], 'record', ARGV[2], 'status', ARGV[3], 'owner', ARGV[4],
             'lease_until', ARGV[5], 'cancel_requested', ARGV[6])
  if ARGV[7] == '1' then redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  else redis.call('ZREM', KEYS[2], ARGV[1]) end
  if ARGV[8] ~= '' then redis.call('ZADD', KEYS[3], ARGV[8], ARGV[1]) end
  redis.call('HINCRBY', KEYS[1], 'rev', 1)
  return 1
end
"""
"""Write a task: KEYS = hash, ``leases``, ``finished``; ARGV = id, record JSON, status, owner,
lease_until, cancel_requested, whether it is in ``leases``, its ``finished`` score (its
``updated_at`` when its status is terminal, else empty: a status never leaves terminal)."""
CREATE_TASK = (
    WRITE_TASK_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return write()
"""
)
CHANGE_TASK = (
    WRITE_TASK_LUA
    + """
if redis.call('HGET', KEYS[1], 'rev') ~= ARGV[9] then return 0 end
return write()
"""
)
CLAIM_KEY = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return {0, redis.call('GET', KEYS[1])}
"""
EXTEND_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
FINISH_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


async def call(awaitable: Awaitable[T]) -> T:
    """Await a Redis command, its errors translated (style rule 4)."""
    try:
        return await awaitable
    except RedisError as exc:
        raise StorageError(f"Redis: {exc}") from exc


def checked(results: list[Any]) -> list[Any]:
    """A pipeline's results, or :class:`StorageError` for the first error among them."""
    for result in results:
        if isinstance(result, RedisError):
            raise StorageError(f"Redis: {result}") from result
    return results


def milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


RESERVE_RATE = """
local need, take, room, tightest = tonumber(ARGV[1]), tonumber(ARGV[2]), nil, 1
for i, key in ipairs(KEYS) do
  local free = tonumber(ARGV[i * 2 + 1]) - tonumber(redis.call('GET', key) or '0')
  if free < need then return {0, free, i} end
  if room == nil or free < room then room, tightest = free, i end
end
if room < take then take = room end
for i, key in ipairs(KEYS) do
  if redis.call('INCRBY', key, take) == take then redis.call('PEXPIRE', key, ARGV[i * 2 + 2]) end
end
return {take, room - take, tightest}
"""
"""Reserve at least ARGV[1] and at most ARGV[2] requests in every window (KEYS; then per
window its count and the expiry its key gets when created), or none. Returns the number
reserved (0: refused), the room left in the tightest window (the one that refused), and that
window's index."""
RESERVE_SHARE, RESERVE_MAX = 100, 64
"""A reservation takes up to 1/RESERVE_SHARE of the smallest window's count, at most
RESERVE_MAX requests (at least the request's cost)."""
MAX_RESERVED = 10_000
"""Senders whose reservations a process keeps before it forgets those of past windows."""
SCRIPTS = {
    "rate": RESERVE_RATE,
    "append": APPEND_SNAPSHOT,
    "save": SAVE_SNAPSHOT,
    "latest": LATEST_SNAPSHOT,
    "delete": DELETE_SNAPSHOTS,
    "create": CREATE_TASK,
    "change": CHANGE_TASK,
    "claim": CLAIM_KEY,
    "extend": EXTEND_CLAIM,
    "finish": FINISH_CLAIM,
    "release": RELEASE_CLAIM,
}


LOADED = {name: Script(text) for name, text in SCRIPTS.items()}


class Connection:
    """The client and scripts the three stores share, closed once."""

    def __init__(self, client: Client, prefix: str) -> None:
        self._client = client
        self.prefix = prefix
        self._closed = False

    def __repr__(self) -> str:
        return f"Connection(prefix={self.prefix!r}, closed={self._closed})"

    def _live(self) -> Client:
        if self._closed:
            raise StorageError("Redis storage is closed")
        return self._client

    async def execute(self, *args: Arg) -> Any:
        """One command's reply."""
        try:  # not through call(): a coroutine fewer on every command
            return await self._live().execute(*args)
        except RedisError as exc:
            raise StorageError(f"Redis: {exc}") from exc

    async def pipeline(self, commands: list[list[Arg]]) -> list[Any]:
        """Several commands in one round trip; the first error reply raises."""
        return checked(await call(self._live().pipeline(commands)))

    async def script(self, name: str, keys: list[str], args: Sequence[Arg]) -> Any:
        """Run a Lua script (EVALSHA, its text on NOSCRIPT)."""
        try:
            return await self._live().run(LOADED[name], keys, args)
        except RedisError as exc:
            raise StorageError(f"Redis: {exc}") from exc

    async def scripts(self, name: str, calls: list[tuple[list[str], list[Arg]]]) -> list[Any]:
        """Run a Lua script once per (keys, args), all in one pipeline: one round trip."""
        return checked(await call(self._live().run_many(LOADED[name], calls)))

    async def aclose(self) -> None:
        """Close the connection; later calls raise :class:`StorageError`."""
        if not self._closed:
            self._closed = True
            await call(self._client.aclose())


class RedisSnapshotStore(SnapshotStore):
    """Snapshots as a hash of JSON per task plus a sorted set of its versions."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __repr__(self) -> str:
        return f"RedisSnapshotStore(prefix={self._conn.prefix!r})"

    def _keys(self, task_id: str) -> list[str]:
        prefix = self._conn.prefix
        return [f"{prefix}snapshots:{{{task_id}}}", f"{prefix}versions:{{{task_id}}}"]

    @staticmethod
    def _body(snapshot_id: str, data: dict[str, Any], checkpoint: bool, created_at: str) -> str:
        body = {"id": snapshot_id, "data": data, "checkpoint": checkpoint, "created_at": created_at}
        return to_json(body, "snapshot data")

    @staticmethod
    def _load(task_id: str, version: int | str | bytes, body: str | bytes) -> StateSnapshot:
        return StateSnapshot.model_validate(
            orjson.loads(body) | {"task_id": task_id, "version": int(version)}
        )

    async def save(self, snapshot: StateSnapshot) -> None:
        body = self._body(
            snapshot.id, snapshot.data, snapshot.checkpoint, snapshot.created_at.isoformat()
        )
        keys = self._keys(snapshot.task_id)
        if not await self._conn.script("save", keys, [snapshot.version, body]):
            raise SnapshotConflictError(
                f"Snapshot {snapshot.task_id} v{snapshot.version} already exists"
            )

    async def append(
        self, task_id: str, data: dict[str, Any], *, checkpoint: bool = False
    ) -> StateSnapshot:
        body = self._body(f"snap_{generate_id()}", data, checkpoint, utc_now().isoformat())
        version = await self._conn.script("append", self._keys(task_id), [body])
        return self._load(task_id, version, body)

    async def get(self, task_id: str, version: int | None = None) -> StateSnapshot | None:
        keys = self._keys(task_id)
        if version is None:
            found = await self._conn.script("latest", keys, [])
            return self._load(task_id, found[0], found[1]) if found else None
        body = await self._conn.execute("HGET", keys[0], str(version))
        return self._load(task_id, version, body) if body is not None else None

    async def get_by_id(self, task_id: str, snapshot_id: str) -> StateSnapshot | None:
        flat = await self._conn.execute("HGETALL", self._keys(task_id)[0])
        for version, body in zip(flat[::2], flat[1::2], strict=True):
            if orjson.loads(body)["id"] == snapshot_id:
                return self._load(task_id, version, body)
        return None

    async def list_versions(self, task_id: str) -> list[int]:
        versions = await self._conn.execute("ZRANGE", self._keys(task_id)[1], 0, -1)
        return [int(version) for version in versions]

    async def delete(self, task_id: str, version: int | None = None) -> bool:
        arg = "" if version is None else str(version)
        return bool(await self._conn.script("delete", self._keys(task_id), [arg]))

    async def delete_many(self, task_ids: list[str]) -> None:
        if task_ids:
            await self._conn.pipeline([["DEL", *self._keys(task_id)] for task_id in task_ids])

    async def aclose(self) -> None:
        """Close the shared connection (once for the three stores)."""
        await self._conn.aclose()


class RedisTaskStore(TaskStore):
    """Task records as hashes; changes are compare-and-set on a revision (see the module doc)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._leases = f"{conn.prefix}leases"
        self._finished = f"{conn.prefix}finished"

    def __repr__(self) -> str:
        return f"RedisTaskStore(prefix={self._conn.prefix!r})"

    def _key(self, task_id: str) -> str:
        return f"{self._conn.prefix}task:{task_id}"

    def _keys(self, task_id: str) -> list[str]:
        return [self._key(task_id), self._leases, self._finished]

    def _args(self, record: TaskRecord) -> list[Arg]:
        lease = "" if record.lease_until is None else repr(record.lease_until)
        active = record.status in ACTIVE and record.lease_until is not None
        finished = repr(float(record.updated_at)) if record.status.is_terminal() else ""
        return [
            record.id,
            to_json(record.to_dict(), "task record"),
            record.status.value,
            record.owner or "",
            lease,
            int(record.cancel_requested),
            int(active),
            finished,
        ]

    async def create(self, record: TaskRecord) -> None:
        if not await self._conn.script("create", self._keys(record.id), self._args(record)):
            raise StorageError(f"Task {record.id} already exists")

    async def create_many(self, records: list[TaskRecord]) -> None:
        # one pipeline of ``create`` scripts; each leaves an existing task as it is
        calls = [(self._keys(r.id), self._args(r)) for r in records]
        if calls:
            await self._conn.scripts("create", calls)

    async def get(self, task_id: str) -> TaskRecord | None:
        text = await self._conn.execute("HGET", self._key(task_id), "record")
        return load_task(text) if text is not None else None

    async def _change(
        self, task_id: str, change: Callable[[TaskRecord], TaskRecord | None]
    ) -> TaskRecord | None:
        """Read, ``change`` and write back unless another writer came first (then again)."""
        keys = self._keys(task_id)
        while True:
            text, rev = await self._conn.execute("HMGET", keys[0], "record", "rev")
            if text is None:
                return None
            updated = change(load_task(text))
            if updated is None:
                return None
            if await self._conn.script("change", keys, [*self._args(updated), rev]):
                return updated

    async def update(
        self, task_id: str, *, expect: frozenset[TaskStatus] | None = None, **changes: Any
    ) -> TaskRecord | None:
        return await self._change(task_id, lambda record: apply_changes(record, expect, changes))

    async def expired(self, now: float) -> list[TaskRecord]:
        ids = await self._conn.execute("ZRANGEBYSCORE", self._leases, "-inf", f"({now!r}")
        if not ids:
            return []
        texts = await self._conn.pipeline([["HGET", self._key(i), "record"] for i in ids])
        records = [load_task(text) for text in texts if text is not None]
        return [record for record in records if can_claim(record, now)]

    async def claim(self, task_id: str, owner: str, lease_until: float, now: float) -> bool:
        def take(record: TaskRecord) -> TaskRecord | None:
            if not can_claim(record, now):
                return None
            record.owner, record.lease_until, record.updated_at = owner, lease_until, time.time()
            return record

        return await self._change(task_id, take) is not None

    async def renew(self, task_ids: list[str], owner: str, lease_until: float) -> None:
        def extend(record: TaskRecord) -> TaskRecord | None:
            if record.owner != owner or record.status.is_terminal():
                return None
            record.lease_until = lease_until
            return record

        for task_id in dict.fromkeys(task_ids):
            await self._change(task_id, extend)

    async def cancel_requested(self, task_ids: list[str]) -> list[str]:
        if not task_ids:
            return []
        flags = await self._conn.pipeline(
            [["HGET", self._key(task_id), "cancel_requested"] for task_id in task_ids]
        )
        return [task_id for task_id, flag in zip(task_ids, flags, strict=True) if flag == "1"]

    async def purge(self, finished_before: float, limit: int = 1000) -> list[str]:
        """The oldest ids of ``finished`` below ``finished_before``, then one pipeline that
        deletes their hashes and takes them out of ``finished``. Concurrent purges may read
        the same ids; only the one whose ``DEL`` deleted a hash reports it."""
        if limit < 1:
            return []
        cutoff = f"({float(finished_before)!r}"
        ids = await self._conn.execute(
            "ZRANGEBYSCORE", self._finished, "-inf", cutoff, "LIMIT", 0, limit
        )
        if not ids:
            return []
        deleted = await self._conn.pipeline(
            [["DEL", self._key(task_id)] for task_id in ids] + [["ZREM", self._finished, *ids]]
        )
        return [task_id for task_id, gone in zip(ids, deleted[:-1], strict=True) if gone]

    async def aclose(self) -> None:
        """Close the shared connection (once for the three stores)."""
        await self._conn.aclose()


class RedisIdempotencyStore(SharedIdempotencyStore):
    """Outcomes under ``idempotency:<key>``, shared by every process using the Redis.

    ``SET NX PX`` of a pending value is the claim: its runner computes while duplicates poll
    the key; a runner that dies stops its heartbeat, so the claim expires after ``takeover``
    seconds and the next caller claims the key. Outcomes are kept ``ttl`` seconds.
    """

    def __init__(self, conn: Connection, ttl: float = 3600.0, takeover: float = 60.0) -> None:
        if ttl <= 0 or takeover <= 0:
            raise ValueError("idempotency_ttl and idempotency_takeover must be positive")
        super().__init__()
        self._conn = conn
        self.ttl = ttl
        self.takeover = takeover
        self._heartbeats = Heartbeats(takeover / 3)

    def __repr__(self) -> str:
        return (
            f"RedisIdempotencyStore(prefix={self._conn.prefix!r}, ttl={self.ttl}, "
            f"takeover={self.takeover})"
        )

    async def _lead(
        self, key: str, fingerprint: str, compute: Callable[[], Awaitable[IdempotencyRecord]]
    ) -> tuple[IdempotencyRecord, bool]:
        name = f"{self._conn.prefix}idempotency:{key}"
        pending = to_json(
            {"state": "pending", "fingerprint": fingerprint, "token": generate_id()}, "key"
        )
        delay, look = POLL_FIRST, False
        while True:
            if look:
                found = await self._conn.execute("GET", name)
            else:
                claimed, *rest = await self._conn.script(
                    "claim", [name], [pending, milliseconds(self.takeover)]
                )
                if claimed:
                    return await self._compute(name, pending, fingerprint, compute), False
                found = rest[0] if rest else None
            if found is None:  # the runner failed or its claim expired: claim it
                look = False
                continue
            entry = orjson.loads(found)
            if entry["fingerprint"] != fingerprint:
                raise key_reused(key)
            if entry["state"] == "done":
                return IdempotencyRecord(**entry["record"]), True
            await asyncio.sleep(delay)
            delay, look = min(delay * 2, POLL_MAX), True

    async def _compute(
        self,
        name: str,
        pending: str,
        fingerprint: str,
        compute: Callable[[], Awaitable[IdempotencyRecord]],
    ) -> IdempotencyRecord:
        heartbeat = self._heartbeats.start(
            name,
            lambda: self._conn.script("extend", [name], [pending, milliseconds(self.takeover)]),
        )
        try:
            record = await compute()
            done = to_json(
                {"state": "done", "fingerprint": fingerprint, "record": vars(record)},
                "idempotency record",
            )
        except BaseException:
            heartbeat.cancel()
            try:
                await self._conn.script("release", [name], [pending])
            except StorageError as exc:  # the claim expires after `takeover` anyway
                warn("idempotency_release_failed", key=name, error=str(exc))
            raise
        await heartbeat.stop()
        if not await self._conn.script("finish", [name], [pending, done, milliseconds(self.ttl)]):
            warn("idempotency_claim_lost", key=name, takeover=self.takeover)
        return record

    async def aclose(self) -> None:
        """Close the shared connection (once for the three stores)."""
        await self._conn.aclose()


class _Reservation:
    """What a process holds of one sender's current windows (see :meth:`RedisGuardStore.charge`)."""

    __slots__ = ("asked_at", "full", "left", "reserving", "room", "windows")

    def __init__(self, windows: tuple[int, ...]) -> None:
        self.windows = windows
        self.left = 0
        """Requests reserved in Redis and not used yet."""
        self.room = 0
        """The room Redis had left when last asked (it only shrinks within the windows, unless
        someone deletes the counters), trusted for ``room_known`` seconds from ``asked_at``."""
        self.asked_at = float("-inf")
        self.full = 0
        """The window (1-based index) with that room."""
        self.reserving: asyncio.Future[None] | None = None
        """Done when the reservation in flight is back."""


class RedisGuardStore(GuardStore):
    """``nonce:<key>`` set with ``NX PX``; ``rate:{<key>}:<seconds>:<count>:<window>``
    counters shared by every worker and host, from which each process reserves requests in
    blocks (:meth:`charge`)."""

    room_known = 1.0
    """Seconds this process trusts the room Redis last reported for a sender's windows: it
    refuses requests that need more without asking again."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._reserved: dict[tuple[str, tuple[RateLimit, ...]], _Reservation] = {}

    async def use_nonce(self, key: str, ttl: float) -> bool:
        name = f"{self._conn.prefix}nonce:{key}"
        reply = await self._conn.execute("SET", name, "1", "NX", "PX", milliseconds(ttl))
        return reply is not None  # "OK", or nil when the nonce was used

    async def charge(
        self, key: str, limits: list[RateLimit], cost: int = 1
    ) -> tuple[int, RateLimit] | None:
        """Charge ``cost`` to what this process has reserved in ``key``'s current windows;
        when that is not enough, reserve more with one script, which counts them in Redis for
        every window at once, or refuses when a window has no room for the rest.

        A reservation is up to a hundredth of the smallest window's count, at most 64
        requests, so a busy worker reaches Redis once per block rather than once per request;
        concurrent requests of one sender wait for the reservation in flight rather than make
        their own. No window ever admits more than its count across all workers; a sender
        spread over N workers may be refused up to N blocks short of it (what the others hold
        unused), and a limit under 200 per window is charged request by request, exactly.
        For a second after Redis has refused a window, requests that need more than the room
        it reported are refused here without asking again (a flood over the limit costs Redis
        one call a second per worker)."""
        if not limits:
            return None
        slot = (key, tuple(limits))
        while True:
            now = time.time()
            windows = tuple(int(now // limit.seconds) for limit in limits)
            held = self._reserved.get(slot)
            if held is None or held.windows != windows:
                if held is None and len(self._reserved) >= MAX_RESERVED:
                    self._forget_past(now)
                held = self._reserved[slot] = _Reservation(windows)
            if held.left >= cost:
                held.left -= cost
                return None
            need = cost - held.left
            if need > held.room and now < held.asked_at + self.room_known:
                limit = limits[held.full - 1]
                return retry_after(limit, now), limit
            if held.reserving is None:
                break
            await asyncio.shield(held.reserving)
        block = min(RESERVE_MAX, *(limit.count // RESERVE_SHARE for limit in limits))
        keys, args = [], [need, max(need, block)]
        for limit, window in zip(limits, windows, strict=True):
            keys.append(f"{self._conn.prefix}rate:{{{key}}}:{limit.seconds}:{limit.count}:{window}")
            reset = (window + 1) * limit.seconds - now
            args += [limit.count, milliseconds(reset + 1)]
        left, held.left = held.left, 0  # this request's, unless it is refused
        held.reserving = done = asyncio.get_running_loop().create_future()
        try:
            taken, held.room, held.full = await self._conn.script("rate", keys, args)
            held.asked_at = now
        except BaseException:
            held.left += left
            raise
        finally:
            held.reserving = None
            done.set_result(None)
        if taken:
            held.left += taken - need
            return None
        held.left += left
        limit = limits[held.full - 1]
        return retry_after(limit, now), limit

    def _forget_past(self, now: float) -> None:
        """Drop the reservations of windows that have ended (and all of them if that is not
        enough: forgetting one only leaves its requests unused)."""
        self._reserved = {
            slot: held
            for slot, held in self._reserved.items()
            if held.windows == tuple(int(now // limit.seconds) for limit in slot[1])
        }
        if len(self._reserved) >= MAX_RESERVED:
            self._reserved.clear()


async def redis_storage(url: str, **options: Any) -> Storage:
    """Connect to the Redis ``url`` names and check that it answers.

    Options: ``key_prefix`` (``asap:``), ``idempotency_ttl`` (seconds an outcome is kept,
    3600), ``idempotency_takeover`` (seconds after which the claim of a runner that stopped
    sending heartbeats expires, 60). Client settings go in the URL query
    (``?socket_timeout=5``); the defaults are 5 s to connect and 10 s per command.
    """
    unknown = set(options) - OPTIONS - {"busy_timeout"}  # busy_timeout: the SQLite backend's
    if unknown:
        raise ConfigurationError(f"unknown Redis storage options: {sorted(unknown)}")
    prefix = str(options.get("key_prefix", "asap:"))
    ttl = float(options.get("idempotency_ttl", 3600.0))
    takeover = float(options.get("idempotency_takeover", 60.0))
    try:
        client = Client(url)
    except ValueError as exc:
        raise ConfigurationError(f"Redis storage URL: {exc}") from exc
    conn = Connection(client, prefix)
    try:
        idempotency = RedisIdempotencyStore(conn, ttl, takeover)
        await conn.execute("PING")
    except BaseException:
        await conn.aclose()
        raise
    return Storage(
        url,
        RedisSnapshotStore(conn),
        RedisTaskStore(conn),
        idempotency,
        shared=True,
        guard=RedisGuardStore(conn),
    )

"""Redis backend (``redis://host:port/db``, ``rediss://``): state shared by every worker and host.

Needs the optional ``redis`` package (``pip install 'asap[redis]'``). Every key starts with
``key_prefix`` (``asap:``). Layout, ``{...}`` being a cluster hash tag:

- ``snapshots:{task}``: hash version -> snapshot JSON; ``versions:{task}``: sorted set of the
  versions (score = version). ``append`` and ``save`` are Lua scripts, so the next version is
  allocated and both keys written in one atomic step;
- ``task:<id>``: hash with the record JSON, ``status``, ``owner``, ``lease_until``,
  ``cancel_requested`` and a revision ``rev``; ``leases``: sorted set of the submitted or working
  tasks that have a lease (score = ``lease_until``) for :meth:`RedisTaskStore.expired`. A change
  reads the record, applies it in Python (spec 2.3 transitions), then writes it with a Lua
  compare-and-set on ``rev``, retrying when another writer came first;
- ``idempotency:<key>``: ``SET NX PX`` of a pending value is the claim; the runner's heartbeat
  extends it, so it expires ``takeover`` seconds after a runner dies and the next caller claims
  the key; the outcome replaces it for ``ttl`` seconds.

Every ``redis.exceptions.RedisError`` surfaces as :class:`~asap.state.store.StorageError`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from asap.errors import ConfigurationError
from asap.models.base import utc_now
from asap.models.entities import StateSnapshot
from asap.models.enums import TaskStatus
from asap.models.ids import generate_id
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
    to_json,
)
from asap.transport.idempotency import (
    IdempotencyRecord,
    SharedIdempotencyStore,
    key_reused,
    warn,
)
from asap.transport.ratelimit import RateLimit

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
  redis.call('HINCRBY', KEYS[1], 'rev', 1)
  return 1
end
"""
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
if redis.call('HGET', KEYS[1], 'rev') ~= ARGV[8] then return 0 end
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


def milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


CHARGE_RATE = """
local cost = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') + cost > tonumber(ARGV[i * 2]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, cost)
  redis.call('PEXPIRE', key, ARGV[i * 2 + 1])
end
return 0
"""
SCRIPTS = {
    "rate": CHARGE_RATE,
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


class Connection:
    """The client and scripts the three stores share, closed once."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        self.prefix = prefix
        self._closed = False
        self._scripts = {name: client.register_script(text) for name, text in SCRIPTS.items()}

    def __repr__(self) -> str:
        return f"Connection(prefix={self.prefix!r}, closed={self._closed})"

    @property
    def client(self) -> aioredis.Redis:
        """The client (redis-py would silently reconnect after close: refuse instead)."""
        if self._closed:
            raise StorageError("Redis storage is closed")
        return self._client

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script (EVALSHA, loading it on first use)."""
        if self._closed:
            raise StorageError("Redis storage is closed")
        return await call(self._scripts[name](keys=keys, args=args))

    async def scripts(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run a Lua script once per (keys, args), all in one pipeline: one round trip."""
        script = self._scripts[name]
        async with self.client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return cast(list[Any], await call(pipe.execute()))

    async def aclose(self) -> None:
        """Close the connection pool; later calls are no-ops."""
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
        body = await call(self._conn.client.hget(keys[0], str(version)))
        return self._load(task_id, version, body) if body is not None else None

    async def get_by_id(self, task_id: str, snapshot_id: str) -> StateSnapshot | None:
        bodies = await call(self._conn.client.hgetall(self._keys(task_id)[0]))
        for version, body in bodies.items():
            if orjson.loads(body)["id"] == snapshot_id:
                return self._load(task_id, version, body)
        return None

    async def list_versions(self, task_id: str) -> list[int]:
        versions = await call(self._conn.client.zrange(self._keys(task_id)[1], 0, -1))
        return [int(cast(str, version)) for version in versions]

    async def delete(self, task_id: str, version: int | None = None) -> bool:
        arg = "" if version is None else str(version)
        return bool(await self._conn.script("delete", self._keys(task_id), [arg]))

    async def aclose(self) -> None:
        """Close the shared connection pool (once for the three stores)."""
        await self._conn.aclose()


def load_task(text: str | bytes) -> TaskRecord:
    return TaskRecord.from_dict(orjson.loads(text))


class RedisTaskStore(TaskStore):
    """Task records as hashes; changes are compare-and-set on a revision (see the module doc)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._leases = f"{conn.prefix}leases"

    def __repr__(self) -> str:
        return f"RedisTaskStore(prefix={self._conn.prefix!r})"

    def _key(self, task_id: str) -> str:
        return f"{self._conn.prefix}task:{task_id}"

    def _args(self, record: TaskRecord) -> list[Any]:
        lease = "" if record.lease_until is None else repr(record.lease_until)
        active = record.status in ACTIVE and record.lease_until is not None
        return [
            record.id,
            to_json(record.to_dict(), "task record"),
            record.status.value,
            record.owner or "",
            lease,
            int(record.cancel_requested),
            int(active),
        ]

    async def create(self, record: TaskRecord) -> None:
        keys = [self._key(record.id), self._leases]
        if not await self._conn.script("create", keys, self._args(record)):
            raise StorageError(f"Task {record.id} already exists")

    async def create_many(self, records: list[TaskRecord]) -> None:
        # one pipeline of ``create`` scripts; each leaves an existing task as it is
        calls = [([self._key(r.id), self._leases], self._args(r)) for r in records]
        if calls:
            await self._conn.scripts("create", calls)

    async def get(self, task_id: str) -> TaskRecord | None:
        text = await call(self._conn.client.hget(self._key(task_id), "record"))
        return load_task(text) if text is not None else None

    async def _change(
        self, task_id: str, change: Callable[[TaskRecord], TaskRecord | None]
    ) -> TaskRecord | None:
        """Read, ``change`` and write back unless another writer came first (then again)."""
        keys = [self._key(task_id), self._leases]
        while True:
            text, rev = await call(self._conn.client.hmget(keys[0], ["record", "rev"]))
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
        ids = await call(self._conn.client.zrangebyscore(self._leases, "-inf", f"({now!r}"))
        if not ids:
            return []
        async with self._conn.client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(self._key(cast(str, task_id)), "record")
            texts = await call(pipe.execute())
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
        async with self._conn.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hget(self._key(task_id), "cancel_requested")
            flags = await call(pipe.execute())
        return [task_id for task_id, flag in zip(task_ids, flags, strict=True) if flag == "1"]

    async def aclose(self) -> None:
        """Close the shared connection pool (once for the three stores)."""
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
                found = await call(self._conn.client.get(name))
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
        heartbeat = asyncio.create_task(
            self._keep_claim(
                name,
                lambda: self._conn.script("extend", [name], [pending, milliseconds(self.takeover)]),
            )
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
        heartbeat.cancel()
        await asyncio.wait([heartbeat])
        if not await self._conn.script("finish", [name], [pending, done, milliseconds(self.ttl)]):
            warn("idempotency_claim_lost", key=name, takeover=self.takeover)
        return record

    async def aclose(self) -> None:
        """Close the shared connection pool (once for the three stores)."""
        await self._conn.aclose()


class RedisGuardStore(GuardStore):
    """``nonce:<key>`` set with ``NX PX``; ``rate:{<key>}:<seconds>:<count>:<window>``
    counters checked and charged by one Lua script, so every worker and host shares both."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def use_nonce(self, key: str, ttl: float) -> bool:
        name = f"{self._conn.prefix}nonce:{key}"
        return bool(await call(self._conn.client.set(name, "1", nx=True, px=milliseconds(ttl))))

    async def charge(
        self, key: str, limits: list[RateLimit], cost: int = 1
    ) -> tuple[int, RateLimit] | None:
        if not limits:
            return None
        now = time.time()
        keys, args = [], [cost]
        for limit in limits:
            window = int(now // limit.seconds)
            keys.append(f"{self._conn.prefix}rate:{{{key}}}:{limit.seconds}:{limit.count}:{window}")
            reset = (window + 1) * limit.seconds - now
            args += [limit.count, milliseconds(reset + 1)]
        full = int(await self._conn.script("rate", keys, args))
        if not full:
            return None
        limit = limits[full - 1]
        return max(1, math.ceil((int(now // limit.seconds) + 1) * limit.seconds - now)), limit


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
    client = aioredis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=10.0
    )
    conn = Connection(client, prefix)
    try:
        idempotency = RedisIdempotencyStore(conn, ttl, takeover)
        await call(client.ping())
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

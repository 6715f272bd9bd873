"""A small asyncio Redis client: just what :mod:`asap.state.redis` uses, at a fraction of the CPU.

One connection per :class:`Client`, speaking RESP2. Commands issued while others are in flight
are written back to back (the writes of one event-loop turn in one ``write``) and their replies
matched in order, so concurrent callers share the connection without waiting for each other
(automatic pipelining). Commands are encoded and replies parsed by hiredis (C, the parser
redis-py uses); replies are decoded: bulk and simple strings as ``str``, integers as ``int``,
nulls as ``None``, arrays as lists; an error reply raises :class:`ReplyError`.

URL: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS), query options
``socket_connect_timeout`` (seconds, 5), ``socket_timeout`` (seconds a command may wait for its
reply, 10), ``db``, and for TLS ``ssl_cert_reqs`` (``required``, ``optional``, ``none``),
``ssl_ca_certs`` and ``ssl_check_hostname``. A lost connection fails the commands in flight
(:class:`ConnectionLostError`); the next command opens a new one. Nothing is retried: a command
that may have run is never sent twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

__all__ = [
    "Client",
    "ConnectionLostError",
    "RedisError",
    "ReplyError",
    "RedisTimeoutError",
    "Script",
    "encode",
    "reader",
]

Arg = str | bytes | int | float


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class ReplyError(RedisError):
    """An error reply from Redis (``WRONGTYPE ...``, ``NOSCRIPT ...``): the connection is fine."""


class ConnectionLostError(RedisError):
    """No connection, or it was lost or closed before the reply came."""


class RedisTimeoutError(ConnectionLostError):
    """No connection or no reply in time; the connection is dropped."""


def encode(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (hiredis, in C). A ``bool`` or any type
    but ``str``, ``bytes``, ``int`` and ``float`` is a :class:`TypeError`."""
    packed: bytes = hiredis.pack_command(cast(Any, args if type(args) is tuple else tuple(args)))
    return packed


def reader() -> hiredis.Reader:
    """A RESP2 reply parser (hiredis): feed it bytes, ``gets()`` each whole reply (False
    until one is complete). Strings come as ``str`` (invalid UTF-8 raises), error replies as
    :class:`ReplyError` values (inside arrays too), not raised."""
    return hiredis.Reader(replyError=ReplyError, encoding="utf-8", errors="strict")


class _Protocol(asyncio.Protocol):
    """One connection: writes batched per loop turn, replies matched to futures in order."""

    def __init__(self, where: str, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._where = where
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._replies = reader()
        self._timer: asyncio.TimerHandle | None = None
        self.error: RedisError | None = None
        """Set once the connection is unusable: why."""
        self.closed: asyncio.Future[None] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue ``command`` (written at the end of this loop turn); its reply's future."""
        if self.error is not None:
            raise self.error
        future = self._loop.create_future()
        self._waiting.append((future, self._loop.time() + self._timeout))
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check_timeout)
        return future

    def _flush(self) -> None:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if self.error is None and self._transport is not None:
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        replies, waiting = self._replies, self._waiting
        replies.feed(data)
        try:
            while (reply := replies.gets()) is not False:
                if not waiting:
                    raise ValueError("a reply nobody asked for")
                future = waiting.popleft()[0]
                if future.done():  # its caller was cancelled
                    continue
                if type(reply) is ReplyError:
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (ValueError, UnicodeDecodeError, hiredis.ProtocolError) as exc:
            self.fail(RedisError(f"Redis protocol error from {self._where}: {exc}"))

    def _check_timeout(self) -> None:
        self._timer = None
        if not self._waiting or self.error is not None:
            return
        deadline = self._waiting[0][1]
        if self._loop.time() >= deadline:
            self.fail(RedisTimeoutError(f"Redis at {self._where}: no reply in {self._timeout:g} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.fail(ConnectionLostError(f"Redis connection to {self._where} lost{reason}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def fail(self, error: RedisError) -> None:
        """Make the connection unusable: every command in flight fails with ``error``."""
        if self.error is None:
            self.error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.abort()


class Script:
    """A Lua script, run by its SHA1 (``EVALSHA``) and sent whole on ``NOSCRIPT``."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's script id

    def __repr__(self) -> str:
        return f"Script(sha={self.sha!r})"


def _noscript(result: Any) -> bool:
    return isinstance(result, ReplyError) and str(result).startswith("NOSCRIPT")


class Client:
    """A Redis client on one connection, opened on first use and again after it is lost."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"Redis URL must start with redis:// or rediss://: {url!r}")
        query = dict(parse_qsl(parts.query))
        known = {
            "db",
            "socket_connect_timeout",
            "socket_timeout",
            "ssl_cert_reqs",
            "ssl_ca_certs",
            "ssl_check_hostname",
        }
        unknown = set(query) - known
        if unknown:
            raise ValueError(f"unknown Redis URL options {sorted(unknown)}; known: {sorted(known)}")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self.db = int(query.get("db") or path or 0)
        self.connect_timeout = float(query.get("socket_connect_timeout") or 5.0)
        self.timeout = float(query.get("socket_timeout") or 10.0)
        self.ssl = self._ssl_context(query) if parts.scheme == "rediss" else None
        self._where = f"{self.host}:{self.port}"
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Client({self._where}/{self.db}, ssl={self.ssl is not None})"

    @staticmethod
    def _ssl_context(query: dict[str, str]) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
        reqs = query.get("ssl_cert_reqs", "required").lower()
        modes = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL}
        check = query.get("ssl_check_hostname", "true" if reqs == "required" else "false")
        context.check_hostname = check.lower() in ("1", "true", "yes")
        if reqs == "none":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif reqs in modes:
            context.verify_mode = modes[reqs]
        else:
            raise ValueError(f"ssl_cert_reqs must be required, optional or none, not {reqs!r}")
        return context

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.error is None:
            return protocol
        if self._closed:
            raise ConnectionLostError("Redis client is closed")
        if self._connecting is None:  # one attempt shared by every caller waiting for it
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._opened)
        return await asyncio.shield(self._connecting)

    def _opened(self, task: asyncio.Task[_Protocol]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._protocol = task.result()

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self._where, self.timeout),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                )
        except TimeoutError as exc:
            raise RedisTimeoutError(
                f"Redis at {self._where}: not connected in {self.connect_timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ConnectionLostError(f"Error connecting to Redis at {self._where}: {exc}") from exc
        hello: list[tuple[str, list[Arg]]] = []
        if self.password is not None:
            user = [self.username] if self.username else []
            hello.append(("authentication", ["AUTH", *user, self.password]))
        if self.db:
            hello.append((f"SELECT {self.db}", ["SELECT", self.db]))
        for step, command in hello:
            try:
                await protocol.send(encode(command))
            except RedisError as exc:
                protocol.fail(ConnectionLostError(f"{step} failed"))
                raise ConnectionLostError(f"Redis at {self._where}: {step} failed: {exc}") from exc
        return protocol

    async def execute(self, *args: Arg) -> Any:
        """Send one command, return its reply (an error reply raises :class:`ReplyError`)."""
        protocol = self._protocol
        if protocol is None or protocol.error is not None:
            protocol = await self._connection()
        return await protocol.send(encode(args))

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send several commands in one write; their replies, error replies as exceptions."""
        if not commands:
            return []
        protocol = await self._connection()
        futures = [protocol.send(encode(command)) for command in commands]
        return await asyncio.gather(*futures, return_exceptions=True)

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run ``script`` with ``EVALSHA``, sending its text (``EVAL``) if Redis lacks it."""
        protocol = self._protocol  # as execute() does, without its coroutine
        if protocol is None or protocol.error is not None:
            protocol = await self._connection()
        try:
            return await protocol.send(encode(("EVALSHA", script.sha, len(keys), *keys, *args)))
        except ReplyError as exc:
            if not _noscript(exc):
                raise
        return await self.execute("EVAL", script.text, len(keys), *keys, *args)

    async def run_many(
        self, script: Script, calls: Sequence[tuple[Sequence[Arg], Sequence[Arg]]]
    ) -> list[Any]:
        """Run ``script`` once per ``(keys, args)`` in one pipeline; results as :meth:`pipeline`."""
        results = await self.pipeline(
            [["EVALSHA", script.sha, len(keys), *keys, *args] for keys, args in calls]
        )
        missing = [i for i, result in enumerate(results) if _noscript(result)]
        if missing:  # those did not run: send the text (Redis caches it from then on)
            again = [
                ["EVAL", script.text, len(calls[i][0]), *calls[i][0], *calls[i][1]] for i in missing
            ]
            for i, result in zip(missing, await self.pipeline(again), strict=True):
                results[i] = result
        return results

    async def aclose(self) -> None:
        """Close the connection; commands in flight fail, later ones raise. Idempotent."""
        self._closed = True
        if self._connecting is not None:  # let it finish (bounded by the timeouts), then close
            await asyncio.wait([self._connecting])
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(ConnectionLostError("Redis client closed"))
            await asyncio.wait([protocol.closed], timeout=1.0)

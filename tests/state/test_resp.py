"""The Redis client of :mod:`asap.state.resp`, against the real Redis (no mocks).

Skipped only outside CI when no Redis answers at ``ASAP_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``), as in ``test_contract.py``; with ``CI`` set a missing Redis fails.
Every test works under its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from asap.state.resp import (
    Client,
    ConnectionLostError,
    RedisError,
    RedisTimeoutError,
    ReplyError,
    Script,
    encode,
    reader,
)

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("ASAP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADDRESS = (urlsplit(REDIS_URL).hostname or "127.0.0.1", urlsplit(REDIS_URL).port or 6379)


@pytest.fixture(scope="module")
def redis_up() -> None:
    """Skip (outside CI) or fail (in CI) when Redis is not reachable."""
    try:
        with socket.create_connection(ADDRESS, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(64) == b"+PONG\r\n"
    except (OSError, AssertionError) as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {exc!r} (start redis-server)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
async def client(redis_up: None) -> AsyncIterator[Client]:
    opened = Client(REDIS_URL)
    yield opened
    await opened.aclose()


@pytest.fixture
async def prefix(redis_up: None) -> AsyncIterator[str]:
    name = f"asap-test:resp:{uuid.uuid4().hex}:"
    yield name
    cleaner = Client(REDIS_URL)
    try:
        keys = await cleaner.execute("KEYS", f"{name}*")
        if keys:
            await cleaner.execute("DEL", *keys)
    finally:
        await cleaner.aclose()


# -- encoding and parsing -------------------------------------------------------------------


def test_encode_and_parse_round_the_resp2_types() -> None:
    assert encode(["SET", "k", b"\x00", 12, 0.5]) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\x00\r\n$2\r\n12\r\n$3\r\n0.5\r\n"
    )
    assert encode(("ZADD", 1795908414.4052246)).endswith(b"$18\r\n1795908414.4052246\r\n")
    for bad in (True, None, ["x"]):
        with pytest.raises(TypeError):
            encode(["SET", "k", bad])  # type: ignore[list-item]
    reply = b"*5\r\n+OK\r\n:-3\r\n$-1\r\n*2\r\n$2\r\n\xc3\xa9\r\n*-1\r\n-ERR no\r\n+next\r\n"
    end = reply.index(b"+next")
    for cut in range(end):  # fed in two pieces, cut anywhere: one whole reply, nothing early
        replies = reader()
        replies.feed(reply[:cut])
        assert replies.gets() is False
        replies.feed(reply[cut:])
        value = replies.gets()
        assert value[:4] == ["OK", -3, None, ["é", None]]
        assert isinstance(value[4], ReplyError) and str(value[4]) == "ERR no"
        assert replies.gets() == "next" and replies.gets() is False
    replies = reader()
    replies.feed(b"$2\r\n\xff\xfe\r\n")
    with pytest.raises(UnicodeDecodeError):
        replies.gets()


def test_url_options() -> None:
    client = Client("redis://us%40er:p%3Ass@db.example:6380/3?socket_timeout=2.5")
    assert (client.host, client.port, client.db) == ("db.example", 6380, 3)
    assert (client.username, client.password) == ("us@er", "p:ss")
    assert (client.connect_timeout, client.timeout, client.ssl) == (5.0, 2.5, None)
    client = Client("rediss://h?db=2&socket_connect_timeout=1&ssl_cert_reqs=none")
    assert (client.host, client.port, client.db, client.connect_timeout) == ("h", 6379, 2, 1.0)
    assert client.ssl is not None and client.ssl.verify_mode == ssl.CERT_NONE
    assert Client("rediss://h").ssl.check_hostname  # type: ignore[union-attr]
    for bad in ("http://h", "redis://h?retry=3", "rediss://h?ssl_cert_reqs=maybe"):
        with pytest.raises(ValueError):
            Client(bad)


# -- against Redis --------------------------------------------------------------------------


async def test_concurrent_commands_are_pipelined_and_each_gets_its_reply(
    client: Client, prefix: str
) -> None:
    big = "x" * 3_000_000  # its reply arrives in several reads
    await client.execute("SET", f"{prefix}big", big)

    async def one(i: int) -> None:
        assert await client.execute("SET", f"{prefix}{i}", f"v{i}") == "OK"
        got = await asyncio.gather(
            client.execute("GET", f"{prefix}{i}"),
            client.execute("INCRBY", f"{prefix}n", i),
            client.execute("GET", f"{prefix}missing"),
            client.execute("ECHO", f"é{i}"),
        )
        assert got[0] == f"v{i}" and isinstance(got[1], int) and got[2:] == [None, f"é{i}"]

    await asyncio.gather(*(one(i) for i in range(500)), client.execute("GET", f"{prefix}big"))
    assert await client.execute("GET", f"{prefix}big") == big
    assert await client.execute("GET", f"{prefix}n") == str(sum(range(500)))
    nested = await client.execute("EVAL", "return {1, {'a', false}, 'b'}", 0)
    assert nested == [1, ["a", None], "b"]
    replies = await client.pipeline([["SET", f"{prefix}p", "1"], ["INCR", f"{prefix}p"], ["PING"]])
    assert replies == ["OK", 2, "PONG"]


async def test_an_error_reply_raises_and_the_connection_goes_on(
    client: Client, prefix: str
) -> None:
    await client.execute("SET", f"{prefix}s", "text")
    before = await client.execute("CLIENT", "ID")
    results = await asyncio.gather(
        client.execute("LPUSH", f"{prefix}s", "x"),
        client.execute("GET", f"{prefix}s"),
        client.execute("NOSUCHCOMMAND"),
        client.execute("INCR", f"{prefix}c"),
        return_exceptions=True,
    )
    assert isinstance(results[0], ReplyError) and str(results[0]).startswith("WRONGTYPE")
    assert isinstance(results[2], ReplyError) and "unknown command" in str(results[2])
    assert (results[1], results[3]) == ("text", 1)
    assert await client.execute("CLIENT", "ID") == before  # the same connection
    piped = await client.pipeline([["LPUSH", f"{prefix}s", "x"], ["GET", f"{prefix}s"]])
    assert isinstance(piped[0], ReplyError) and piped[1] == "text"


async def test_scripts_load_themselves_after_script_flush(client: Client, prefix: str) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await client.run(script, [f"{prefix}k"], [2]) == 2
    await client.execute("SCRIPT", "FLUSH")
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
    assert await client.run(script, [f"{prefix}k"], [3]) == 5
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
    await client.execute("SCRIPT", "FLUSH")
    calls = [([f"{prefix}m{i % 3}"], [1]) for i in range(9)]
    assert sorted(await client.run_many(script, calls)) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
    failing = Script("return redis.call('INCR', KEYS[1])")
    await client.execute("SET", f"{prefix}t", "text")
    with pytest.raises(ReplyError, match="not an integer"):
        await client.run(failing, [f"{prefix}t"], [])


async def kill(client_id: int) -> None:
    """Close a connection from the server side, with a client of its own."""
    killer = Client(REDIS_URL)
    try:
        assert await killer.execute("CLIENT", "KILL", "ID", client_id) == 1
    finally:
        await killer.aclose()


async def test_a_killed_connection_fails_what_is_in_flight_and_the_next_command_reconnects(
    client: Client, prefix: str
) -> None:
    first = await client.execute("CLIENT", "ID")
    await kill(first)
    await asyncio.sleep(0.05)  # the close reaches us
    second = await client.execute("CLIENT", "ID")
    assert second != first
    blocked = asyncio.ensure_future(client.execute("BLPOP", f"{prefix}never", 5))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await kill(second)
    with pytest.raises(ConnectionLostError, match="lost"):
        await blocked
    assert time.monotonic() - started < 2
    assert await client.execute("CLIENT", "ID") not in (first, second)


async def test_an_unanswered_command_times_out_and_the_next_one_reconnects(
    redis_up: None, prefix: str
) -> None:
    client = Client(f"{REDIS_URL}?socket_timeout=0.5")
    try:
        first = await client.execute("CLIENT", "ID")
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError, match="no reply in 0.5 s"):
            await client.execute("BLPOP", f"{prefix}never", 3)
        assert 0.5 <= time.monotonic() - started < 2.5  # not BLPOP's own 3 s
        assert await client.execute("CLIENT", "ID") != first
    finally:
        await client.aclose()


async def test_connect_failures_are_clear_errors(redis_up: None) -> None:
    refused = Client("redis://127.0.0.1:1/0")
    with pytest.raises(ConnectionLostError, match="Error connecting to Redis at 127.0.0.1:1"):
        await refused.execute("PING")
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(  # accepts, never answers the TLS handshake
        lambda reader, writer: accepted.append(writer), "127.0.0.1", 0
    )
    port = silent.sockets[0].getsockname()[1]
    stuck = Client(f"rediss://127.0.0.1:{port}/0?socket_connect_timeout=0.2")
    try:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError, match="not connected in 0.2 s"):
            await stuck.execute("PING")
        assert time.monotonic() - started < 1.5
    finally:
        silent.close()
        for writer in accepted:
            writer.close()
        await stuck.aclose()
        await refused.aclose()


async def test_a_server_speaking_garbage_fails_the_connection_clearly() -> None:
    """A reply that is not RESP, or not UTF-8 text, fails what is in flight with a RedisError
    naming the protocol error; the client reconnects for the next command."""
    answers = iter([b"!nonsense\r\n", b"$2\r\n\xff\xfe\r\n"])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(next(answers))
        await writer.drain()
        await reader.read(1024)  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Client(f"redis://127.0.0.1:{port}/0")
    try:
        for expected in ("Protocol error", "can't decode"):
            with pytest.raises(RedisError, match=f"protocol error from 127.0.0.1:{port}: .*"):
                try:
                    await client.execute("PING")
                except RedisError as exc:
                    assert expected in str(exc)
                    raise
    finally:
        await client.aclose()
        server.close()


async def test_auth_and_db(client: Client, prefix: str) -> None:
    user, password = f"asap-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await client.execute("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    host, port = ADDRESS
    try:
        wrong = Client(f"redis://{user}:nope@{host}:{port}/0")
        with pytest.raises(ConnectionLostError, match="authentication failed: WRONGPASS"):
            await wrong.execute("PING")
        await wrong.aclose()
        right = Client(f"redis://{user}:{password}@{host}:{port}/5")
        try:
            assert await right.execute("ACL", "WHOAMI") == user
            await right.execute("SET", f"{prefix}in5", "yes", "PX", 60_000)
        finally:
            await right.aclose()
        assert await client.execute("GET", f"{prefix}in5") is None  # db 0
        await client.execute("SELECT", 5)
        assert await client.execute("GETDEL", f"{prefix}in5") == "yes"
    finally:
        await client.execute("ACL", "DELUSER", user)


async def test_aclose_fails_what_is_in_flight_and_refuses_later_commands(
    client: Client, prefix: str
) -> None:
    blocked = asyncio.ensure_future(client.execute("BLPOP", f"{prefix}never", 5))
    await asyncio.sleep(0.05)
    await client.aclose()
    with pytest.raises(ConnectionLostError, match="closed"):
        await blocked
    with pytest.raises(ConnectionLostError, match="closed"):
        await client.execute("PING")
    await client.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(client: Client, prefix: str) -> None:
    await client.execute("SET", f"{prefix}a", "A")
    await client.execute("SET", f"{prefix}b", "B")
    slow = asyncio.ensure_future(client.execute("BLPOP", f"{prefix}never", 0.3))
    after = asyncio.ensure_future(client.execute("GET", f"{prefix}a"))
    await asyncio.sleep(0.05)
    slow.cancel()
    assert await after == "A"
    assert await client.execute("GET", f"{prefix}b") == "B"


# -- TLS, through a local TLS proxy in front of the Redis -----------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    yield cert, key


async def test_rediss_through_tls(redis_up: None, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    relays: list[asyncio.Task[Any]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relays.append(asyncio.current_task())  # type: ignore[arg-type]
        upstream_reader, upstream_writer = await asyncio.open_connection(*ADDRESS)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    port = proxy.sockets[0].getsockname()[1]
    clients: list[Client] = []
    try:
        trusted = Client(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}")
        unchecked = Client(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
        untrusted = Client(f"rediss://127.0.0.1:{port}/0")
        clients += [trusted, unchecked, untrusted]
        assert await trusted.execute("PING") == "PONG"
        replies: list[Any] = await asyncio.gather(*(trusted.execute("ECHO", i) for i in range(50)))
        assert replies == [str(i) for i in range(50)]
        assert await unchecked.execute("PING") == "PONG"
        with pytest.raises(ConnectionLostError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.execute("PING")
    finally:
        for client in clients:
            await client.aclose()
        proxy.close()
        await asyncio.wait_for(asyncio.gather(*relays), 5)  # they end once the clients close


async def test_errors_are_redis_errors(redis_up: None) -> None:
    assert issubclass(ReplyError, RedisError) and issubclass(RedisTimeoutError, RedisError)
    assert issubclass(ConnectionLostError, RedisError)


async def test_the_redis_storage_turns_client_errors_into_storage_errors_and_recovers(
    prefix: str,
) -> None:
    from asap.state import open_storage
    from asap.state.store import StorageError

    storage = await open_storage(f"{REDIS_URL}?socket_timeout=1", key_prefix=prefix)
    try:
        conn = storage.guard._conn  # type: ignore[attr-defined]  # the client the stores share
        assert await storage.guard.use_nonce("n1", 60)
        first = await conn.execute("CLIENT", "ID")
        blocked = asyncio.ensure_future(conn.execute("BLPOP", f"{prefix}never", 5))
        await asyncio.sleep(0.05)
        await kill(first)
        with pytest.raises(StorageError, match="lost"):
            await blocked
        assert not await storage.guard.use_nonce("n1", 60)  # a new connection, the same data
        with pytest.raises(StorageError, match="no reply in 1 s"):
            await conn.execute("BLPOP", f"{prefix}never", 3)
        assert await storage.guard.use_nonce("n2", 60)
        with pytest.raises(StorageError, match="WRONGTYPE"):
            await conn.execute("LPUSH", f"{prefix}nonce:n2", "x")
    finally:
        await storage.aclose()
    with pytest.raises(StorageError, match="closed"):
        await storage.guard.use_nonce("n3", 60)

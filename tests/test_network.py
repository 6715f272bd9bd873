"""The clients' network layer (asap.transport.network) against real sockets: a small asyncio
HTTP server in the test answers as told, so every failure the layers above retry is real."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from asap.process import free_port
from asap.transport.network import AiohttpTransport

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def http_server(reply: Callable[[bytes], bytes | None]) -> AsyncIterator[dict[str, int]]:
    """Serve HTTP/1.1 on a free port: ``reply(request_bytes)`` gives the raw response, or
    None to hang up without answering. Counts connections and requests."""
    seen = {"connections": 0, "requests": 0, "port": free_port()}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                seen["requests"] += 1
                response = reply(request)
                if response is None:
                    break
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", seen["port"])
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def serving(
    reply: Callable[[bytes], bytes | None],
) -> AsyncIterator[tuple[AiohttpTransport, dict[str, int]]]:
    """:func:`http_server` and a transport to it (closed afterwards)."""
    async with http_server(reply) as seen:
        transport = AiohttpTransport()
        try:
            yield transport, seen
        finally:
            await transport.aclose()


def ok(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def post(transport: AiohttpTransport, port: int, body: bytes = b"{}", timeout: float = 5.0):
    request = httpx.Request(
        "POST",
        f"http://127.0.0.1:{port}/asap",
        content=body,
        headers={"content-type": "application/json", "x-test": "1"},
        extensions={"timeout": {"connect": timeout, "read": timeout, "pool": timeout}},
    )
    response = await transport.handle_async_request(request)
    await response.aread()
    return response


async def test_sends_the_request_as_given_and_reuses_the_connection() -> None:
    requests: list[bytes] = []

    def reply(request: bytes) -> bytes:
        requests.append(request)
        return ok(b'{"ok":true}', "content-type: application/json")

    async with serving(reply) as (transport, seen):
        for _ in range(5):
            response = await post(transport, seen["port"], b'{"n":1}')
            assert response.status_code == 200
            assert response.json() == {"ok": True}
            assert response.headers["content-type"] == "application/json"
    assert seen["connections"] == 1 and seen["requests"] == 5
    head, _, body = requests[0].partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"post /asap http/1.1" and body == b'{"n":1}'
    assert b"x-test: 1" in lines and b"content-type: application/json" in lines
    assert not any(line.startswith(b"user-agent") for line in lines)


async def test_a_compressed_reply_is_decoded_on_read() -> None:
    packed = gzip.compress(b'{"big":"' + b"x" * 5000 + b'"}')

    def reply(request: bytes) -> bytes:
        return ok(packed, "content-encoding: gzip", "content-type: application/json")

    async with serving(reply) as (transport, seen):
        response = await post(transport, seen["port"])
    assert response.json() == {"big": "x" * 5000}


async def test_a_redirect_is_returned_not_followed() -> None:
    def reply(request: bytes) -> bytes:
        return ok(b"", "location: http://example.invalid/asap", status="307 Temporary Redirect")

    async with serving(reply) as (transport, seen):
        response = await post(transport, seen["port"])
    assert response.status_code == 307 and seen["requests"] == 1
    assert response.headers["location"] == "http://example.invalid/asap"


async def test_connection_refused_is_a_connect_error() -> None:
    port = free_port()
    transport = AiohttpTransport()
    try:
        with pytest.raises(httpx.ConnectError) as caught:
            await post(transport, port)
    finally:
        await transport.aclose()
    assert str(caught.value) == f"Cannot connect to 127.0.0.1:{port}: Connection refused"


async def test_no_reply_within_the_read_timeout_is_a_read_timeout() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await done.wait()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    transport = AiohttpTransport()
    try:
        with pytest.raises(httpx.ReadTimeout):
            await post(transport, port, timeout=0.3)
    finally:
        done.set()
        await transport.aclose()
        server.close()
        await server.wait_closed()


async def test_a_hang_up_before_the_reply_is_a_transport_error() -> None:
    async with serving(lambda request: None) as (transport, seen):
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport, seen["port"])


async def test_a_cut_body_is_a_transport_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"part')
        await writer.drain()
        writer.close()  # 94 bytes short

    port = free_port()
    server = await asyncio.start_server(cut, "127.0.0.1", port)
    transport = AiohttpTransport()
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport, port)
    finally:
        await transport.aclose()
        server.close()
        await server.wait_closed()


async def test_a_closed_transport_refuses_to_send() -> None:
    transport = AiohttpTransport()
    await transport.aclose()
    with pytest.raises(httpx.ConnectError):
        await post(transport, free_port())


def test_an_agent_loads_aiohttp_only_when_it_calls_another() -> None:
    """aiohttp is about 9 MB of resident memory: an agent that never calls a peer (most
    workers) does not import it."""
    import subprocess
    import sys

    code = (
        "import sys, asap.server\n"
        "from asap.transport.pool import ClientPool\n"
        "from asap.transport.resilience import RetryConfig\n"
        "ClientPool(RetryConfig()).get('http://127.0.0.1:9')\n"
        "print('aiohttp' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False"], done.stderr

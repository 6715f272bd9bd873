"""The network layer of our clients: an httpx transport that sends through aiohttp.

httpx gives the client its request/response model and the transport layers (retries,
circuit breaker, see :mod:`asap.transport.resilience`); its own network layer, httpcore,
costs about 2 ms of CPU per exchange when 16 requests share a pool on this project's 2-core
benchmark machine, against about 0.35 ms through aiohttp's (C-accelerated) client. An
orchestration fanning out 16 sub-tasks spent most of its time there.

:class:`AiohttpTransport` keeps httpx's contract: bodies come back as sent (a compressed reply
is decoded by ``httpx.Response`` on read), redirects are not followed, and aiohttp's errors
become httpx's (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``, ``ReadError``,
``RemoteProtocolError``), so the layers above retry exactly what they retried before.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AiohttpTransport", "network_transport"]

KEEPALIVE_EXPIRY = 4.0
"""Seconds an idle connection is kept: under uvicorn's 5 s keep-alive, so that a connection
the server is about to close is not reused."""


def _aiohttp() -> ModuleType:
    """aiohttp, imported on first use: an agent that never calls another does not load it
    (about 9 MB of resident memory)."""
    import aiohttp

    return aiohttp


class AiohttpTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 through one ``aiohttp.ClientSession`` (its pool: ``max_connections``, idle
    connections kept ``keepalive_expiry`` seconds). Created on first use, in the running loop."""

    def __init__(self, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits()
        self._max_connections = limits.max_connections or 0  # 0: no limit
        expiry = limits.keepalive_expiry
        self._keepalive = KEEPALIVE_EXPIRY if expiry is None else min(expiry, KEEPALIVE_EXPIRY)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AiohttpTransport(max_connections={self._max_connections})"

    def _open(self) -> aiohttp.ClientSession:
        aiohttp = _aiohttp()
        if self._closed:
            raise httpx.ConnectError("Transport is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # httpx.Response decodes, as with httpx's own layer
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        aiohttp = _aiohttp()
        session = self._open()
        timeout = request.extensions.get("timeout") or {}
        limits = aiohttp.ClientTimeout(
            total=None,
            connect=timeout.get("pool"),
            sock_connect=timeout.get("connect"),
            sock_read=timeout.get("read"),
        )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        content = await request.aread()
        try:
            async with session.request(
                request.method,
                str(request.url),
                data=content or None,
                headers=headers,
                allow_redirects=False,
                timeout=limits,
            ) as response:
                body = await response.read()
                reply_headers = [(k, v) for k, v in response.raw_headers]
                status = response.status
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except TimeoutError as exc:  # aiohttp's read timeouts are TimeoutErrors too
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(_connect_error(exc), request=request) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except aiohttp.ClientResponseError as exc:  # a reply that is not valid HTTP
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(
            status,
            headers=reply_headers,
            stream=httpx.ByteStream(body),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


def _connect_error(exc: aiohttp.ClientConnectorError) -> str:
    """``Cannot connect to host:port: Connection refused`` (aiohttp's text names ssl
    settings and repeats the address)."""
    error = exc.os_error
    reason = os.strerror(error.errno) if error.errno else str(error) or type(error).__name__
    return f"Cannot connect to {exc.host}:{exc.port}: {reason}"


def network_transport(limits: httpx.Limits | None = None) -> httpx.AsyncBaseTransport:
    """The transport our clients send through when not given one."""
    return AiohttpTransport(limits)

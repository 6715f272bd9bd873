"""The ASAP client: one pooled ``httpx.AsyncClient`` per :class:`ASAPClient` (spec 4).

Use it as an async context manager::

    async with ASAPClient("http://127.0.0.1:8001") as client:
        reply = await client.send(envelope)

``base_url`` is the agent root; ``/asap`` and the well-known paths are appended. Errors from
httpx are translated into :mod:`asap.errors`. Policies such as retries and circuit breaking
wrap the network as an ``httpx.AsyncBaseTransport`` passed as ``transport=``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import brotli
import httpx
import orjson
from pydantic import ValidationError

from asap.context import current_deadline
from asap.errors import (
    ASAPConnectionError,
    ASAPError,
    ASAPTimeoutError,
    MalformedEnvelopeError,
    ProtocolCorrelationError,
    RemoteRPCError,
)
from asap.models.entities import HealthStatus, Manifest
from asap.models.envelope import Envelope
from asap.models.ids import generate_id
from asap.models.payloads import (
    CORRELATED_PAYLOAD_TYPES,
    TaskRequestConfig,
    normalize_payload_type,
)
from asap.observability.logging import get_logger
from asap.transport.network import network_transport
from asap.transport.resilience import (
    DEADLINE_EXTENSION,
    REBUILD_EXTENSION,
    RetryConfig,
    resilient_transport,
)

__all__ = ["ASAPClient", "HEALTH_PATH", "LOCAL_HOSTS", "MANIFEST_PATH", "RetryConfig"]

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MANIFEST_PATH = "/.well-known/asap/manifest.json"
HEALTH_PATH = "/.well-known/asap/health"
_W3C = re.compile(r"^[0-9a-f]{32}-[0-9a-f]{16}$")
_log = get_logger("asap.client")


class ASAPClient:
    """Talk to one ASAP agent over HTTP.

    Arguments mirror the reference client's names (spec 4.1). ``transport`` is an httpx
    transport to send through (tests, custom network layers); the client owns and closes it.
    ``shared_transport`` is one that several clients share (the server's ``ClientPool``); the
    client does not close it and does not add layers to it.

    Requests go straight to the transport, not through ``httpx.AsyncClient``: an agent needs
    neither cookies, nor redirects (which could lead a request to another host), nor auth
    flows, and skipping them halves the client's CPU per call.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        shared_transport: httpx.AsyncBaseTransport | None = None,
        require_https: bool = True,
        compression: bool = True,
        compression_threshold: int = 1024,
        supported_transport_versions: Sequence[str] = ("2.2", "2.1"),
        auth_token: str | None = None,
        nonces: bool = False,
        pool_connections: int = 100,
        pool_maxsize: int = 100,
        headers: dict[str, str] | None = None,
        retry_config: RetryConfig | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if require_https and parts.scheme == "http" and parts.hostname not in LOCAL_HOSTS:
            raise ValueError(
                f"HTTPS is required for non-local hosts: {base_url!r} "
                "(pass require_https=False to allow plain HTTP)"
            )
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.compression = compression
        self.compression_threshold = compression_threshold
        self.supported_transport_versions = tuple(supported_transport_versions)
        self.last_response_asap_version: str | None = None
        self.nonces = nonces
        self._shared = shared_transport is not None
        self._limits = httpx.Limits(
            max_connections=pool_connections,
            max_keepalive_connections=pool_maxsize,
            keepalive_expiry=5.0,
        )
        self.retry_config = retry_config
        self._given_transport = transport
        self._transport: httpx.AsyncBaseTransport | None = shared_transport
        self._headers = {
            "accept": "application/json",
            "accept-encoding": "br, gzip, identity",
            "asap-version": ", ".join(self.supported_transport_versions),
            **(headers or {}),
        }
        if auth_token:
            self._headers["authorization"] = f"Bearer {auth_token}"
        self._ids = itertools.count(1)
        self._urls: dict[str, httpx.URL] = {}

    def __repr__(self) -> str:
        return f"ASAPClient({self.base_url!r})"

    async def __aenter__(self) -> ASAPClient:
        if self._transport is None:
            network = self._given_transport or network_transport(self._limits)
            self._transport = (
                resilient_transport(self.retry_config, network)
                if self.retry_config is not None
                else network
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool, unless it is shared."""
        if self._transport is not None and not self._shared:
            await self._transport.aclose()
            self._transport = None

    @property
    def is_connected(self) -> bool:
        """True between ``__aenter__`` and ``aclose``."""
        return self._transport is not None

    # -- sending -------------------------------------------------------------------------

    def _encode(self, payload: Any, *, compress: bool = True) -> tuple[bytes, dict[str, str]]:
        body = orjson.dumps(payload)
        headers: dict[str, str] = {"content-type": "application/json"}
        if compress and self.compression and len(body) >= self.compression_threshold:
            packed = brotli.compress(body, quality=4)
            if len(packed) < len(body):
                body = packed
                headers["content-encoding"] = "br"
        return body, headers

    def _deadline(self, timeout: float | None) -> float:
        """This call's deadline: its own timeout, capped by the running task's deadline."""
        own = time.monotonic() + (timeout if timeout is not None else self.timeout)
        inherited = current_deadline.get()
        return own if inherited is None else min(own, inherited)

    def _frames(
        self, frames: Any, headers: dict[str, str], *, compress: bool = True
    ) -> Callable[[], tuple[bytes, dict[str, str]]]:
        """The encoder of a JSON-RPC body. With ``nonces`` every call (every attempt) gives
        each envelope a fresh ``extensions.nonce``: a retry is not a replay (spec 3.13), and
        the idempotency key, which stays, keeps it from running twice."""

        def encode() -> tuple[bytes, dict[str, str]]:
            if self.nonces:
                for frame in frames if isinstance(frames, list) else [frames]:
                    envelope = frame["params"]["envelope"]
                    envelope["extensions"] = {
                        **(envelope.get("extensions") or {}),
                        "nonce": generate_id(),
                    }
            body, encoding = self._encode(frames, compress=compress)
            return body, {**encoding, **headers}

        return encode

    async def _request(
        self,
        method: str,
        url: str,
        deadline: float,
        encode: Callable[[], tuple[bytes, dict[str, str]]] | None = None,
    ) -> httpx.Response:
        """One HTTP exchange through the transport; httpx errors become ours."""
        if self._transport is None:
            raise ASAPConnectionError(
                "Client not connected: use 'async with ASAPClient(...) as client'"
            )

        parsed = self._urls.get(url)
        if parsed is None:  # parsing costs a third of building a request: once per URL
            parsed = httpx.URL(url)
            if len(self._urls) < 64:
                self._urls[url] = parsed

        def build() -> httpx.Request:
            remaining = max(deadline - time.monotonic(), 0.001)
            body, headers = encode() if encode is not None else (b"", {})
            extensions: dict[str, Any] = {
                "timeout": {
                    "connect": remaining,
                    "read": remaining,
                    "write": remaining,
                    "pool": remaining,
                },
                DEADLINE_EXTENSION: deadline,
            }
            if self.nonces and encode is not None:
                extensions[REBUILD_EXTENSION] = build
            return httpx.Request(
                method,
                parsed,
                content=body if method == "POST" else None,
                headers={**self._headers, **headers},
                extensions=extensions,
            )

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ASAPTimeoutError(f"Deadline passed before calling {url}", {"url": url})
        request = build()
        try:
            response = await self._transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise ASAPTimeoutError(
                f"Request timeout after {remaining:.3g}s: {url}", {"url": url}
            ) from exc
        except httpx.HTTPError as exc:
            raise ASAPConnectionError(
                f"Connection error to {url}: {exc or type(exc).__name__}", {"url": url}
            ) from exc
        return response

    async def _post(
        self, path: str, encode: Callable[[], tuple[bytes, dict[str, str]]], deadline: float
    ) -> httpx.Response:
        url = self.base_url + path
        response = await self._request("POST", url, deadline, encode)
        self.last_response_asap_version = response.headers.get("asap-version")
        if not 200 <= response.status_code < 300:  # redirects too: never followed
            raise _http_status_error(url, response)
        return response

    async def send(
        self,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Envelope:
        """Send one envelope with ``asap.send`` and return the reply envelope.

        ``timeout`` bounds this call (default: the client's). Inside a skill the call also ends
        by the running task's deadline. With either, a ``task.request`` tells the remote in
        ``config.timeout_seconds`` how long it may run (spec 2.1).

        The idempotency key (``idempotency_key``, else ``config.idempotency_key``, else a new
        ULID) is sent in ``params`` and ``X-Idempotency-Key`` and stays the same on retries.

        The reply must be bound to the request: a response payload whose ``correlation_id``
        is not ``envelope.id`` raises :class:`ProtocolCorrelationError`. A JSON-RPC error
        reply raises :class:`RemoteRPCError` with its code, message, data and recoverability.
        """
        deadline = self._deadline(timeout)
        wire = envelope.model_dump(mode="json")
        if timeout is not None or current_deadline.get() is not None:
            _set_deadline(wire, deadline)
        config = getattr(envelope.payload, "config", None)
        idempotency_key = (
            idempotency_key or getattr(config, "idempotency_key", None) or generate_id()
        )
        frame = {
            "jsonrpc": "2.0",
            "method": "asap.send",
            "params": {
                "envelope": wire,
                "idempotency_key": idempotency_key,
            },
            "id": f"req-{next(self._ids)}",
        }
        headers = {"x-idempotency-key": idempotency_key}
        extensions = envelope.extensions or {}
        trace, span = extensions.get("trace_id"), extensions.get("span_id")
        if isinstance(trace, str) and isinstance(span, str) and _W3C.match(f"{trace}-{span}"):
            headers["traceparent"] = f"00-{trace}-{span}-01"  # the hop, for HTTP tracers too
        encode = self._frames(frame, headers)
        _log.debug(
            "asap.client.send",
            url=self.base_url,
            envelope_id=envelope.id,
            payload_type=envelope.payload_type,
        )
        response = await self._post("/asap", encode, deadline)
        reply = _reply_envelope(self.base_url, _decode_json(response))
        _check_correlation(envelope, reply)
        _log.debug("asap.client.response", url=self.base_url, envelope_id=reply.id)
        return reply

    async def send_batch(
        self, envelopes: Sequence[Envelope], *, return_exceptions: bool = False
    ) -> list[Envelope | BaseException]:
        """Send envelopes concurrently, one request each, over the pooled connections."""
        results = await asyncio.gather(
            *(self.send(envelope) for envelope in envelopes), return_exceptions=return_exceptions
        )
        return list(results)

    async def batch(
        self,
        envelopes: Sequence[Envelope],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Send envelopes as one JSON-RPC batch (spec 3.7) and return the replies.

        Each frame's id is its envelope id. By default the replies come in the server's order
        and the first error reply raises; with ``return_exceptions`` they come in request order
        and an error reply is returned in its place as a :class:`RemoteRPCError` (or the
        correlation / validation error it caused).
        """
        if not envelopes:
            raise ValueError("batch() needs at least one envelope")
        deadline = self._deadline(timeout)
        limited = timeout is not None or current_deadline.get() is not None
        frames = []
        for envelope in envelopes:
            wire = envelope.model_dump(mode="json")
            if limited:
                _set_deadline(wire, deadline)
            frames.append(
                {
                    "jsonrpc": "2.0",
                    "method": "asap.send",
                    "params": {"envelope": wire},
                    "id": wire["id"],
                }
            )
        # The reference server cannot read a compressed batch (spec 3.7): send it plain.
        response = await self._post("/asap", self._frames(frames, {}, compress=False), deadline)
        data = _decode_json(response)
        if isinstance(data, dict):  # a whole-batch error (empty or too large)
            _reply_envelope(self.base_url, data)
            raise MalformedEnvelopeError(f"Malformed envelope: batch reply is not a list: {data}")
        if not isinstance(data, list):
            raise MalformedEnvelopeError("Malformed envelope: batch reply is not a list")
        by_id = {envelope.id: envelope for envelope in envelopes}
        replies: dict[str, Any] = {}
        for item in data:
            request = by_id.get(str(item.get("id"))) if isinstance(item, dict) else None
            if request is None:
                raise MalformedEnvelopeError(
                    f"Malformed envelope: batch reply id {item.get('id')!r} matches no request"
                )
            try:
                reply = _reply_envelope(self.base_url, item)
                _check_correlation(request, reply)
            except ASAPError as exc:
                if not return_exceptions:
                    raise
                replies[request.id] = exc
            else:
                replies[request.id] = reply
        if not return_exceptions:
            return list(replies.values())
        missing = MalformedEnvelopeError("Malformed envelope: no reply for this request")
        return [replies.get(envelope.id, missing) for envelope in envelopes]

    # -- discovery -----------------------------------------------------------------------

    async def _get_json(self, url: str) -> Any:
        deadline = time.monotonic() + min(self.timeout, 10.0)
        response = await self._request("GET", url, deadline)
        if not 200 <= response.status_code < 300 and response.status_code != 503:
            raise _http_status_error(url, response)
        return _decode_json(response)

    async def get_manifest(self, url: str | None = None) -> Manifest:
        """Fetch the agent's manifest (``url`` defaults to this client's agent)."""
        target = url or self.base_url + MANIFEST_PATH
        data = await self._get_json(target)
        try:
            manifest = Manifest.model_validate(data.get("manifest", data))
        except (ValidationError, AttributeError) as exc:
            raise MalformedEnvelopeError(f"Malformed manifest from {target}: {exc}") from exc
        _log.debug("asap.client.manifest_fetched", url=target, agent_id=manifest.id)
        return manifest

    async def discover(self, base_url: str | None = None) -> Manifest:
        """Fetch the manifest of the agent rooted at ``base_url`` (default: this client's)."""
        root = (base_url or self.base_url).rstrip("/")
        return await self.get_manifest(root + MANIFEST_PATH)

    async def health_check(self, base_url: str | None = None) -> HealthStatus:
        """Fetch ``/.well-known/asap/health``; an unhealthy agent answers 503 with a body."""
        root = (base_url or self.base_url).rstrip("/")
        data = await self._get_json(root + HEALTH_PATH)
        try:
            return HealthStatus.model_validate(data)
        except ValidationError as exc:
            raise MalformedEnvelopeError(f"Malformed health status from {root}: {exc}") from exc


def _set_deadline(wire: dict[str, Any], deadline: float) -> None:
    """Tell the remote how long a task may run: at most the time we will wait (whole seconds,
    at least 1, as ``TaskRequest.config.timeout_seconds`` is an integer). Applied to the wire
    form: three model copies per request cost more than the rest of building it."""
    payload = wire.get("payload")
    if normalize_payload_type(wire.get("payload_type", "")) != "taskrequest" or not isinstance(
        payload, dict
    ):
        return
    budget = max(1, int(deadline - time.monotonic()))
    config = payload.get("config") or _EMPTY_CONFIG
    given = config.get("timeout_seconds")
    if given is not None and given <= budget:
        return
    payload["config"] = {**config, "timeout_seconds": budget}


_EMPTY_CONFIG = TaskRequestConfig().model_dump(mode="json")
"""The wire form of a request without config (every field, as the models write it)."""


def _http_status_error(url: str, response: httpx.Response) -> ASAPConnectionError:
    status = response.status_code
    if 300 <= status < 400:
        location = response.headers.get("location", "")[:200]
        return ASAPConnectionError(
            f"HTTP redirect {status} from {url} to {location!r} not followed: an agent's "
            "endpoint must answer itself",
            {"url": url, "status_code": status, "location": location},
        )
    text = response.text[:200]
    kind = "server" if status >= 500 else "client"
    error = ASAPConnectionError(
        f"HTTP {kind} error {status} from {url}: {text}",
        {"url": url, "status_code": status, "body": text},
    )
    error.recoverable = status >= 500 or status == 429
    return error


def _decode_json(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise RemoteRPCError(-32700, f"Invalid response: {exc}") from None


def _reply_envelope(url: str, data: Any) -> Envelope:
    if not isinstance(data, dict):
        raise RemoteRPCError(-32600, f"Invalid response from {url}: not a JSON-RPC object")
    error = data.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise RemoteRPCError(-32603, f"Invalid error reply from {url}: {error!r}")
        code = error.get("code")
        raise RemoteRPCError(
            code if isinstance(code, int) else -32603,
            str(error.get("message", "")),
            error.get("data"),
        )
    result = data.get("result")
    if not isinstance(result, dict) or "envelope" not in result:
        raise RemoteRPCError(-32603, "Missing envelope in response")
    try:
        return Envelope.model_validate(result["envelope"])
    except ValidationError as exc:
        raise MalformedEnvelopeError(f"Malformed envelope from {url}: {exc}") from exc


def _check_correlation(request: Envelope, reply: Envelope) -> None:
    if reply.payload_key in CORRELATED_PAYLOAD_TYPES and reply.correlation_id != request.id:
        raise ProtocolCorrelationError(request.id, reply.correlation_id)

"""The Starlette app of an ASAP agent: :func:`create_app` (spec 3.1).

Routes: ``POST /asap`` (JSON-RPC, single or batch), ``POST /asap/stream`` (SSE),
``GET /.well-known/asap/manifest.json`` (ETag, 304), ``GET /.well-known/asap/health``,
``GET /health`` and ``GET /ready``. Every response carries ``asap-version`` (spec 3.9).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asap import memory
from asap.errors import (
    ASAPError,
    HTTPError,
    InternalError,
    JsonRpcError,
    ThreadPoolExhaustedError,
    VersionIncompatibleError,
)
from asap.models.entities import AuthScheme, Capability, Endpoint, Manifest
from asap.observability.logging import configure_logging, get_logger, protect
from asap.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from asap.observability.metrics import Metrics
from asap.observability.tracing import setup_tracing
from asap.registry import SkillRegistry
from asap.settings import Settings
from asap.state import open_storage
from asap.transport import codec
from asap.transport.dispatch import Dispatcher, RequestMeta
from asap.transport.jsonrpc import error_reply, request_id_of
from asap.transport.pool import ClientPool
from asap.transport.resilience import RetryConfig

__all__ = ["SUPPORTED_TRANSPORT_VERSIONS", "DEFAULT_TRANSPORT_VERSION", "create_app"]

SUPPORTED_TRANSPORT_VERSIONS = ("2.1", "2.2")
DEFAULT_TRANSPORT_VERSION = "2.2"
_NEGOTIATED_PATHS = frozenset({"/asap/stream"})
_log = get_logger("asap.server")


def negotiate_version(header: str | None) -> str | None:
    """First token of ``ASAP-Version`` we support, in the caller's order (spec 3.9).

    An absent or blank header means the default; None means nothing offered is supported.
    """
    if header is None or not header.strip():
        return DEFAULT_TRANSPORT_VERSION
    for token in header.split(","):
        if token.strip() in SUPPORTED_TRANSPORT_VERSIONS:
            return token.strip()
    return None


class VersionMiddleware:
    """Negotiate ``ASAP-Version`` on the POST endpoints and stamp it on every response.

    Runs first (spec 3.3 step 1): an unsupported version is answered before the body is read.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_asap_post(scope):  # that endpoint negotiates itself
            await self.app(scope, receive, send)
            return
        version = DEFAULT_TRANSPORT_VERSION
        if scope["path"] in _NEGOTIATED_PATHS and scope["method"] == "POST":
            requested = None
            for name, value in scope["headers"]:
                if name == b"asap-version":
                    requested = value.decode("latin-1")
                    break
            negotiated = negotiate_version(requested)
            if negotiated is None:
                response = _incompatible(requested)
                response.headers["asap-version"] = DEFAULT_TRANSPORT_VERSION
                await response(scope, receive, send)
                return
            version = negotiated
        header = (b"asap-version", version.encode())

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_version)


_ASAP_HEADERS = frozenset(
    {
        b"asap-version",
        b"authorization",
        b"content-encoding",
        b"content-length",
        b"prefer",
        b"traceparent",
        b"x-idempotency-key",
    }
)
"""The request headers ``POST /asap`` reads."""


class _Raw:
    """A plain ASGI function as a Starlette route's app (not wrapped in a request/response)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _is_asap_post(scope: Scope) -> bool:
    if scope["method"] != "POST":
        return False
    path, root = scope["path"], scope.get("root_path", "")
    return path == "/asap" or bool(root and path == root + "/asap")


class AgentApp(Starlette):
    """The agent's Starlette app, with ``POST /asap`` (nearly every request an agent serves)
    handed straight to ``asap_endpoint``: Starlette's routing, request object and middleware
    layers cost more than the rest of an echo request. Once a user adds middleware of their
    own, every request goes through it, and so through Starlette."""

    def __init__(self, asap_endpoint: ASGIApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asap_endpoint = asap_endpoint
        self._direct: bool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._direct is None:  # middleware can be added only before the first request
            self._direct = all(cast(Any, m.cls) is VersionMiddleware for m in self.user_middleware)
        if self._direct and scope["type"] == "http" and _is_asap_post(scope):
            await self.asap_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _incompatible(requested: str | None) -> Response:
    """The reply to an ``ASAP-Version`` header offering nothing we support (spec 3.9)."""
    _log.info("asap.version.incompatible", requested=requested)
    reply = error_reply(
        VersionIncompatibleError(
            {"requested": requested, "supported": list(SUPPORTED_TRANSPORT_VERSIONS)}
        ),
        None,
    )
    return _json(reply)


async def _send(send: Send, reply: Response | bytes, version: str) -> None:
    """Send a JSON reply (bytes: HTTP 200) with the negotiated ``asap-version``."""
    if isinstance(reply, bytes):
        status, body = 200, reply
        headers = [(b"content-length", str(len(body)).encode()), _JSON_TYPE]
    else:
        status, body, headers = reply.status_code, bytes(reply.body), reply.raw_headers
    headers.append((b"asap-version", version.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_JSON_TYPE = (b"content-type", b"application/json")


def _json(data: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    try:
        body = codec.dumps(data)
    except TypeError:  # a skill returned something JSON cannot carry
        _log.exception("asap.response.unserializable")
        request_id = data.get("id") if isinstance(data, dict) else None
        body = codec.dumps(
            error_reply(InternalError({"error": "Internal server error"}), request_id)
        )
    return Response(body, status_code, headers, media_type="application/json")


OVERLOADED = ThreadPoolExhaustedError.rpc_code


def _overloaded(data: dict[str, Any]) -> Response:
    """HTTP 503 for an agent at its task limit (spec 3.6: not JSON-RPC, so that every client
    backs off and retries)."""
    body: dict[str, Any] = {
        "error": "Service Temporarily Unavailable",
        **{k: data[k] for k in ("code", "rpc_code", "message", "details") if k in data},
        "recoverable": True,
        "retry_after_ms": data.get("retry_after_ms", 1000),
        "fallback_action": "retry_later",
    }
    retry_after = max(1, -(-int(body["retry_after_ms"]) // 1000))
    return _json(body, 503, {"retry-after": str(retry_after)})


def _drain_on_sigterm(drain: Callable[[], None], delay: float) -> Callable[[], None]:
    """Chain a graceful drain in front of the server's SIGTERM handler (uvicorn's): drain at
    once, pass the signal on after ``delay`` seconds. Returns the function that undoes it.
    Only the main thread may set handlers; elsewhere (tests) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int) -> None:
        if callable(previous):
            previous(signum, None)
        else:
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signum)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(drain)
        loop.call_soon_threadsafe(loop.call_later, delay, forward, signum)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


def _detail(status_code: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"detail": detail}, status_code, headers)


def build_manifest(settings: Settings, registry: SkillRegistry, base_url: str) -> Manifest:
    """The manifest this agent serves when reached at ``base_url``."""
    auth = settings.auth_tokens or settings.auth_tokens_file
    return Manifest(
        auth=AuthScheme(schemes=["bearer"]) if auth else None,
        id=settings.agent_id,
        name=settings.agent_name,
        version=settings.agent_version,
        description=settings.agent_description,
        capabilities=Capability(skills=registry.manifest_skills(), streaming=True),
        endpoints=Endpoint(asap=base_url.rstrip("/") + "/asap"),
    )


class _ManifestCache:
    """Serialized manifest and its ETag per public base URL (bounded)."""

    def __init__(self, settings: Settings, registry: SkillRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._entries: dict[str, tuple[bytes, str]] = {}

    def get(self, base_url: str) -> tuple[bytes, str]:
        base = self.settings.public_url or base_url
        entry = self._entries.get(base)
        if entry is None:
            data = build_manifest(self.settings, self.registry, base).to_wire()
            # spec 3.14: sha256 of the JSON with sorted keys and default separators
            etag = '"' + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest() + '"'
            entry = (codec.dumps(data), etag)
            if len(self._entries) >= 64:
                self._entries.clear()
            self._entries[base] = entry
        return entry


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for token in header.split(","):
        token = token.strip()
        if token == "*" or token.removeprefix("W/") == etag:
            return True
    return False


def create_app(
    settings: Settings | None = None,
    registry: SkillRegistry | None = None,
    **overrides: Any,
) -> Starlette:
    """Build an agent app.

    ``settings`` defaults to :meth:`Settings.from_env`; keyword ``overrides`` use the same
    names (``agent_id=...``). ``registry`` defaults to the skills of ``settings.skills``.
    """
    settings = (settings or Settings.from_env()).with_overrides(**overrides)
    configure_logging(settings.log_format, settings.log_level, settings.service_name)
    setup_tracing(settings.service_name)
    if registry is None:
        registry = SkillRegistry()
        for module in settings.skills:
            registry.load(module)
    manifests = _ManifestCache(settings, registry)
    default_limits, sender_limits = settings.rate_limits()
    metrics = Metrics()
    dispatcher = Dispatcher(
        settings,
        registry,
        build_manifest(settings, registry, settings.public_url or "http://localhost"),
        metrics,
    )
    auth = dispatcher.auth
    protect(filter(None, [settings.client_token]), settings.log_redact_keys)
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        retry = RetryConfig(
            max_retries=settings.client_max_retries,
            base_delay=settings.client_base_delay,
            max_delay=settings.client_max_delay,
            circuit_breaker_enabled=True,
            circuit_breaker_threshold=settings.client_breaker_threshold,
            circuit_breaker_timeout=settings.client_breaker_timeout,
        )
        # Peers come from the operator's configuration, so plain HTTP is allowed to them;
        # bodies between agents are compressed only when large.
        pool = ClientPool(
            retry,
            require_https=False,
            compression_threshold=64 * 1024,
            auth_token=settings.client_token,
            nonces=True,
            metrics=metrics,
        )
        storage = await open_storage(
            settings.storage_url,
            idempotency_ttl=float(settings.idempotency_ttl_seconds),
            idempotency_max_entries=settings.idempotency_max_entries,
        )
        await dispatcher.tasks.start(storage, pool)
        restore_signal = _drain_on_sigterm(dispatcher.tasks.drain, settings.shutdown_delay_seconds)
        # What start-up built (modules, models, schemas) lives as long as the process: out of
        # the collector's way, a full collection scans only what requests left behind (on a
        # slow machine, 40 ms pauses become a few ms: the p99 latency).
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        if settings.gc_threshold:
            gc.set_threshold(settings.gc_threshold, *gc.get_threshold()[1:])
        memory.tune()  # large blocks mapped on their own, so freeing them frees the memory
        _log.info(
            "asap.server.started",
            agent_id=settings.agent_id,
            skills=registry.ids(),
            storage=storage.url.split("@")[-1],
            instance=dispatcher.tasks.instance,
        )
        try:
            yield
        finally:
            restore_signal()
            await dispatcher.tasks.stop()
            await pool.aclose()
            await storage.aclose()
            metrics.close()

    async def read_body(receive: Receive, declared: str | None) -> bytes:
        limit = settings.max_request_size
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(
                413, f"Request size ({int(declared)} bytes) exceeds maximum ({limit} bytes)"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # nobody is left to answer; nothing started
                _log.info("asap.request.client_disconnected", received_bytes=size)
                raise HTTPError(400, "Client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"Request size ({size} bytes) exceeds maximum ({limit} bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def meta_of(headers: Mapping[str, str]) -> RequestMeta:
        identity = auth_error = None
        if auth is not None:
            try:
                identity = auth.identify(headers.get("authorization"))
            except JsonRpcError as exc:
                auth_error = exc
        return RequestMeta(
            traceparent=headers.get("traceparent"),
            idempotency_key=headers.get("x-idempotency-key"),
            respond_async="respond-async" in headers.get("prefer", ""),
            identity=identity,
            auth_error=auth_error,
        )

    async def rate_limited(client: str, meta: RequestMeta, cost: int) -> Response | None:
        """Charge the sender (spec 3.10): the authenticated agent, else the client address."""
        limits = sender_limits.get(meta.identity or "", default_limits)
        if not limits:
            return None
        sender = meta.identity or client
        assert dispatcher.tasks.storage is not None
        refused = await dispatcher.tasks.storage.guard.charge(sender, limits, cost)
        if refused is None:
            return None
        retry_after, limit = refused
        metrics.rate_limited.inc()
        _log.info("asap.rate_limit.exceeded", sender=sender, limit=limit.text)
        # spec 3.10: key order and the out-of-range code 429 are the reference's
        body = {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": 429,
                "message": "Rate limit exceeded",
                "data": {"retry_after": retry_after, "limit": limit.text},
            },
        }
        return _json(body, 429, {"retry-after": str(retry_after)})

    async def decoded_body(
        scope: Scope, receive: Receive, headers: Mapping[str, str], meta: RequestMeta
    ) -> Any:
        """Size limit, decompression, JSON and rate limit (spec 3.3 steps 3-6).

        The limit is charged after decoding so that a batch pays for every item whatever its
        encoding; decoding is bounded by the size limit, so this costs little.
        """
        body = await read_body(receive, headers.get("content-length"))
        client = scope["client"][0] if scope.get("client") else "unknown"
        try:
            decoded = codec.loads(
                codec.decompress(body, headers.get("content-encoding"), settings.max_request_size)
            )
        except ASAPError:
            refused = await rate_limited(client, meta, 1)  # bad bodies count too
            if refused is not None:
                return refused
            raise
        # A batch costs one hit per item, charged whole or refused whole (spec 3.7).
        cost = len(decoded) if isinstance(decoded, list) else 1
        refused = await rate_limited(client, meta, cost)
        if refused is not None:
            return refused
        return decoded

    async def answer(
        scope: Scope, receive: Receive, headers: Mapping[str, str]
    ) -> Response | bytes:
        """The reply to ``POST /asap``: JSON bytes (HTTP 200), or a response for the rest."""
        meta = meta_of(headers)
        try:
            body = await decoded_body(scope, receive, headers, meta)
        except HTTPError as exc:
            return _detail(exc.status_code, exc.detail)
        except ASAPError as exc:  # parse error
            metrics.parse_errors.inc()
            return _json(error_reply(exc, None))
        if isinstance(body, Response):
            return body
        if isinstance(body, dict):  # one request (a batch is a list)
            reply: Any = await dispatcher.handle_frame(body, meta)
        else:
            reply = await dispatcher.handle_body(body, meta)
        if isinstance(reply, dict) and reply.get("error", {}).get("code") == OVERLOADED:
            return _overloaded(reply["error"]["data"])
        try:
            return codec.dumps(reply)
        except TypeError:  # a skill returned something JSON cannot carry
            return _json(reply)

    async def asap_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /asap`` as a plain ASGI app: the hot path, without Starlette's request,
        routing and middleware layers (spec 3.3; replies as :class:`VersionMiddleware`'s)."""
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _ASAP_HEADERS:
                headers.setdefault(name.decode(), value.decode("latin-1"))
        version = negotiate_version(headers.get("asap-version"))
        if version is None:
            await _send(send, _incompatible(headers["asap-version"]), DEFAULT_TRANSPORT_VERSION)
            return
        try:
            reply = await answer(scope, receive, headers)
        except Exception:
            _log.exception("asap.server.unhandled_error")
            reply = _detail(500, "Internal Server Error")
        await _send(send, reply, version)

    async def stream_endpoint(request: Request) -> Response:
        meta = meta_of(request.headers)
        try:
            frame = await decoded_body(request.scope, request.receive, request.headers, meta)
        except HTTPError as exc:
            return _detail(exc.status_code, exc.detail)
        except ASAPError as exc:
            return _json(error_reply(exc, None))
        if isinstance(frame, Response):
            return frame
        try:
            chunks = await dispatcher.stream(frame, meta)
        except ThreadPoolExhaustedError as exc:
            return _overloaded(exc.to_dict())
        except ASAPError as exc:
            return _json(error_reply(exc, request_id_of(frame)))
        except Exception as exc:
            _log.exception("asap.request.internal_error")
            return _json(error_reply(dispatcher.internal_error(exc), request_id_of(frame)))

        async def events() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                yield b"data: " + codec.dumps(chunk) + b"\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream; charset=utf-8",
            headers={"cache-control": "no-cache", "connection": "keep-alive"},
        )

    async def manifest_endpoint(request: Request) -> Response:
        body, etag = manifests.get(str(request.base_url))
        headers = {"etag": etag, "cache-control": "public, max-age=300"}
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(body, headers=headers, media_type="application/json")

    async def health_endpoint(request: Request) -> Response:
        return _json(
            {
                "status": "healthy",
                "agent_id": settings.agent_id,
                "version": settings.agent_version,
                "asap_version": "0.1",
                "uptime_seconds": round(time.monotonic() - started, 2),
                "load": None,
            }
        )

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def ok_endpoint(request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready_endpoint(request: Request) -> Response:
        """Ready to take tasks: not draining, and the storage answers."""
        tasks = dispatcher.tasks
        if tasks.draining_since is not None:
            return _json({"status": "draining"}, 503)
        assert tasks.storage is not None
        try:
            async with asyncio.timeout(2.0):
                await tasks.storage.tasks.get("asap-readiness-probe")
        except (ASAPError, TimeoutError) as exc:
            _log.warning("asap.server.storage_unreachable", error=str(exc) or "timeout")
            return _json({"status": "storage unreachable"}, 503)
        return _json({"status": "ok"})

    async def http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _detail(exc.status_code, exc.detail, dict(exc.headers or {}))

    async def unhandled(request: Request, exc: Exception) -> Response:
        _log.exception("asap.server.unhandled_error")
        return _detail(500, "Internal Server Error")

    routes = [
        Route("/asap", _Raw(asap_endpoint), methods=["POST"]),
        Route("/asap/stream", stream_endpoint, methods=["POST"]),
        Route("/.well-known/asap/manifest.json", manifest_endpoint, methods=["GET"]),
        Route("/.well-known/asap/health", health_endpoint, methods=["GET"]),
        Route("/asap/metrics", metrics_endpoint, methods=["GET"]),
        Route("/health", ok_endpoint, methods=["GET"]),
        Route("/ready", ready_endpoint, methods=["GET"]),
    ]
    app = AgentApp(
        asap_endpoint,
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception, Exception: unhandled},
    )
    app.add_middleware(VersionMiddleware)
    app.state.settings = settings
    app.state.registry = registry
    app.state.dispatcher = dispatcher
    return app

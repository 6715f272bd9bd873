"""Retries and circuit breaking as httpx transports that wrap the network (spec 4.2, better).

``ASAPClient`` stacks them as ``CircuitBreakerTransport(RetryTransport(network))``: a logical
call is one breaker outcome, and an open circuit fails before any retry or socket. Neither
layer changes the request, so every retry carries the same body and the same idempotency key.

What is retried: connection errors and timeouts, HTTP 5xx, HTTP 429 (honouring
``Retry-After`` up to ``max_retry_after``), and JSON-RPC error replies that the remote marks
recoverable and that a resend of the same body can cure (overload, remote circuit open,
remote connection trouble). Never retried: any other 4xx, fatal JSON-RPC errors, and a stale
timestamp (-32002), which the identical body would hit again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import orjson

from asap.errors import ASAPTimeoutError, CircuitOpenError
from asap.observability.logging import get_logger
from asap.transport.circuit_breaker import CircuitBreaker, CircuitState
from asap.transport.network import network_transport

if TYPE_CHECKING:
    from asap.observability.metrics import Metrics

__all__ = [
    "DEADLINE_EXTENSION",
    "REBUILD_EXTENSION",
    "CircuitBreakerTransport",
    "RetryConfig",
    "RetryTransport",
]

DEADLINE_EXTENSION = "asap.deadline"
REBUILD_EXTENSION = "asap.rebuild"
"""A request extension: a function that builds the request afresh for another attempt
(new nonces), used instead of resending the same bytes."""
"""Request extension holding a ``time.monotonic()`` deadline that retries must respect."""

RETRYABLE_RPC_CODES = frozenset({-32011, -32031, -32032, -32033})
"""Recoverable ASAP errors a resend of the identical body can cure."""

_log = get_logger("asap.client")


@dataclass(frozen=True)
class RetryConfig:
    """How a client retries and when it stops calling a failing target.

    ``max_retries`` counts attempts in all (3 = one try and two retries), as the reference
    does. The delay before retry ``n`` is ``min(base_delay * 2**n, max_delay)``, with jitter
    drawing it uniformly from its upper half.
    """

    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: bool = True
    max_retry_after: float = 30.0
    circuit_breaker_enabled: bool = False
    circuit_breaker_threshold: int = 5
    circuit_breaker_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 1:
            raise ValueError(
                f"max_retries counts attempts and must be >= 1, got {self.max_retries}"
            )
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays must not be negative")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        delay = min(self.base_delay * 2**retry, self.max_delay)
        return random.uniform(delay / 2, delay) if self.jitter else delay


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _recoverable_rpc_error(response: httpx.Response) -> bool:
    """A 2xx JSON-RPC error the remote says a resend can cure."""
    if b'"error"' not in response.content[:64]:
        return False
    try:
        error = orjson.loads(response.content).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    if not isinstance(error, dict) or not isinstance(error.get("data"), dict):
        return False
    return error["data"].get("recoverable") is True and error.get("code") in RETRYABLE_RPC_CODES


class RetryTransport(httpx.AsyncBaseTransport):
    """Resend a request while the failure is one a resend can cure (see module docstring)."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        config: RetryConfig,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self.inner = inner
        self.config = config
        self.sleep = sleep
        self.metrics = metrics

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadline: float | None = request.extensions.get(DEADLINE_EXTENSION)
        attempts = self.config.max_retries
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await self.inner.handle_async_request(request)
            except httpx.TransportError as exc:
                if last:
                    raise
                reason, wait = type(exc).__name__, self.config.delay(attempt)
            else:
                status = response.status_code
                if status >= 500 or status == 429:
                    if last:
                        return response
                    await response.aread()
                    retry_after = _retry_after_seconds(response.headers.get("retry-after"))
                    await response.aclose()
                    reason = f"HTTP {status}"
                    wait = (
                        min(retry_after, self.config.max_retry_after)
                        if retry_after is not None
                        else self.config.delay(attempt)
                    )
                elif 200 <= status < 300 and not last:
                    await response.aread()
                    if not _recoverable_rpc_error(response):
                        return response
                    reason, wait = "recoverable JSON-RPC error", self.config.delay(attempt)
                else:
                    return response
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise ASAPTimeoutError(
                    f"Deadline reached before retry {attempt + 1} of {request.url} ({reason})",
                    {"url": str(request.url), "attempts": attempt + 1},
                )
            _log.info(
                "asap.client.retry",
                url=str(request.url),
                attempt=attempt + 1,
                reason=reason,
                delay_s=round(wait, 3),
            )
            if self.metrics is not None:
                self.metrics.transport_retry(target_of(request.url), reason)
            await self.sleep(wait)
            rebuild = request.extensions.get(REBUILD_EXTENSION)
            if rebuild is not None:
                request = rebuild()
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self.inner.aclose()


def target_of(url: httpx.URL) -> str:
    """The breaker key of a URL: scheme, host and port."""
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}"


class CircuitBreakerTransport(httpx.AsyncBaseTransport):
    """One :class:`CircuitBreaker` per target; an open circuit raises before any I/O.

    A failure is a transport error or an HTTP 5xx/429 after the inner layer gave up; any
    other answer, JSON-RPC errors included, shows the target is up and counts as a success.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        threshold: int = 5,
        reset_timeout: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.inner = inner
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.metrics = metrics
        self.breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, target: str) -> CircuitBreaker:
        """The breaker of ``target`` (``scheme://host:port``), created closed on first use."""
        breaker = self.breakers.get(target)
        if breaker is None:

            def log_change(old: CircuitState, new: CircuitState) -> None:
                event = {
                    CircuitState.OPEN: "asap.client.circuit_opened",
                    CircuitState.CLOSED: "asap.client.circuit_closed",
                    CircuitState.HALF_OPEN: "asap.client.circuit_half_open",
                }[new]
                _log.warning(event, target=target, previous=old.value)
                if self.metrics is not None:
                    self.metrics.circuit_changed(target, old.value, new.value)

            breaker = CircuitBreaker(
                self.threshold, self.reset_timeout, clock=self.clock, on_change=log_change
            )
            self.breakers[target] = breaker
            if self.metrics is not None:
                self.metrics.circuit_changed(target, None, breaker.state.value)
        return breaker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        target = target_of(request.url)
        breaker = self.breaker(target)
        if not breaker.can_attempt():
            raise CircuitOpenError(
                f"Circuit open for {target} after {breaker.consecutive_failures} "
                "consecutive failures",
                {"target": target, "consecutive_failures": breaker.consecutive_failures},
                retry_after_ms=int(breaker.retry_after() * 1000) or None,
            )
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TransportError:
            breaker.record_failure()
            raise
        except BaseException:
            breaker.release()  # cancelled, or our own deadline: says nothing about the target
            raise
        if response.status_code >= 500 or response.status_code == 429:
            breaker.record_failure()
        else:
            breaker.record_success()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def resilient_transport(
    config: RetryConfig,
    inner: httpx.AsyncBaseTransport | None = None,
    *,
    limits: httpx.Limits | None = None,
    metrics: Metrics | None = None,
) -> httpx.AsyncBaseTransport:
    """The transport stack for ``config``: breaker (if enabled) around retries around ``inner``.

    With ``metrics`` (the agent's, for its client pool) retries and breaker changes are
    counted there.
    """
    network = inner or network_transport(limits)
    stack: httpx.AsyncBaseTransport = RetryTransport(network, config, metrics=metrics)
    if config.circuit_breaker_enabled:
        stack = CircuitBreakerTransport(
            stack,
            config.circuit_breaker_threshold,
            config.circuit_breaker_timeout,
            metrics=metrics,
        )
    return stack

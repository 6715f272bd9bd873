"""The connections an agent uses for its outgoing calls: :class:`ClientPool`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from asap.models.envelope import Envelope
from asap.transport.client import ASAPClient
from asap.transport.resilience import RetryConfig, resilient_transport

if TYPE_CHECKING:
    from asap.observability.metrics import Metrics

__all__ = ["ClientPool"]


class ClientPool:
    """Hands out one :class:`ASAPClient` per peer URL, each peer's clients sharing one
    transport stack (keep-alive connections, retries, that peer's circuit breaker).

    Each peer has its own connection pool (:mod:`asap.transport.network`), so a slow or
    failing peer does not hold the connections of the others. Opened and closed by the
    server's lifespan; skills reach it as ``ctx.client``. Retries and breaker changes are
    counted in ``metrics`` (the agent's) when given.
    """

    def __init__(
        self, retry_config: RetryConfig, *, metrics: Metrics | None = None, **client_options: Any
    ) -> None:
        self.retry_config = retry_config
        self.metrics = metrics
        self._options = client_options
        self._transports: dict[str, httpx.AsyncBaseTransport] = {}
        self._clients: dict[str, ASAPClient] = {}

    def __repr__(self) -> str:
        return f"ClientPool({sorted(self._clients)})"

    def get(self, base_url: str) -> ASAPClient:
        """The client for the agent rooted at ``base_url`` (created on first use)."""
        key = base_url.rstrip("/")
        client = self._clients.get(key)
        if client is None:
            parts = urlsplit(key)
            origin = f"{parts.scheme}://{parts.netloc}"
            transport = self._transports.get(origin)
            if transport is None:
                transport = self._transports[origin] = resilient_transport(
                    self.retry_config, metrics=self.metrics
                )
            client = ASAPClient(key, shared_transport=transport, **self._options)
            self._clients[key] = client
        return client

    async def send(self, base_url: str, envelope: Envelope, **kwargs: Any) -> Envelope:
        """Send ``envelope`` to the agent at ``base_url`` and return its reply."""
        return await self.get(base_url).send(envelope, **kwargs)

    async def aclose(self) -> None:
        """Close every peer's connections."""
        self._clients.clear()
        for transport in self._transports.values():
            await transport.aclose()
        self._transports.clear()

"""One connection pool for every outgoing call an agent makes: :class:`ClientPool`."""

from __future__ import annotations

from typing import Any

import httpx

from asap.models.envelope import Envelope
from asap.transport.client import ASAPClient

__all__ = ["ClientPool"]


class ClientPool:
    """Hands out :class:`ASAPClient` objects that all share one ``httpx.AsyncClient``.

    Opened and closed by the server's lifespan; skills reach it as ``ctx.client``.
    """

    def __init__(self, http_client: httpx.AsyncClient, **client_options: Any) -> None:
        self._http = http_client
        self._options = client_options
        self._clients: dict[str, ASAPClient] = {}

    def __repr__(self) -> str:
        return f"ClientPool({sorted(self._clients)})"

    def get(self, base_url: str) -> ASAPClient:
        """The client for the agent rooted at ``base_url`` (created on first use)."""
        key = base_url.rstrip("/")
        client = self._clients.get(key)
        if client is None:
            client = ASAPClient(key, http_client=self._http, **self._options)
            self._clients[key] = client
        return client

    async def send(self, base_url: str, envelope: Envelope, **kwargs: Any) -> Envelope:
        """Send ``envelope`` to the agent at ``base_url`` and return its reply."""
        return await self.get(base_url).send(envelope, **kwargs)

    async def aclose(self) -> None:
        """Close the shared connection pool."""
        self._clients.clear()
        await self._http.aclose()

"""Task state: the lifecycle state machine (spec 2.3) and durable stores chosen by URL.

:func:`open_storage` maps a URL scheme to a backend, imported only when chosen. Every backend
ships with the package: Redis is spoken by :mod:`asap.state.resp`, no client library needed.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from asap.errors import ConfigurationError
from asap.state.store import Storage

__all__ = ["BACKENDS", "open_storage"]

BACKENDS: dict[str, str] = {
    "memory": "asap.state.store:memory_storage",
    "sqlite": "asap.state.sqlite:sqlite_storage",
    "redis": "asap.state.redis:redis_storage",
    "rediss": "asap.state.redis:redis_storage",
}
"""URL scheme -> ``module:factory``; a factory takes ``(url, **options)`` and returns a
:class:`Storage` (async factories are awaited)."""


async def open_storage(url: str, **options: Any) -> Storage:
    """Open the backend ``url`` names (``memory://``, ``sqlite:///path``, ``redis://...``).

    A Redis URL may carry ``?prefix=name:`` to keep several deployments (or test runs) apart
    in one database; it becomes the ``key_prefix`` option.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = [value for name, value in query if name == "prefix"]
    if prefix and scheme.startswith("redis"):
        options["key_prefix"] = prefix[-1]
        rest = urlencode([(name, value) for name, value in query if name != "prefix"])
        url = urlunsplit(parts._replace(query=rest))
    target = BACKENDS.get(scheme)
    if target is None:
        raise ConfigurationError(
            f"ASAP_STORAGE_URL: unsupported scheme {scheme!r} in {url!r}; "
            f"use one of {sorted(BACKENDS)}"
        )
    module_name, _, factory_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"storage backend {scheme!r} unavailable: {exc}") from exc
    storage = getattr(module, factory_name)(url, **options)
    if hasattr(storage, "__await__"):
        storage = await storage
    if not isinstance(storage, Storage):
        raise ConfigurationError(f"storage factory {target} did not return a Storage")
    return storage

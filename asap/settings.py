"""One settings object for an agent, read from ``ASAP_``-prefixed environment variables.

Each field's environment variable is ``ASAP_`` + its name in upper case (``agent_id`` ->
``ASAP_AGENT_ID``), and the same name is a keyword of :func:`asap.create_app`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from asap.errors import ConfigurationError
from asap.models.envelope import validate_agent_urn
from asap.transport.ratelimit import RateLimit, parse_rate_limit

__all__ = ["Settings", "DEFAULT_SKILL_MODULES"]

DEFAULT_SKILL_MODULES = ("skills",)
_PEER_NAME = re.compile(r"^[a-z0-9-]+$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Configuration of one agent process."""

    agent_id: str = "urn:asap:agent:default-server"
    """The agent's URN: the manifest id and the ``sender`` of every reply."""
    agent_name: str = "ASAP Agent"
    agent_version: str = "1.0.0"
    agent_description: str = "An ASAP agent"
    skills: tuple[str, ...] = DEFAULT_SKILL_MODULES
    """Modules (or packages) whose ``@skill`` functions are served."""
    public_url: str | None = None
    """Root URL others reach this agent at; default: taken from each request's Host."""
    max_request_size: int = 10 * 1024 * 1024
    """Largest request body, compressed or not (spec 3.11)."""
    max_batch_size: int = 50
    rate_limit: str | None = "1000/second;30000/minute"
    """Requests per sender (the authenticated agent; the client IP when authentication is
    off), e.g. ``"100/second;5000/minute"`` (spec 3.10); ``off`` or empty: no limit. Shared by
    every worker when the storage is Redis."""
    rate_limit_senders: str | None = None
    """Limits for particular senders, ``urn=limit`` pairs or a JSON object
    (``urn:asap:agent:orchestrator=5000/second``); needs authentication to mean anything."""
    auth_tokens: str | None = None
    """Bearer tokens callers must present: ``urn=token`` pairs or a JSON object of URN to
    token(s) (see :mod:`asap.security`). Set: ``POST /asap`` and ``/asap/stream`` need a token
    and an envelope's ``sender`` must be the token's agent."""
    auth_tokens_file: str | None = None
    """A file with more tokens, in either form of ``auth_tokens``."""
    client_token: str | None = None
    """Bearer token this agent presents when it calls its peers."""
    require_nonce: bool = False
    """Every envelope must carry a fresh ``extensions.nonce`` (spec 3.13); nonces are
    remembered in the storage, so a replay to another worker sharing it is caught too."""
    nonce_ttl_seconds: int = 600
    """How long a nonce is remembered; at least the timestamp window it guards."""
    max_concurrent_tasks: int = 1000
    """Tasks this process runs at once; past it, new ones are refused with HTTP 503."""
    shutdown_grace_seconds: int = 30
    """On SIGTERM, how long running tasks may take to finish before they are interrupted
    (resumable ones are left to another instance, others fail)."""
    shutdown_delay_seconds: float = 0.0
    """On SIGTERM, how long the agent keeps its port open with ``/ready`` answering 503 (so a
    load balancer stops sending) before it stops accepting connections."""
    gc_freeze: bool = True
    """After start-up, move every object that exists to the garbage collector's permanent
    generation (``gc.freeze``), so full collections under load stay short. Turn off when the
    agent is embedded in a process whose start-up objects must stay collectable."""
    gc_threshold: int = 10000
    """The garbage collector's first-generation threshold (``gc.set_threshold``), set at
    start-up: Python's 700 runs a collection every few requests, scanning every request in
    flight each time; 0 leaves Python's. Process-wide, like ``gc_freeze``."""
    log_redact_keys: tuple[str, ...] = ()
    """More key names (parts) whose values never reach the logs, beyond password, token,
    secret, authorization, credential and api_key."""
    max_envelope_age_seconds: int = 300
    max_future_tolerance_seconds: int = 30
    storage_url: str = "sqlite:///asap-state.db"
    """Where tasks, snapshots and idempotency records live: ``memory://``,
    ``sqlite:///path`` (a local file, the default) or ``redis://host:port/db`` (shared)."""
    task_lease_seconds: int = 15
    """How long a task stays owned by its instance without renewal; after that another
    instance takes it over (resumes it, or marks it failed)."""
    task_retention_seconds: int = 86400
    """How long a finished (completed, failed, cancelled) task's record and snapshots are kept
    after it finished; then the lease loop deletes them and ``state.query`` answers -32010.
    0: keep them forever."""
    instance_id: str | None = None
    """Name of this agent process in task leases; default: host, pid and a random suffix."""
    task_timeout_seconds: int | None = None
    """Deadline of a task whose request gives no ``config.timeout_seconds``; unset: none."""
    idempotency_ttl_seconds: int = 3600
    """How long the outcome of a request with an idempotency key is kept."""
    idempotency_max_entries: int = 10_000
    """Most outcomes kept at once (oldest dropped first)."""
    peers: str | None = None
    """Agents this one may call, ``name=url,name=url`` or a JSON object; see :meth:`peer_urls`."""
    client_max_retries: int = 3
    """Attempts per outgoing call (1 = no retry)."""
    client_base_delay: float = 0.1
    client_max_delay: float = 2.0
    client_breaker_threshold: int = 5
    """Consecutive failures that open the circuit to a peer."""
    client_breaker_timeout: float = 30.0
    """Seconds an open circuit waits before letting a probe through."""
    max_plan_steps: int = 100
    """Largest orchestration plan accepted."""
    max_fan_out: int = 16
    """Most sub-requests one orchestration has in flight at once."""
    debug: bool = False
    """Put exception types and tracebacks in error replies. Never in production."""
    log_format: str = "console"
    log_level: str = "INFO"
    service_name: str = "asap"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            validate_agent_urn(self.agent_id)
        except ValueError as exc:
            raise ConfigurationError(f"ASAP_AGENT_ID: {exc}") from None
        for name in (
            "max_request_size",
            "max_batch_size",
            "max_envelope_age_seconds",
            "idempotency_ttl_seconds",
            "task_lease_seconds",
            "idempotency_max_entries",
            "client_max_retries",
            "client_breaker_threshold",
            "max_plan_steps",
            "max_fan_out",
            "max_concurrent_tasks",
            "nonce_ttl_seconds",
        ):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"ASAP_{name.upper()} must be at least 1")
        if self.gc_threshold < 0:
            raise ConfigurationError(
                "ASAP_GC_THRESHOLD must be 0 (Python's own) or a positive number of "
                f"allocations, got {self.gc_threshold}"
            )
        if self.task_retention_seconds < 0:
            raise ConfigurationError(
                "ASAP_TASK_RETENTION_SECONDS must be 0 (keep finished tasks forever) or a "
                f"positive number of seconds, got {self.task_retention_seconds}"
            )
        self.peer_urls()
        self.rate_limits()
        window = self.max_envelope_age_seconds + self.max_future_tolerance_seconds
        if self.require_nonce and self.nonce_ttl_seconds < window:
            raise ConfigurationError(
                f"ASAP_NONCE_TTL_SECONDS ({self.nonce_ttl_seconds}) must cover the timestamp "
                f"window ({window} s), or a replay could pass once its nonce is forgotten"
            )

    def peer_urls(self) -> dict[str, str]:
        """``ASAP_PEERS`` as a name -> base URL mapping (validated at start-up)."""
        return _parse_peers(self.peers)

    def rate_limits(self) -> tuple[list[RateLimit], dict[str, list[RateLimit]]]:
        """The default limit and the per-sender ones (validated at start-up)."""
        default = parse_rate_limit(self.rate_limit) if self.rate_limit else []
        senders: dict[str, list[RateLimit]] = {}
        for urn, spec in _pairs(self.rate_limit_senders, "ASAP_RATE_LIMIT_SENDERS"):
            try:
                validate_agent_urn(urn)
            except ValueError as exc:
                raise ConfigurationError(f"ASAP_RATE_LIMIT_SENDERS: {exc}") from None
            senders[urn] = parse_rate_limit(spec)
        return default, senders

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``ASAP_<FIELD>`` variable; keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = env.get(f"ASAP_{spec.name.upper()}")
            if raw is None or spec.name == "extra":
                continue
            if not raw.strip() and str(spec.type) == "str":  # blank text: the default
                continue
            values[spec.name] = _parse(spec.name, spec.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    if kind.endswith(" | None"):  # optional: empty means unset, else the base type
        if not raw.strip():
            return None
        kind = kind.removesuffix(" | None")
    if kind.startswith("bool"):
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigurationError(f"ASAP_{name.upper()} must be true or false, got {raw!r}")
    if kind.startswith("float"):
        try:
            return float(raw)
        except ValueError:
            raise ConfigurationError(f"ASAP_{name.upper()} must be a number, got {raw!r}") from None
    if kind.startswith("int"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(
                f"ASAP_{name.upper()} must be an integer, got {raw!r}"
            ) from None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def _pairs(spec: str | None, variable: str) -> list[tuple[str, str]]:
    """``name=value`` pairs separated by commas, or a JSON object of strings."""
    if not spec or not spec.strip():
        return []
    text = spec.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{variable} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ConfigurationError(
                f'{variable} as JSON must map names to strings: {{"a": "..."}}'
            )
        return list(raw.items())
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigurationError(f"{variable}: {item!r} is not name=value")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _parse_peers(spec: str | None) -> dict[str, str]:
    peers: dict[str, str] = {}
    for name, url in _pairs(spec, "ASAP_PEERS"):
        if not _PEER_NAME.match(name):
            raise ConfigurationError(
                f"ASAP_PEERS: peer name {name!r} must be lowercase letters, digits and '-'"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"ASAP_PEERS: {name}={url!r} is not an http(s) URL")
        peers[name] = url.rstrip("/")
    return peers

"""One settings object for an agent, read from ``ASAP_``-prefixed environment variables.

Each field's environment variable is ``ASAP_`` + its name in upper case (``agent_id`` ->
``ASAP_AGENT_ID``), and the same name is a keyword of :func:`asap.create_app`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from asap.errors import ConfigurationError
from asap.models.envelope import validate_agent_urn

__all__ = ["Settings", "DEFAULT_SKILL_MODULES"]

DEFAULT_SKILL_MODULES = ("skills",)
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
    rate_limit: str | None = None
    """Requests per client, e.g. ``"100/second;5000/minute"`` (spec 3.10); unset: no limit."""
    max_envelope_age_seconds: int = 300
    max_future_tolerance_seconds: int = 30
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
        for name in ("max_request_size", "max_batch_size", "max_envelope_age_seconds"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"ASAP_{name.upper()} must be at least 1")

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
            values[spec.name] = _parse(spec.name, spec.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    if kind.startswith("bool"):
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigurationError(f"ASAP_{name.upper()} must be true or false, got {raw!r}")
    if kind.startswith("int"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(
                f"ASAP_{name.upper()} must be an integer, got {raw!r}"
            ) from None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind.startswith("str | None"):
        return raw or None
    return raw

"""Entities of spec 2.4: the manifest and its parts, tasks, messages, artifacts, snapshots."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from packaging.version import InvalidVersion, Version
from pydantic import ConfigDict, Field, field_validator

from asap.models.base import ASAPBaseModel, UTCDateTime, utc_now
from asap.models.enums import MessageRole, TaskStatus
from asap.models.envelope import validate_agent_urn

__all__ = [
    "DEFAULT_MANIFEST_TTL_SECONDS",
    "MAX_TASK_DEPTH",
    "SUPPORTED_AUTH_SCHEMES",
    "Agent",
    "Artifact",
    "AuthScheme",
    "Capability",
    "CommonMetadata",
    "Conversation",
    "Endpoint",
    "HardwareCapability",
    "HealthStatus",
    "InferenceCapability",
    "LocalModel",
    "Manifest",
    "Message",
    "SLADefinition",
    "Skill",
    "StateSnapshot",
    "Task",
    "VerificationStatus",
]

DEFAULT_MANIFEST_TTL_SECONDS = 300
MAX_TASK_DEPTH = 10
SUPPORTED_AUTH_SCHEMES = frozenset({"bearer", "basic"})


class Skill(ASAPBaseModel):
    """One skill an agent offers, with optional JSON Schemas of its input and output."""

    id: str
    description: str
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None


class HardwareClass(StrEnum):
    CLOUD = "cloud"
    SBC = "sbc"
    EDGE_ACCELERATOR = "edge_accelerator"
    MICROCONTROLLER = "microcontroller"
    DESKTOP = "desktop"


class HardwareCapability(ASAPBaseModel):
    """Where an agent runs (spec 2.4, v2.4+)."""

    class_: HardwareClass = Field(alias="class")
    model: str | None = Field(default=None, max_length=100)
    io: list[str] = Field(default_factory=list)


class LocalModel(ASAPBaseModel):
    """A model served locally by an agent."""

    id: str
    quantization: str | None = None
    throughput_tokens_per_second: float | None = None


class InferenceCapability(ASAPBaseModel):
    """How an agent runs inference (spec 2.4, v2.4+)."""

    modes: list[str] = Field(default_factory=list)
    local_models: list[LocalModel] = Field(default_factory=list)


class Capability(ASAPBaseModel):
    """What an agent can do: its skills and protocol features."""

    asap_version: str = "0.1"
    skills: list[Skill] = Field(default_factory=list)
    state_persistence: bool = False
    streaming: bool = False
    mcp_tools: list[str] = Field(default_factory=list)
    hardware: HardwareCapability | None = None
    inference: InferenceCapability | None = None


class Endpoint(ASAPBaseModel):
    """Where to reach an agent: ``asap`` is the full URL of its POST endpoint."""

    asap: str
    events: str | None = None


class AuthScheme(ASAPBaseModel):
    """Authentication an agent requires; only ``bearer`` and ``basic`` parse (spec 2.4)."""

    schemes: list[str]
    oauth2: dict[str, Any] | None = None

    @field_validator("schemes")
    @classmethod
    def _known_schemes(cls, value: list[str]) -> list[str]:
        for scheme in value:
            if scheme.lower() not in SUPPORTED_AUTH_SCHEMES:
                raise ValueError(
                    f"Unsupported authentication scheme '{scheme}'. "
                    f"Supported schemes: {', '.join(sorted(SUPPORTED_AUTH_SCHEMES))}"
                )
        return value


class SLADefinition(ASAPBaseModel):
    """Service levels an agent advertises."""

    availability: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?%$")
    max_latency_p95_ms: int | None = Field(default=None, ge=0)
    max_error_rate: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?%$")
    support_hours: str | None = None


class VerificationStatus(ASAPBaseModel):
    """Marketplace verification of an agent."""

    status: str = Field(pattern=r"^(verified|pending|rejected)$")
    verified_at: UTCDateTime | None = None


class Manifest(ASAPBaseModel):
    """An agent's self-description, served at ``/.well-known/asap/manifest.json``."""

    id: str
    name: str
    version: str
    description: str
    capabilities: Capability
    endpoints: Endpoint
    supported_versions: list[str] = Field(default_factory=lambda: ["2.2"], min_length=1)
    auth: AuthScheme | None = None
    signature: str | None = None
    sla: SLADefinition | None = None
    verification: VerificationStatus | None = None
    ttl_seconds: int = Field(default=DEFAULT_MANIFEST_TTL_SECONDS, ge=1)

    @field_validator("id")
    @classmethod
    def _urn(cls, value: str) -> str:
        return validate_agent_urn(value)

    @field_validator("version")
    @classmethod
    def _pep440(cls, value: str) -> str:
        try:
            Version(value)
        except InvalidVersion as exc:
            raise ValueError(f"version must follow PEP 440, got: {value}") from exc
        return value


class HealthStatus(ASAPBaseModel):
    """Body of ``/.well-known/asap/health``; lenient: extra keys are ignored (spec 1.1)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: str
    agent_id: str
    version: str
    asap_version: str
    uptime_seconds: float
    load: dict[str, Any] | None = None


class Agent(ASAPBaseModel):
    """A registered agent."""

    id: str
    manifest_uri: str
    capabilities: list[str] = Field(min_length=1)

    @field_validator("id")
    @classmethod
    def _urn(cls, value: str) -> str:
        return validate_agent_urn(value)


class CommonMetadata(ASAPBaseModel):
    """Metadata of a conversation; unknown keys rejected."""

    purpose: str | None = None
    ttl_hours: int | None = Field(default=None, ge=1)
    source: str | None = None
    timestamp: UTCDateTime | None = None
    tags: list[str] | None = None


class Conversation(ASAPBaseModel):
    """A conversation between agents."""

    id: str
    participants: list[str] = Field(min_length=1)
    created_at: UTCDateTime = Field(default_factory=utc_now)
    metadata: CommonMetadata | None = None


class Task(ASAPBaseModel):
    """A unit of work and its lifecycle status (spec 2.3)."""

    id: str
    conversation_id: str
    parent_task_id: str | None = None
    status: TaskStatus
    depth: int = Field(default=0, ge=0, le=MAX_TASK_DEPTH)
    progress: dict[str, Any] | None = None
    created_at: UTCDateTime = Field(default_factory=utc_now)
    updated_at: UTCDateTime = Field(default_factory=utc_now)

    def is_terminal(self) -> bool:
        """True once the task is completed, failed or cancelled."""
        return self.status.is_terminal()

    def can_be_cancelled(self) -> bool:
        """Only submitted and working tasks can be cancelled (spec 2.3)."""
        return self.status in (TaskStatus.SUBMITTED, TaskStatus.WORKING)


class Message(ASAPBaseModel):
    """A message inside a task."""

    id: str
    task_id: str
    sender: str
    role: MessageRole
    parts: list[str]
    timestamp: UTCDateTime = Field(default_factory=utc_now)


class Artifact(ASAPBaseModel):
    """An output a task produced."""

    id: str
    task_id: str
    name: str | None = None
    parts: list[str]
    created_at: UTCDateTime = Field(default_factory=utc_now)


class StateSnapshot(ASAPBaseModel):
    """A versioned copy of a task's state (spec 2.4, spec 5)."""

    id: str
    task_id: str
    version: int = Field(ge=1)
    data: dict[str, Any]
    checkpoint: bool = False
    created_at: UTCDateTime = Field(default_factory=utc_now)

"""Typed payloads of spec 2.1, one class per ``payload_type``.

``PAYLOAD_MODELS`` maps the *normalized* payload type (spec 1.4: lowercased, every character
that is not a letter or digit dropped) to its model, so ``task.request``, ``TaskRequest`` and
``task_request`` all select :class:`TaskRequest`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from asap.models.base import ASAPBaseModel
from asap.models.enums import AckStatus, MessageRole, TaskStatus, UpdateType

__all__ = [
    "ArtifactNotify",
    "CORRELATED_PAYLOAD_TYPES",
    "McpResourceData",
    "McpResourceFetch",
    "McpToolCall",
    "McpToolResult",
    "MessageAck",
    "MessageSend",
    "PAYLOAD_MODELS",
    "StateQuery",
    "StateRestore",
    "TaskCancel",
    "TaskMetrics",
    "TaskRequest",
    "TaskRequestConfig",
    "TaskResponse",
    "TaskStream",
    "TaskUpdate",
    "normalize_payload_type",
]


_NOT_ALNUM_ASCII = bytes(
    c for c in range(128) if not (ord("a") <= c <= ord("z") or ord("0") <= c <= ord("9"))
)
_CACHED_LENGTH = 64
"""Longest payload type whose normalized form is cached. The cache is keyed by what callers
send: were its keys unbounded, each request could pin a payload type of up to the request
size limit in memory (1024 of them)."""


def normalize_payload_type(payload_type: str) -> str:
    """Normalize a payload type for matching (spec 1.4): ``Task.Request`` -> ``taskrequest``."""
    if len(payload_type) <= _CACHED_LENGTH:
        return _normalize_cached(payload_type)
    return _normalize(payload_type)


@lru_cache(maxsize=1024)
def _normalize_cached(payload_type: str) -> str:
    return _normalize(payload_type)


def _normalize(payload_type: str) -> str:
    # Lowercase, then keep ASCII letters and digits: what ``[^a-z0-9]`` removal keeps, in
    # linear C time however many characters go (a long type may be sent on purpose).
    ascii_only = payload_type.lower().encode("ascii", "ignore")
    return ascii_only.translate(None, _NOT_ALNUM_ASCII).decode("ascii")


class TaskRequestConfig(ASAPBaseModel):
    """Options of a task request; unknown keys are rejected (spec 2.1)."""

    timeout_seconds: int | None = Field(default=None, ge=1)
    priority: str | None = None
    idempotency_key: str | None = None
    streaming: bool | None = None
    persist_state: bool | None = None
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)


class TaskMetrics(ASAPBaseModel):
    """Execution metrics; the one payload part that accepts extra keys (spec 1.1)."""

    model_config = ConfigDict(extra="allow")

    duration_ms: int | None = Field(default=None, ge=0)
    tokens_in: int | None = Field(default=None, ge=0)
    tokens_out: int | None = Field(default=None, ge=0)
    tokens_used: int | None = Field(default=None, ge=0)
    api_calls: int | None = Field(default=None, ge=0)


class TaskRequest(ASAPBaseModel):
    """Ask an agent to run one skill (``task.request``)."""

    conversation_id: str
    parent_task_id: str | None = None
    skill_id: str
    input: dict[str, Any]
    config: TaskRequestConfig | None = None


class TaskResponse(ASAPBaseModel):
    """The outcome of a task (``task.response``); needs an envelope ``correlation_id``."""

    task_id: str
    status: TaskStatus
    result: dict[str, Any] | None = None
    final_state: dict[str, Any] | None = None
    metrics: TaskMetrics | None = None


class TaskStream(ASAPBaseModel):
    """One chunk of a streamed task (``TaskStream``, spec 3.8)."""

    chunk: str = ""
    progress: float | None = Field(default=None, ge=0, le=1)
    final: bool = False
    status: TaskStatus | None = None


class TaskUpdate(ASAPBaseModel):
    """Progress or status news about a running task (``task.update``)."""

    task_id: str
    update_type: UpdateType
    status: TaskStatus
    progress: dict[str, Any] | None = None
    input_request: dict[str, Any] | None = None

    @field_validator("progress")
    @classmethod
    def _percent_in_range(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and "percent" in value:
            percent = value["percent"]
            if isinstance(percent, bool) or not isinstance(percent, int | float):
                raise ValueError("progress.percent must be a number")
            if not 0 <= percent <= 100:
                raise ValueError("progress.percent must be between 0 and 100")
        return value


class TaskCancel(ASAPBaseModel):
    """Ask an agent to cancel a task (``task.cancel``)."""

    task_id: str
    reason: str | None = None


class MessageSend(ASAPBaseModel):
    """A conversational message made of part ids (``message.send``)."""

    task_id: str
    message_id: str
    sender: str
    role: MessageRole
    parts: list[str]


class StateQuery(ASAPBaseModel):
    """Ask for a task's state, optionally a given snapshot version (``state.query``)."""

    task_id: str
    version: int | None = None


class StateRestore(ASAPBaseModel):
    """Restore a task from a snapshot (``state.restore``)."""

    task_id: str
    snapshot_id: str


class ArtifactNotify(ASAPBaseModel):
    """Announce an artifact produced by a task (``artifact.notify``)."""

    artifact_id: str
    task_id: str
    name: str | None = None


class McpToolCall(ASAPBaseModel):
    """Call an MCP tool (``mcp.tool_call``)."""

    request_id: str
    tool_name: str
    arguments: dict[str, Any]
    mcp_context: dict[str, Any] | None = None


class McpToolResult(ASAPBaseModel):
    """Result of an MCP tool call; exactly one of result and error (``mcp.tool_result``)."""

    request_id: str
    success: bool
    result: dict[str, Any] | None = None
    error: str | None = None

    @model_validator(mode="after")
    def _result_xor_error(self) -> McpToolResult:
        if self.success and (self.result is None or self.error is not None):
            raise ValueError("a successful tool result needs result and no error")
        if not self.success and (self.error is None or self.result is not None):
            raise ValueError("a failed tool result needs error and no result")
        return self


class McpResourceFetch(ASAPBaseModel):
    """Fetch an MCP resource (``mcp.resource_fetch``)."""

    resource_uri: str


class McpResourceData(ASAPBaseModel):
    """Content of an MCP resource (``mcp.resource_data``)."""

    resource_uri: str
    content: dict[str, Any]


class MessageAck(ASAPBaseModel):
    """Acknowledge an envelope (``MessageAck``)."""

    original_envelope_id: str
    status: AckStatus
    error: str | None = None


PAYLOAD_MODELS: dict[str, type[ASAPBaseModel]] = {
    "taskrequest": TaskRequest,
    "taskstream": TaskStream,
    "taskresponse": TaskResponse,
    "taskupdate": TaskUpdate,
    "taskcancel": TaskCancel,
    "messagesend": MessageSend,
    "statequery": StateQuery,
    "staterestore": StateRestore,
    "artifactnotify": ArtifactNotify,
    "mcptoolcall": McpToolCall,
    "mcptoolresult": McpToolResult,
    "mcpresourcefetch": McpResourceFetch,
    "mcpresourcedata": McpResourceData,
    "messageack": MessageAck,
}
"""Normalized payload type -> model (the 14 keys of spec 1.4)."""

CORRELATED_PAYLOAD_TYPES: frozenset[str] = frozenset(
    {"taskresponse", "taskstream", "mcptoolresult", "mcpresourcedata"}
)
"""Normalized payload types that must carry a ``correlation_id`` (spec 1.2)."""

"""Every error the framework raises, rooted at :class:`ASAPError`.

Each error knows its JSON-RPC code and, for ASAP errors, its taxonomy URI (spec 3.6)::

    ASAPError
    ├── JsonRpcError                      standard JSON-RPC replies (spec 3.5)
    │   ├── ParseError                    -32700
    │   ├── InvalidRequestError           -32600
    │   ├── MethodNotFoundError           -32601
    │   ├── InvalidParamsError            -32602
    │   ├── InternalError                 -32603
    │   └── VersionIncompatibleError      -32000  (ASAP-Version header, spec 3.9)
    ├── HTTPError                         non-JSON-RPC replies: 400, 413, 415 (spec 3.11)
    ├── InvalidTransitionError            -32000  asap:protocol/invalid_state
    ├── MalformedEnvelopeError            -32001  asap:protocol/malformed_envelope
    │   └── ProtocolCorrelationError      -32001  reply not bound to its request
    ├── InvalidTimestampError             -32002  asap:protocol/invalid_timestamp (recoverable)
    ├── InvalidNonceError                 -32003  asap:protocol/invalid_nonce
    ├── TaskNotFoundError                 -32010  asap:task/not_found
    ├── CircuitOpenError                  -32011  asap:transport/circuit_open (recoverable)
    ├── HandlerNotFoundError              -32012  asap:transport/handler_not_found
    ├── SkillNotFoundError                -32013  asap:routing/skill_not_found (ours)
    ├── UnsupportedAuthSchemeError        -32020  asap:auth/unsupported_scheme
    ├── TaskAlreadyCompletedError         -32030  asap:task/already_completed
    ├── ThreadPoolExhaustedError          -32031  asap:transport/thread_pool_exhausted
    ├── ASAPConnectionError               -32032  asap:transport/connection_error (recoverable)
    │   └── ASAPTimeoutError              -32033  asap:transport/timeout (recoverable)
    ├── RemoteRPCError                    -32034  an error reply from a remote agent
    ├── TaskFailedError                   a skill fails its task, with data
    └── ConfigurationError                start-up misconfiguration, never on the wire

``SkillNotFoundError`` is our addition: the reference silently runs echo for any ``skill_id``.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ASAPConnectionError",
    "ASAPError",
    "ASAPRemoteError",
    "ASAPTimeoutError",
    "CircuitOpenError",
    "ConfigurationError",
    "HTTPError",
    "HandlerNotFoundError",
    "InternalError",
    "InvalidNonceError",
    "InvalidParamsError",
    "InvalidRequestError",
    "InvalidTimestampError",
    "InvalidTransitionError",
    "JsonRpcError",
    "MalformedEnvelopeError",
    "MethodNotFoundError",
    "ParseError",
    "ProtocolCorrelationError",
    "RemoteRPCError",
    "SkillNotFoundError",
    "TaskAlreadyCompletedError",
    "TaskFailedError",
    "TaskNotFoundError",
    "ThreadPoolExhaustedError",
    "UnsupportedAuthSchemeError",
    "VersionIncompatibleError",
]


class ASAPError(Exception):
    """Root of every framework error.

    ``code`` is the taxonomy URI, ``rpc_code`` the JSON-RPC code, ``details`` a JSON object,
    ``recoverable`` whether the same request may succeed later. Recovery hints
    (``retry_after_ms``, ``fallback_action``, ``alternative_agents``) go on the wire when set.
    """

    code: ClassVar[str] = "asap:error/unknown"
    rpc_code: ClassVar[int] = -32603
    recoverable: bool = False
    retry_after_ms: int | None = None
    fallback_action: str | None = None
    context: str | None = None
    """The ``data.error`` string the server adds to the reply (spec 3.5)."""

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after_ms: int | None = None,
        fallback_action: str | None = None,
        alternative_agents: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if retry_after_ms is not None:
            self.retry_after_ms = retry_after_ms
        if fallback_action is not None:
            self.fallback_action = fallback_action
        self.alternative_agents = alternative_agents

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, rpc_code={self.rpc_code})"

    @property
    def is_recoverable(self) -> bool:
        """Alias of ``recoverable`` under the reference's name."""
        return self.recoverable

    def to_dict(self) -> dict[str, Any]:
        """The ``error.data`` object of spec 3.5, keys in the reference's order."""
        data: dict[str, Any] = {
            "code": self.code,
            "rpc_code": self.rpc_code,
            "message": self.message,
            "details": self.details,
        }
        if self.retry_after_ms is not None:
            data["retry_after_ms"] = self.retry_after_ms
        if self.alternative_agents is not None:
            data["alternative_agents"] = self.alternative_agents
        if self.fallback_action is not None:
            data["fallback_action"] = self.fallback_action
        data["recoverable"] = self.recoverable
        data["asap_taxonomy_code"] = self.code
        data["error"] = self.context or self.message
        return data

    def to_rpc_error(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member for this error."""
        return {"code": self.rpc_code, "message": self.message, "data": self.to_dict()}


class JsonRpcError(ASAPError):
    """A standard JSON-RPC error: generic message, free-form ``data`` (spec 3.5)."""

    generic_message: ClassVar[str] = "Internal error"

    def __init__(self, data: Any = None, *, message: str | None = None) -> None:
        super().__init__(message or self.generic_message)
        self.data = data

    def to_rpc_error(self) -> dict[str, Any]:
        return {"code": self.rpc_code, "message": self.generic_message, "data": self.data}


class ParseError(JsonRpcError):
    """The body is not valid UTF-8 JSON."""

    rpc_code = -32700
    generic_message = "Parse error"


class InvalidRequestError(JsonRpcError):
    """The body is JSON but not a valid JSON-RPC request."""

    rpc_code = -32600
    generic_message = "Invalid request"


class MethodNotFoundError(JsonRpcError):
    """The method is not ``asap.send``."""

    rpc_code = -32601
    generic_message = "Method not found"


class InvalidParamsError(JsonRpcError):
    """The params, the envelope or a skill's input failed validation."""

    rpc_code = -32602
    generic_message = "Invalid params"


class InternalError(JsonRpcError):
    """An unexpected failure; details stay in the server log."""

    rpc_code = -32603
    generic_message = "Internal error"


class VersionIncompatibleError(JsonRpcError):
    """No transport version in the ``ASAP-Version`` header is supported (spec 3.9)."""

    rpc_code = -32000
    generic_message = "ASAP protocol version incompatible"


class HTTPError(ASAPError):
    """A reply that is not JSON-RPC: ``{"detail": ...}`` with an HTTP status (spec 3.11)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class InvalidTransitionError(ASAPError):
    """A task status change that spec 2.3 does not allow."""

    code = "asap:protocol/invalid_state"
    rpc_code = -32000

    def __init__(self, from_state: str, to_state: str, task_id: str | None = None) -> None:
        super().__init__(
            f"Invalid transition from '{from_state}' to '{to_state}'",
            {"from_state": from_state, "to_state": to_state, "task_id": task_id},
        )


class MalformedEnvelopeError(ASAPError):
    """An envelope that cannot be used."""

    code = "asap:protocol/malformed_envelope"
    rpc_code = -32001


class ProtocolCorrelationError(MalformedEnvelopeError):
    """A reply whose ``correlation_id`` is not the request envelope id (spec 4.2)."""

    def __init__(self, expected: str, got: str | None) -> None:
        super().__init__(
            f"correlation_id mismatch: expected '{expected}', got '{got}'",
            {"expected": expected, "got": got},
        )


class InvalidTimestampError(ASAPError):
    """An envelope outside the replay window (spec 3.13)."""

    code = "asap:protocol/invalid_timestamp"
    rpc_code = -32002
    recoverable = True
    retry_after_ms = 5000
    fallback_action = "resend_with_fresh_timestamp"
    context = "Invalid envelope timestamp"


class InvalidNonceError(ASAPError):
    """A nonce that is empty or was already used (spec 3.13)."""

    code = "asap:protocol/invalid_nonce"
    rpc_code = -32003
    context = "Invalid envelope nonce"


class TaskNotFoundError(ASAPError):
    """No task with that id."""

    code = "asap:task/not_found"
    rpc_code = -32010

    def __init__(self, task_id: str) -> None:
        super().__init__(f"Task not found: {task_id}", {"task_id": task_id})


class CircuitOpenError(ASAPError):
    """The circuit breaker for a target is open; nothing was sent."""

    code = "asap:transport/circuit_open"
    rpc_code = -32011
    recoverable = True
    retry_after_ms = 5000
    fallback_action = "retry_later_or_failover"


class HandlerNotFoundError(ASAPError):
    """No handler for this payload type (spec 3.6)."""

    code = "asap:transport/handler_not_found"
    rpc_code = -32012

    def __init__(self, payload_type: str, *, streaming: bool = False) -> None:
        kind = "streaming handler" if streaming else "handler"
        if len(payload_type) > 128:  # a caller's text: not echoed (and logged) at any length
            payload_type = payload_type[:128] + "…"
        super().__init__(
            f"No handler registered for payload type: {payload_type}",
            {"payload_type": payload_type},
        )
        self.context = (
            f"No {kind} registered for payload type"
            if streaming
            else f"No handler registered for payload type: {payload_type}"
        )


class SkillNotFoundError(ASAPError):
    """A ``task.request`` names a skill this agent does not have (our addition to spec 3.6)."""

    code = "asap:routing/skill_not_found"
    rpc_code = -32013

    def __init__(self, skill_id: str, available: list[str]) -> None:
        super().__init__(
            f"Unknown skill: {skill_id}",
            {"skill_id": skill_id, "available_skills": available},
        )


class UnsupportedAuthSchemeError(ASAPError):
    """A manifest names an authentication scheme other than bearer or basic."""

    code = "asap:auth/unsupported_scheme"
    rpc_code = -32020


class TaskAlreadyCompletedError(ASAPError):
    """The task is already in a terminal status."""

    code = "asap:task/already_completed"
    rpc_code = -32030

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(
            f"Task already completed: {task_id} (status: {status})",
            {"task_id": task_id, "status": status},
        )


class ThreadPoolExhaustedError(ASAPError):
    """The agent is at its limit of concurrent work; try again shortly."""

    code = "asap:transport/thread_pool_exhausted"
    rpc_code = -32031
    recoverable = True
    retry_after_ms = 1000
    fallback_action = "retry_later"


class ASAPConnectionError(ASAPError):
    """The remote agent could not be reached or answered at the HTTP level with an error."""

    code = "asap:transport/connection_error"
    rpc_code = -32032
    recoverable = True
    fallback_action = "retry_or_check_connectivity"


class ASAPTimeoutError(ASAPConnectionError):
    """The remote agent did not answer in time."""

    code = "asap:transport/timeout"
    rpc_code = -32033
    fallback_action = "retry_with_backoff"


class RemoteRPCError(ASAPError):
    """A JSON-RPC error reply from a remote agent.

    ``json_rpc_code`` is the code on the wire. ``rpc_code`` is that code when it is in the ASAP
    band (-32059..-32000) and -32034 otherwise, as in the reference client. ``code`` is the
    remote taxonomy URI when it sent one, ``data`` the raw ``error.data``, and ``recoverable``
    what the remote said (``data.recoverable``).
    """

    code = "asap:rpc/remote_error"
    rpc_code = -32034

    def __init__(self, json_rpc_code: int, message: str, data: Any = None) -> None:
        details = data.get("details", {}) if isinstance(data, dict) else {}
        super().__init__(message, details if isinstance(details, dict) else {})
        self.json_rpc_code = json_rpc_code
        if -32059 <= json_rpc_code <= -32000:
            self.rpc_code = json_rpc_code  # type: ignore[misc]
        self.data = data
        if isinstance(data, dict):
            taxonomy = data.get("asap_taxonomy_code") or data.get("code")
            if isinstance(taxonomy, str) and taxonomy.startswith("asap:"):
                self.code = taxonomy  # type: ignore[misc]
            self.recoverable = data.get("recoverable") is True
            if isinstance(data.get("retry_after_ms"), int):
                self.retry_after_ms = data["retry_after_ms"]

    def __str__(self) -> str:
        return f"Remote error {self.json_rpc_code}: {self.message}"


ASAPRemoteError = RemoteRPCError


class TaskFailedError(ASAPError):
    """Raised by a skill to fail its task and still return data.

    The reply's ``result`` is ``{"error": {...}, **result}``: the error plus what the skill
    wants the caller to see (an orchestration returns its partial state this way).
    """

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


class ConfigurationError(ASAPError):
    """The agent is misconfigured (duplicate skill id, bad setting); raised at start-up."""

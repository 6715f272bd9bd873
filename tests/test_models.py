"""Unit tests of the protocol models, the task state machine and the error classes.

Pure and fast: no I/O except reading one golden capture from ``shared/protocol/wire``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

import asap.errors as errors_module
from asap.errors import (
    ASAPConnectionError,
    ASAPError,
    ASAPTimeoutError,
    CircuitOpenError,
    HandlerNotFoundError,
    InternalError,
    InvalidNonceError,
    InvalidParamsError,
    InvalidRequestError,
    InvalidTimestampError,
    InvalidTransitionError,
    MalformedEnvelopeError,
    MethodNotFoundError,
    ParseError,
    ProtocolCorrelationError,
    RemoteRPCError,
    SkillNotFoundError,
    TaskAlreadyCompletedError,
    TaskNotFoundError,
    ThreadPoolExhaustedError,
    UnsupportedAuthSchemeError,
    VersionIncompatibleError,
)
from asap.models.base import ASAPBaseModel
from asap.models.entities import HealthStatus, Manifest, StateSnapshot, Task
from asap.models.enums import TaskStatus
from asap.models.envelope import Envelope, validate_agent_urn
from asap.models.payloads import (
    McpToolResult,
    TaskCancel,
    TaskMetrics,
    TaskRequest,
    TaskRequestConfig,
    TaskStream,
    TaskUpdate,
)
from asap.state.machine import can_transition, transition
from tests.conftest import SHARED

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")  # Crockford base32, no I L O U
WIRE_ORDER = [
    "id",
    "asap_version",
    "timestamp",
    "sender",
    "recipient",
    "payload_type",
    "payload",
    "correlation_id",
    "trace_id",
    "requires_ack",
    "extensions",
]
GOLDEN_SEND = SHARED / "protocol" / "wire" / "golden-client-POST-asap-send-task-request.json"


def task_request_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"conversation_id": "c1", "skill_id": "echo", "input": {"m": "hi"}}
    payload.update(overrides)
    return payload


def envelope_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "asap_version": "0.1",
        "sender": "urn:asap:agent:client",
        "recipient": "urn:asap:agent:server",
        "payload_type": "task.request",
        "payload": task_request_payload(),
    }
    data.update(overrides)
    return data


def error_types(exc: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    return [(tuple(error["loc"]), error["type"]) for error in exc.errors()]


# -- envelope defaults (spec 1.2) ------------------------------------------------------------


@pytest.mark.parametrize("how", ["absent", "null"])
def test_envelope_id_is_a_generated_ulid_when_absent_or_null(how: str) -> None:
    """spec 1.2: a missing or null id becomes a 26-char Crockford base32 ULID."""
    data = envelope_data() if how == "absent" else envelope_data(id=None)
    first = Envelope.model_validate(data)
    second = Envelope.model_validate(data)
    assert ULID_RE.match(first.id), first.id
    assert first.id != second.id


def test_generated_ids_are_ulids_that_sort_by_time_and_do_not_repeat() -> None:
    """Our own encoder (8x faster than the library's) against python-ulid's decoder."""
    import time

    from ulid import ULID

    from asap.models.ids import generate_id

    now_ms = time.time() * 1000
    ids = [generate_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:500]:
        parsed = ULID.from_str(value)
        assert str(parsed) == value
        assert abs(parsed.milliseconds - now_ms) < 5_000
    time.sleep(0.002)  # the next millisecond
    assert generate_id() > max(ids)
    # every random character is used: 80 random bits, not fewer
    assert set("".join(i[10:] for i in ids)) == set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_envelope_keeps_any_given_id() -> None:
    """spec 1.2: any string id is accepted (the load tests send UUID4s)."""
    uuid = "0b8f6a49-63c1-4c39-9c0e-0d1b0b4b2b7e"
    assert Envelope.model_validate(envelope_data(id=uuid)).id == uuid


@pytest.mark.parametrize("how", ["absent", "null"])
def test_envelope_timestamp_defaults_to_aware_utc_now(how: str) -> None:
    """spec 1.2: a missing or null timestamp is set to now, in UTC."""
    data = envelope_data() if how == "absent" else envelope_data(timestamp=None)
    before = datetime.now(UTC)
    envelope = Envelope.model_validate(data)
    after = datetime.now(UTC)
    assert envelope.timestamp.tzinfo is not None
    assert envelope.timestamp.utcoffset() == timedelta(0)
    assert before <= envelope.timestamp <= after


def test_envelope_other_defaults() -> None:
    """spec 1.2: correlation_id, trace_id, extensions null; requires_ack false."""
    envelope = Envelope.model_validate(envelope_data())
    assert envelope.correlation_id is None
    assert envelope.trace_id is None
    assert envelope.requires_ack is False
    assert envelope.extensions is None


# -- serialization (spec 1.2, 1.5) ------------------------------------------------------------


def test_envelope_serializes_every_field_in_wire_order() -> None:
    """spec 1.2/1.5: every field is written, nulls included, in the reference's key order."""
    envelope = Envelope.model_validate(
        envelope_data(id="01M8H2EZA2QWV1SE4SPBXF8XWQ", timestamp="2026-11-28T12:35:43.042059Z")
    )
    dumped = envelope.model_dump(mode="json")
    assert list(dumped) == WIRE_ORDER
    assert dumped == {
        "id": "01M8H2EZA2QWV1SE4SPBXF8XWQ",
        "asap_version": "0.1",
        "timestamp": "2026-11-28T12:35:43.042059Z",
        "sender": "urn:asap:agent:client",
        "recipient": "urn:asap:agent:server",
        "payload_type": "task.request",
        "payload": {
            "conversation_id": "c1",
            "parent_task_id": None,
            "skill_id": "echo",
            "input": {"m": "hi"},
            "config": None,
        },
        "correlation_id": None,
        "trace_id": None,
        "requires_ack": False,
        "extensions": None,
    }
    assert list(dumped["payload"]) == [
        "conversation_id",
        "parent_task_id",
        "skill_id",
        "input",
        "config",
    ]
    assert envelope.to_wire() == dumped


@pytest.mark.parametrize(
    ("given", "written"),
    [
        (datetime(2026, 1, 1, tzinfo=UTC), "2026-01-01T00:00:00Z"),
        (datetime(2026, 11, 28, 12, 35, 20, 765674, tzinfo=UTC), "2026-11-28T12:35:20.765674Z"),
        (datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC), "2026-01-01T00:00:00.500000Z"),
        (datetime(2026, 1, 1, 12, 0), "2026-01-01T12:00:00Z"),  # naive counts as UTC
        ("2026-01-01T12:00:00", "2026-01-01T12:00:00Z"),
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00Z"),
        ("2026-01-01T10:00:00+05:00", "2026-01-01T10:00:00+05:00"),
        (
            datetime(2026, 1, 1, 10, tzinfo=timezone(timedelta(hours=5))),
            "2026-01-01T10:00:00+05:00",
        ),
        (1767225600, "2026-01-01T00:00:00Z"),  # an integer is epoch seconds
    ],
)
def test_envelope_timestamp_format(given: Any, written: str) -> None:
    """spec 1.2: UTC gets Z and microseconds (dropped when zero); offsets are kept."""
    envelope = Envelope.model_validate(envelope_data(timestamp=given))
    assert envelope.model_dump(mode="json")["timestamp"] == written


def test_integer_timestamp_is_epoch_seconds_in_utc() -> None:
    """spec 1.2: an integer timestamp is read as epoch seconds."""
    envelope = Envelope.model_validate(envelope_data(timestamp=1767225600))
    assert envelope.timestamp == datetime(2026, 1, 1, tzinfo=UTC)


def _golden_send() -> dict[str, Any]:
    if not GOLDEN_SEND.exists():
        reason = f"golden capture missing: {GOLDEN_SEND} (shared/protocol not checked out)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return json.loads(GOLDEN_SEND.read_text())


def test_golden_request_envelope_round_trips() -> None:
    """spec 1.5: the reference client's request envelope survives parse + dump unchanged."""
    capture = _golden_send()
    wire = capture["request"]["body_json"]["params"]["envelope"]
    dumped = Envelope.model_validate(wire).model_dump(mode="json")
    assert dumped == wire
    assert list(dumped) == list(wire) == WIRE_ORDER
    # the Python client writes json.dumps default separators: same bytes as captured
    assert '"envelope": ' + json.dumps(dumped) + ", " in capture["request"]["body_raw"]


def test_golden_response_envelope_round_trips_byte_for_byte() -> None:
    """spec 3.4: the reference server's reply envelope round-trips to the same compact bytes."""
    capture = _golden_send()
    wire = capture["response"]["body_json"]["result"]["envelope"]
    envelope = Envelope.model_validate(wire)
    assert isinstance(envelope.payload, ASAPBaseModel)
    dumped = envelope.model_dump(mode="json")
    assert dumped == wire
    compact = b'{"envelope":' + orjson.dumps(dumped) + b"}"
    assert compact in capture["response"]["body_raw"].encode()


# -- strictness (spec 1.1) -----------------------------------------------------------------------


def test_unknown_envelope_key_is_rejected() -> None:
    """spec 1.1: extra keys are forbidden on the envelope."""
    with pytest.raises(ValidationError) as caught:
        Envelope.model_validate(envelope_data(foo=1))
    assert error_types(caught.value) == [(("foo",), "extra_forbidden")]


def test_unknown_task_request_key_is_rejected_under_payload() -> None:
    """spec 1.1: extra keys are forbidden in a typed payload; located under payload."""
    with pytest.raises(ValidationError) as caught:
        Envelope.model_validate(envelope_data(payload=task_request_payload(zzz=1)))
    assert error_types(caught.value) == [(("payload", "zzz"), "extra_forbidden")]


def test_unknown_config_key_is_rejected() -> None:
    """spec 2.1: TaskRequestConfig is strict (since v2.5.2)."""
    with pytest.raises(ValidationError) as caught:
        Envelope.model_validate(envelope_data(payload=task_request_payload(config={"foo": 1})))
    assert error_types(caught.value) == [(("payload", "config", "foo"), "extra_forbidden")]
    with pytest.raises(ValidationError) as caught:
        TaskRequestConfig.model_validate({"foo": 1})
    assert error_types(caught.value) == [(("foo",), "extra_forbidden")]


def test_task_metrics_accepts_extra_keys() -> None:
    """spec 1.1: TaskMetrics is the exception that accepts extra keys."""
    metrics = TaskMetrics.model_validate({"duration_ms": 3, "gpu": "a100"})
    assert metrics.model_dump(mode="json")["gpu"] == "a100"
    envelope = Envelope.model_validate(
        envelope_data(
            payload_type="task.response",
            correlation_id="req-1",
            payload={"task_id": "t1", "status": "completed", "metrics": {"tokens_in": 1, "x": 2}},
        )
    )
    assert envelope.payload_dict["metrics"]["x"] == 2


def test_health_status_ignores_extra_keys() -> None:
    """spec 1.1: HealthStatus is lenient: unknown keys are dropped, not rejected."""
    health = HealthStatus.model_validate(
        {
            "status": "healthy",
            "agent_id": "urn:asap:agent:a",
            "version": "1.0.0",
            "asap_version": "0.1",
            "uptime_seconds": 1.5,
            "load": None,
            "surprise": True,
        }
    )
    assert "surprise" not in health.model_dump()
    assert health.status == "healthy"


def test_models_are_frozen() -> None:
    """spec 1.1: models are frozen."""
    envelope = Envelope.model_validate(envelope_data())
    with pytest.raises(ValidationError) as caught:
        envelope.sender = "urn:asap:agent:other"  # type: ignore[misc]
    assert caught.value.errors()[0]["type"] == "frozen_instance"
    request = TaskRequest.model_validate(task_request_payload())
    with pytest.raises(ValidationError):
        request.skill_id = "other"  # type: ignore[misc]


# -- agent URN (spec 1.3) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "urn",
    [
        "urn:asap:agent:echo-agent",
        "urn:asap:agent:a:b",
        "urn:asap:agent:0",
        "urn:asap:agent:a-1:b-2",
    ],
)
def test_valid_agent_urns(urn: str) -> None:
    """spec 1.3: lowercase letters, digits and dashes, with at most one extra segment."""
    assert validate_agent_urn(urn) == urn
    assert Envelope.model_validate(envelope_data(sender=urn, recipient=urn)).sender == urn


@pytest.mark.parametrize(
    "urn",
    [
        "urn:asap:agent:Echo",
        "urn:asap:agent:my_agent",
        "urn:asap:agent:a:b:c",
        "urn:asap:agent:",
        "urn:asap:agent:a:",
        "URN:asap:agent:a",
        "urn:asap:agents:a",
        "echo-agent",
        "",
    ],
)
def test_invalid_agent_urns_get_the_exact_message(urn: str) -> None:
    """spec 1.3: the failure message is exact."""
    message = f"Agent ID must follow URN format 'urn:asap:agent:{{name}}', got: {urn}"
    with pytest.raises(ValueError) as caught:
        validate_agent_urn(urn)
    assert str(caught.value) == message
    for field in ("sender", "recipient"):
        with pytest.raises(ValidationError) as invalid:
            Envelope.model_validate(envelope_data(**{field: urn}))
        (error,) = invalid.value.errors()
        assert error["loc"] == (field,)
        assert error["msg"] == "Value error, " + message


def test_agent_urn_length_limit() -> None:
    """spec 1.3: at most 256 characters, with its own message."""
    prefix = "urn:asap:agent:"
    assert validate_agent_urn(prefix + "a" * (256 - len(prefix)))
    too_long = prefix + "a" * (257 - len(prefix))
    assert len(too_long) == 257
    with pytest.raises(ValueError) as caught:
        validate_agent_urn(too_long)
    assert str(caught.value) == "Agent URN must be at most 256 characters, got 257"


# -- correlation rule (spec 1.2) ---------------------------------------------------------------

CORRELATED = {
    "task.response": {"task_id": "t1", "status": "completed"},
    "TaskStream": {"chunk": "x"},
    "mcp.tool_result": {"request_id": "r1", "success": True, "result": {}},
    "mcp.resource_data": {"resource_uri": "res://x", "content": {}},
}


@pytest.mark.parametrize("payload_type", sorted(CORRELATED))
@pytest.mark.parametrize("correlation_id", ["absent", None, ""])
def test_response_payloads_need_a_correlation_id(payload_type: str, correlation_id: Any) -> None:
    """spec 1.2: response-like payloads without a (non-empty) correlation_id are invalid."""
    data = envelope_data(payload_type=payload_type, payload=CORRELATED[payload_type])
    if correlation_id != "absent":
        data["correlation_id"] = correlation_id
    with pytest.raises(ValidationError) as caught:
        Envelope.model_validate(data)
    (error,) = caught.value.errors()
    assert error["loc"] == ()
    assert error["msg"] == (
        f"Value error, {payload_type} must have correlation_id for request tracking"
    )


@pytest.mark.parametrize("payload_type", sorted(CORRELATED))
def test_response_payloads_with_correlation_id_pass(payload_type: str) -> None:
    """spec 1.2: with a correlation_id the same envelopes are valid."""
    data = envelope_data(
        payload_type=payload_type, payload=CORRELATED[payload_type], correlation_id="E1"
    )
    assert Envelope.model_validate(data).correlation_id == "E1"


def test_task_request_needs_no_correlation_id() -> None:
    """spec 1.2: only response-like payloads need one."""
    assert Envelope.model_validate(envelope_data()).correlation_id is None


# -- payload typing (spec 1.4) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload_type", ["task.request", "TaskRequest", "task_request", "task-request", "Task.Request"]
)
def test_payload_typed_by_normalized_payload_type(payload_type: str) -> None:
    """spec 1.4: every spelling normalizes to taskrequest and gives a TaskRequest."""
    envelope = Envelope.model_validate(envelope_data(payload_type=payload_type))
    assert isinstance(envelope.payload, TaskRequest)
    assert envelope.payload.skill_id == "echo"
    assert envelope.payload_type == payload_type  # kept as sent
    assert envelope.payload_key == "taskrequest"


def test_unknown_payload_type_keeps_a_plain_dict() -> None:
    """spec 1.4: an unknown PT leaves the payload free-form (extra keys allowed)."""
    payload = {"anything": [1, 2], "nested": {"x": None}}
    envelope = Envelope.model_validate(envelope_data(payload_type="foo.bar", payload=payload))
    assert type(envelope.payload) is dict
    assert envelope.payload == payload
    assert envelope.payload_dict == payload
    assert envelope.model_dump(mode="json")["payload"] == payload


@pytest.mark.parametrize("payload", [[], "x", 1, None, True])
def test_known_payload_type_with_non_object_payload_fails_at_payload(payload: Any) -> None:
    """spec 1.2: payload must be an object; the error is located at ["payload"]."""
    with pytest.raises(ValidationError) as caught:
        Envelope.model_validate(envelope_data(payload=payload))
    assert [tuple(error["loc"]) for error in caught.value.errors()] == [("payload",)]


def test_payload_errors_are_located_under_payload() -> None:
    """spec 1.4: errors in a typed payload keep the "payload" prefix in their location."""
    with pytest.raises(ValidationError) as caught:
        Envelope.model_validate(envelope_data(payload={"conversation_id": "c", "input": {}}))
    assert error_types(caught.value) == [(("payload", "skill_id"), "missing")]
    with pytest.raises(ValidationError) as caught:
        Envelope.model_validate(envelope_data(payload=task_request_payload(input=[1])))
    assert error_types(caught.value) == [(("payload", "input"), "dict_type")]


def test_payload_dict_is_a_dict_for_typed_and_untyped_payloads() -> None:
    """spec 1.4: payload_dict gives the JSON-ready dict in both cases."""
    typed = Envelope.model_validate(envelope_data())
    assert typed.payload_dict == {
        "conversation_id": "c1",
        "parent_task_id": None,
        "skill_id": "echo",
        "input": {"m": "hi"},
        "config": None,
    }
    untyped = Envelope.model_validate(envelope_data(payload_type="custom", payload={"a": 1}))
    assert untyped.payload_dict == {"a": 1}
    assert isinstance(typed.payload_dict, dict) and isinstance(untyped.payload_dict, dict)


# -- payload rules (spec 2.1) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "valid"),
    [
        ({"success": True, "result": {"v": 1}}, True),
        ({"success": True, "result": {}}, True),
        ({"success": False, "error": "boom"}, True),
        ({"success": True}, False),
        ({"success": True, "result": {"v": 1}, "error": "boom"}, False),
        ({"success": True, "error": "boom"}, False),
        ({"success": False}, False),
        ({"success": False, "error": "boom", "result": {"v": 1}}, False),
        ({"success": False, "result": {"v": 1}}, False),
    ],
)
def test_mcp_tool_result_success_and_error_are_exclusive(
    fields: dict[str, Any], valid: bool
) -> None:
    """spec 2.1: success needs result and no error; failure needs error and no result."""
    data = {"request_id": "r1", **fields}
    if valid:
        McpToolResult.model_validate(data)
    else:
        with pytest.raises(ValidationError):
            McpToolResult.model_validate(data)


@pytest.mark.parametrize(
    ("progress", "valid"),
    [
        (None, True),
        ({}, True),
        ({"note": "no percent"}, True),
        ({"percent": 0}, True),
        ({"percent": 100}, True),
        ({"percent": 42.5}, True),
        ({"percent": -1}, False),
        ({"percent": 100.01}, False),
        ({"percent": "50"}, False),
        ({"percent": True}, False),
        ({"percent": None}, False),
    ],
)
def test_task_update_percent_in_0_100(progress: Any, valid: bool) -> None:
    """spec 2.1: progress.percent, when present, is a number in 0..100."""
    data = {"task_id": "t", "update_type": "progress", "status": "working", "progress": progress}
    if valid:
        TaskUpdate.model_validate(data)
    else:
        with pytest.raises(ValidationError):
            TaskUpdate.model_validate(data)


@pytest.mark.parametrize(
    ("progress", "valid"),
    [(None, True), (0, True), (0.5, True), (1, True), (-0.01, False), (1.01, False)],
)
def test_task_stream_progress_in_0_1(progress: Any, valid: bool) -> None:
    """spec 2.1: TaskStream.progress is a float in 0..1."""
    if valid:
        assert TaskStream.model_validate({"progress": progress}).progress == progress
    else:
        with pytest.raises(ValidationError):
            TaskStream.model_validate({"progress": progress})


@pytest.mark.parametrize(
    ("config", "valid"),
    [
        ({}, True),
        ({"timeout_seconds": 1}, True),
        ({"timeout_seconds": 0}, False),
        ({"timeout_seconds": -5}, False),
        ({"temperature": 0}, True),
        ({"temperature": 2}, True),
        ({"temperature": 1.3}, True),
        ({"temperature": -0.1}, False),
        ({"temperature": 2.01}, False),
    ],
)
def test_task_request_config_bounds(config: dict[str, Any], valid: bool) -> None:
    """spec 2.1: timeout_seconds >= 1, temperature 0..2."""
    if valid:
        TaskRequestConfig.model_validate(config)
    else:
        with pytest.raises(ValidationError):
            TaskRequestConfig.model_validate(config)


# -- entities (spec 2.4) -------------------------------------------------------------------------

SPEC_MANIFEST = {
    "id": "urn:asap:agent:echo-test",
    "name": "Echo Test",
    "version": "1.0.0",
    "description": "echo",
    "capabilities": {
        "asap_version": "0.1",
        "skills": [
            {"id": "echo", "description": "Echo back", "input_schema": None, "output_schema": None}
        ],
        "state_persistence": False,
        "streaming": False,
        "mcp_tools": [],
        "hardware": None,
        "inference": None,
    },
    "endpoints": {"asap": "http://127.0.0.1:8765/asap", "events": None},
    "supported_versions": ["2.2"],
    "auth": None,
    "signature": None,
    "sla": None,
    "verification": None,
    "ttl_seconds": 300,
}


def manifest_data(**overrides: Any) -> dict[str, Any]:
    data = {
        "id": "urn:asap:agent:a",
        "name": "A",
        "version": "1.0.0",
        "description": "d",
        "capabilities": {},
        "endpoints": {"asap": "http://127.0.0.1:1/asap"},
    }
    data.update(overrides)
    return data


def test_manifest_as_served_round_trips() -> None:
    """spec 2.4: the observed manifest parses and serializes to the same JSON, same order."""
    dumped = Manifest.model_validate(SPEC_MANIFEST).model_dump(mode="json", by_alias=True)
    assert dumped == SPEC_MANIFEST
    assert json.dumps(dumped) == json.dumps(SPEC_MANIFEST)


def test_manifest_defaults() -> None:
    """spec 2.4: supported_versions ["2.2"], ttl 300, capability defaults."""
    manifest = Manifest.model_validate(manifest_data())
    assert manifest.supported_versions == ["2.2"]
    assert manifest.ttl_seconds == 300
    assert manifest.capabilities.asap_version == "0.1"


def test_manifest_rejects_unsupported_auth_scheme() -> None:
    """spec 2.4/3.6: schemes other than bearer/basic fail to parse."""
    with pytest.raises(ValidationError) as caught:
        Manifest.model_validate(manifest_data(auth={"schemes": ["oauth2"]}))
    assert "Unsupported authentication scheme 'oauth2'. Supported schemes: basic, bearer" in str(
        caught.value
    )


@pytest.mark.parametrize("schemes", [["bearer"], ["Basic"], ["BEARER", "basic"]])
def test_manifest_accepts_bearer_and_basic_case_insensitively(schemes: list[str]) -> None:
    """spec 2.4: bearer and basic, case-insensitive."""
    manifest = Manifest.model_validate(manifest_data(auth={"schemes": schemes}))
    assert manifest.auth is not None and manifest.auth.schemes == schemes


@pytest.mark.parametrize("version", ["1.0.0", "1.0.0-dev", "v1", "2.0rc1", "0.3.0"])
def test_manifest_version_pep440_accepted(version: str) -> None:
    """spec 2.4: version must parse as PEP 440 (1.0.0-dev and v1 pass)."""
    assert Manifest.model_validate(manifest_data(version=version)).version == version


@pytest.mark.parametrize("version", ["not a version", "", "1.0.0.x"])
def test_manifest_version_pep440_rejected(version: str) -> None:
    """spec 2.4: a non-PEP 440 version fails."""
    with pytest.raises(ValidationError) as caught:
        Manifest.model_validate(manifest_data(version=version))
    assert "PEP 440" in str(caught.value)


def test_manifest_needs_a_supported_version() -> None:
    """spec 2.4: supported_versions has at least one item."""
    with pytest.raises(ValidationError) as caught:
        Manifest.model_validate(manifest_data(supported_versions=[]))
    assert error_types(caught.value) == [(("supported_versions",), "too_short")]


def test_manifest_id_must_be_an_agent_urn() -> None:
    """spec 1.3: Manifest.id follows the URN rule."""
    with pytest.raises(ValidationError):
        Manifest.model_validate(manifest_data(id="urn:asap:agent:Bad_Name"))


@pytest.mark.parametrize(("version", "valid"), [(0, False), (-1, False), (1, True), (7, True)])
def test_state_snapshot_version_at_least_1(version: int, valid: bool) -> None:
    """spec 2.4: StateSnapshot.version >= 1."""
    data = {"id": "s", "task_id": "t", "version": version, "data": {}}
    if valid:
        assert StateSnapshot.model_validate(data).checkpoint is False
    else:
        with pytest.raises(ValidationError):
            StateSnapshot.model_validate(data)


def make_task(status: TaskStatus = TaskStatus.SUBMITTED, **fields: Any) -> Task:
    return Task.model_validate(
        {"id": "task_1", "conversation_id": "c1", "status": status, **fields}
    )


@pytest.mark.parametrize(("depth", "valid"), [(0, True), (10, True), (-1, False), (11, False)])
def test_task_depth_0_to_10(depth: int, valid: bool) -> None:
    """spec 2.4: Task.depth in 0..10 (MAX_TASK_DEPTH)."""
    if valid:
        assert make_task(depth=depth).depth == depth
    else:
        with pytest.raises(ValidationError):
            make_task(depth=depth)


@pytest.mark.parametrize("status", list(TaskStatus))
def test_task_can_be_cancelled_only_when_submitted_or_working(status: TaskStatus) -> None:
    """spec 2.3: can_be_cancelled() is true only for submitted and working."""
    expected = status in (TaskStatus.SUBMITTED, TaskStatus.WORKING)
    assert make_task(status).can_be_cancelled() is expected


# -- state machine (spec 2.3) --------------------------------------------------------------------

# Rows: from; columns: to. "x" = legal. Order: submitted working completed failed cancelled
# input_required.
STATES = ["submitted", "working", "completed", "failed", "cancelled", "input_required"]
MATRIX = """
                 sub  wor  com  fai  can  inp
submitted         .    x    .    .    x    .
working           .    .    x    x    x    x
completed         .    .    .    .    .    .
failed            .    .    .    .    .    .
cancelled         .    .    .    .    .    .
input_required    .    x    .    .    x    .
"""


def _matrix() -> dict[tuple[str, str], bool]:
    rows = [line.split() for line in MATRIX.strip().splitlines()[1:]]
    table = {}
    for row in rows:
        source, marks = row[0], row[1:]
        assert len(marks) == 6
        for target, mark in zip(STATES, marks, strict=True):
            table[(source, target)] = mark == "x"
    assert len(table) == 36
    return table


ALLOWED = _matrix()


def test_matrix_lists_exactly_the_six_statuses() -> None:
    """spec 2.3: six statuses, no more."""
    assert sorted(status.value for status in TaskStatus) == sorted(STATES)


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED))
def test_can_transition_matches_spec_table(source: str, target: str) -> None:
    """spec 2.3: the full 6x6 matrix."""
    assert can_transition(TaskStatus(source), TaskStatus(target)) is ALLOWED[(source, target)]


FIXED_NOW = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


@pytest.mark.parametrize(("source", "target"), [k for k, v in ALLOWED.items() if v])
def test_transition_returns_a_new_task(source: str, target: str) -> None:
    """spec 2.3: transition() returns a copy with the new status and updated_at = now."""
    created = datetime(2030, 1, 1, tzinfo=UTC)
    task = make_task(TaskStatus(source), created_at=created, updated_at=created, depth=2)
    moved = transition(task, TaskStatus(target), clock=lambda: FIXED_NOW)
    assert moved is not task
    assert moved.status == TaskStatus(target)
    assert moved.updated_at == FIXED_NOW
    assert moved.created_at == created
    assert (moved.id, moved.conversation_id, moved.depth) == (task.id, task.conversation_id, 2)
    # the original is unchanged
    assert task.status == TaskStatus(source)
    assert task.updated_at == created


@pytest.mark.parametrize(("source", "target"), [k for k, v in ALLOWED.items() if not v])
def test_illegal_transition_raises(source: str, target: str) -> None:
    """spec 2.3/3.6: InvalidTransitionError, -32000, asap:protocol/invalid_state."""
    task = make_task(TaskStatus(source))
    with pytest.raises(InvalidTransitionError) as caught:
        transition(task, TaskStatus(target), clock=lambda: FIXED_NOW)
    error = caught.value
    assert error.rpc_code == -32000
    assert error.code == "asap:protocol/invalid_state"
    assert error.message == f"Invalid transition from '{source}' to '{target}'"
    assert error.details == {"from_state": source, "to_state": target, "task_id": "task_1"}
    assert error.recoverable is False
    assert task.status == TaskStatus(source)


@pytest.mark.parametrize("status", list(TaskStatus))
def test_task_status_is_terminal(status: TaskStatus) -> None:
    """spec 2.3: completed, failed and cancelled are terminal."""
    terminal = status.value in ("completed", "failed", "cancelled")
    assert status.is_terminal() is terminal
    assert make_task(status).is_terminal() is terminal
    assert (status in TaskStatus.terminal_states()) is terminal
    if terminal:
        assert not any(ALLOWED[(status.value, target)] for target in STATES)


# -- errors (spec 3.5, 3.6) ------------------------------------------------------------------------

# class -> (instance, rpc_code, taxonomy, recoverable, retry_after_ms, fallback_action)
SPEC_TAXONOMY: list[tuple[ASAPError, int, str, bool, int | None, str | None]] = [
    (
        InvalidTransitionError("a", "b", "t1"),
        -32000,
        "asap:protocol/invalid_state",
        False,
        None,
        None,
    ),
    (
        MalformedEnvelopeError("Malformed envelope: x"),
        -32001,
        "asap:protocol/malformed_envelope",
        False,
        None,
        None,
    ),
    (
        ProtocolCorrelationError("E1", "E2"),
        -32001,
        "asap:protocol/malformed_envelope",
        False,
        None,
        None,
    ),
    (
        InvalidTimestampError("too old"),
        -32002,
        "asap:protocol/invalid_timestamp",
        True,
        5000,
        "resend_with_fresh_timestamp",
    ),
    (InvalidNonceError("dup"), -32003, "asap:protocol/invalid_nonce", False, None, None),
    (TaskNotFoundError("t1"), -32010, "asap:task/not_found", False, None, None),
    (
        CircuitOpenError("open"),
        -32011,
        "asap:transport/circuit_open",
        True,
        5000,
        "retry_later_or_failover",
    ),
    (
        HandlerNotFoundError("foo.bar"),
        -32012,
        "asap:transport/handler_not_found",
        False,
        None,
        None,
    ),
    (
        SkillNotFoundError("nope", ["echo"]),
        -32013,
        "asap:routing/skill_not_found",
        False,
        None,
        None,
    ),
    (
        UnsupportedAuthSchemeError("bad"),
        -32020,
        "asap:auth/unsupported_scheme",
        False,
        None,
        None,
    ),
    (
        TaskAlreadyCompletedError("t1", "completed"),
        -32030,
        "asap:task/already_completed",
        False,
        None,
        None,
    ),
    (
        ThreadPoolExhaustedError("full"),
        -32031,
        "asap:transport/thread_pool_exhausted",
        True,
        1000,
        "retry_later",
    ),
    (
        ASAPConnectionError("down"),
        -32032,
        "asap:transport/connection_error",
        True,
        None,
        "retry_or_check_connectivity",
    ),
    (
        ASAPTimeoutError("slow"),
        -32033,
        "asap:transport/timeout",
        True,
        None,
        "retry_with_backoff",
    ),
]

# spec 3.5: standard JSON-RPC codes and their generic messages
SPEC_JSONRPC = [
    (ParseError, -32700, "Parse error"),
    (InvalidRequestError, -32600, "Invalid request"),
    (MethodNotFoundError, -32601, "Method not found"),
    (InvalidParamsError, -32602, "Invalid params"),
    (InternalError, -32603, "Internal error"),
    (VersionIncompatibleError, -32000, "ASAP protocol version incompatible"),
]


@pytest.mark.parametrize(
    ("error", "rpc_code", "taxonomy", "recoverable", "retry_after_ms", "fallback"),
    SPEC_TAXONOMY,
    ids=[type(row[0]).__name__ for row in SPEC_TAXONOMY],
)
def test_error_taxonomy_matches_spec_table(
    error: ASAPError,
    rpc_code: int,
    taxonomy: str,
    recoverable: bool,
    retry_after_ms: int | None,
    fallback: str | None,
) -> None:
    """spec 3.6: rpc code, taxonomy URI, recoverability and recovery hints of each class."""
    assert error.rpc_code == rpc_code
    assert error.code == taxonomy
    assert error.recoverable is recoverable
    assert error.is_recoverable is recoverable
    assert error.retry_after_ms == retry_after_ms
    assert error.fallback_action == fallback
    data = error.to_dict()
    assert data["code"] == data["asap_taxonomy_code"] == taxonomy
    assert data["rpc_code"] == rpc_code
    assert data["recoverable"] is recoverable
    assert data.get("retry_after_ms") == retry_after_ms
    assert data.get("fallback_action") == fallback
    rpc = error.to_rpc_error()
    assert rpc == {"code": rpc_code, "message": error.message, "data": data}


def test_every_asap_error_class_is_in_the_table() -> None:
    """Adding an error class means adding it to the spec 3.6 / 3.5 tables above."""
    covered = {type(row[0]) for row in SPEC_TAXONOMY} | {row[0] for row in SPEC_JSONRPC}
    abstract = {
        ASAPError,
        errors_module.JsonRpcError,
        errors_module.HTTPError,
        errors_module.ConfigurationError,
        errors_module.TaskFailedError,  # never on the wire as an error: a failed task
        RemoteRPCError,  # carries the remote's code; tested below
    }
    classes = {
        cls
        for _, cls in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(cls, ASAPError)
    }
    assert classes - abstract == covered


@pytest.mark.parametrize(("cls", "rpc_code", "message"), SPEC_JSONRPC)
def test_jsonrpc_errors_use_generic_message_and_free_data(
    cls: type[errors_module.JsonRpcError], rpc_code: int, message: str
) -> None:
    """spec 3.5: standard codes send the generic message and data as given (maybe null)."""
    assert cls(None).to_rpc_error() == {"code": rpc_code, "message": message, "data": None}
    data = {"error": "x"}
    assert cls(data).to_rpc_error() == {"code": rpc_code, "message": message, "data": data}


def test_error_messages_and_details_from_spec() -> None:
    """spec 3.6: messages and details are exact."""
    assert TaskNotFoundError("t9").message == "Task not found: t9"
    assert TaskNotFoundError("t9").details == {"task_id": "t9"}
    done = TaskAlreadyCompletedError("t9", "failed")
    assert done.message == "Task already completed: t9 (status: failed)"
    corr = ProtocolCorrelationError("E1", "E2")
    assert corr.message == "correlation_id mismatch: expected 'E1', got 'E2'"
    handler = HandlerNotFoundError("foo.bar")
    assert handler.message == "No handler registered for payload type: foo.bar"
    assert handler.details == {"payload_type": "foo.bar"}
    assert handler.to_dict()["error"] == "No handler registered for payload type: foo.bar"
    streaming = HandlerNotFoundError("foo.bar", streaming=True)
    assert streaming.to_dict()["error"] == "No streaming handler registered for payload type"
    assert InvalidTimestampError("m").to_dict()["error"] == "Invalid envelope timestamp"
    assert InvalidNonceError("m").to_dict()["error"] == "Invalid envelope nonce"


def test_to_dict_key_order_without_hints() -> None:
    """spec 3.5: code, rpc_code, message, details, recoverable, asap_taxonomy_code, error."""
    data = TaskNotFoundError("t1").to_dict()
    assert list(data) == [
        "code",
        "rpc_code",
        "message",
        "details",
        "recoverable",
        "asap_taxonomy_code",
        "error",
    ]
    assert data == {
        "code": "asap:task/not_found",
        "rpc_code": -32010,
        "message": "Task not found: t1",
        "details": {"task_id": "t1"},
        "recoverable": False,
        "asap_taxonomy_code": "asap:task/not_found",
        "error": "Task not found: t1",
    }


def test_to_dict_key_order_with_every_hint() -> None:
    """spec 3.5: the optional hints sit between details and recoverable, in this order."""
    error = InvalidTimestampError(
        "Envelope timestamp is too old", {"age_seconds": 400.0}, alternative_agents=["urn:a:b"]
    )
    data = error.to_dict()
    assert list(data) == [
        "code",
        "rpc_code",
        "message",
        "details",
        "retry_after_ms",
        "alternative_agents",
        "fallback_action",
        "recoverable",
        "asap_taxonomy_code",
        "error",
    ]
    assert data["retry_after_ms"] == 5000
    assert data["alternative_agents"] == ["urn:a:b"]
    assert data["fallback_action"] == "resend_with_fresh_timestamp"
    assert data["details"] == {"age_seconds": 400.0}


def test_hints_can_be_overridden_per_instance() -> None:
    """spec 3.5: retry_after_ms and fallback_action given at construction win."""
    error = CircuitOpenError("open", retry_after_ms=250, fallback_action="failover")
    data = error.to_dict()
    assert (data["retry_after_ms"], data["fallback_action"]) == (250, "failover")
    assert CircuitOpenError("again").retry_after_ms == 5000  # class default untouched


def test_remote_rpc_error_keeps_remote_code_and_hints() -> None:
    """spec 3.6: RemoteRPCError (asap:rpc/remote_error) reflects what the remote said."""
    plain = RemoteRPCError(-32013, "Unknown skill: x")
    assert plain.rpc_code == -32013
    assert plain.code == "asap:rpc/remote_error"
    assert plain.recoverable is False
    hinted = RemoteRPCError(
        -32002,
        "too old",
        {
            "code": "asap:protocol/invalid_timestamp",
            "details": {"age_seconds": 400},
            "retry_after_ms": 5000,
            "recoverable": True,
        },
    )
    assert hinted.code == "asap:protocol/invalid_timestamp"
    assert hinted.recoverable is True
    assert hinted.retry_after_ms == 5000
    assert hinted.details == {"age_seconds": 400}


def test_ids_differ_in_a_forked_child() -> None:
    """Random bits are read ahead in blocks: a forked worker must not repeat its parent's."""
    import os

    from asap.models.ids import generate_id, generate_trace_id

    generate_id()  # the parent has a block read ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.write(write, (generate_id() + generate_trace_id()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    parent = generate_id() + generate_trace_id()
    os.close(read)
    os.close(write)
    assert child[10:26] != parent[10:26] and child[26:] != parent[26:]


def test_ids_generated_by_many_threads_at_once_never_repeat() -> None:
    """Threads share the read-ahead block of random bytes (sync skills run in a pool): with a
    thread switch forced every microsecond, no two ids or trace ids may get the same bytes,
    across many refills of the block."""
    import sys
    import threading

    from asap.models.ids import generate_id, generate_span_id, generate_trace_id

    per_thread = 5_000
    results: list[list[str]] = []

    def work() -> None:
        mine = []
        for _ in range(per_thread):
            mine.append(generate_id()[10:])  # the random part
            mine.append(generate_trace_id())
            mine.append(generate_span_id())
        results.append(mine)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    values = [value for mine in results for value in mine]
    assert len(values) == 8 * 3 * per_thread
    assert len(set(values)) == len(values)


def test_utc_timestamp_is_now_written_as_format_timestamp_writes_it() -> None:
    """Reply envelopes are stamped by utc_timestamp: the reference's format, the current time."""
    import re
    from datetime import UTC, datetime

    from asap.models.base import format_timestamp, utc_timestamp

    for _ in range(1000):
        before = datetime.now(UTC)
        text = utc_timestamp()
        after = datetime.now(UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", text), text
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert before <= parsed <= after
        assert format_timestamp(parsed) == text


# -- the lean validation path (validate_envelope) ---------------------------------------------


def _captured_envelopes() -> list[dict[str, Any]]:
    """Every envelope in the captured exchanges of tests/conformance/wire (good and bad)."""
    import glob
    from pathlib import Path

    found = []
    wire = Path(__file__).parent / "conformance" / "wire"
    for path in sorted(glob.glob(str(wire / "*.json"))):
        capture = json.loads(Path(path).read_text())
        if not isinstance(capture, dict):
            continue
        body = capture.get("request", {}).get("body_json")
        for frame in body if isinstance(body, list) else [body]:
            params = frame.get("params") if isinstance(frame, dict) else None
            envelope = params.get("envelope") if isinstance(params, dict) else None
            if isinstance(envelope, dict):
                found.append(envelope)
    return found


def _lean_cases() -> list[Any]:
    urn = "urn:asap:agent:a"
    cases: list[Any] = _captured_envelopes()
    cases += [
        envelope_data(),
        envelope_data(id="E1", timestamp="2026-01-01T00:00:00Z", trace_id="t", extensions={}),
        envelope_data(id=None),
        envelope_data(timestamp=None),
        envelope_data(sender=urn + "\n"),  # Python's $ accepts a final newline
        envelope_data(sender=urn + ":b:c"),
        envelope_data(recipient="urn:asap:agent:" + "a" * 241),  # 256 characters
        envelope_data(recipient="urn:asap:agent:" + "a" * 242),  # 257
        envelope_data(recipient="urn:asap:agent:é"),
        envelope_data(sender=7),
        envelope_data(payload_type="Task.Request"),
        envelope_data(payload_type="TASK_REQUEST", payload={"skill_id": "echo"}),
        envelope_data(payload=[1, 2]),
        envelope_data(payload="text"),
        envelope_data(payload=TaskRequest(conversation_id="c", skill_id="s", input={})),
        envelope_data(payload=TaskCancel(task_id="t1")),
        envelope_data(payload_type="task.cancel", payload={"task_id": "t1"}),
        envelope_data(payload_type="task.response", payload={"task_id": "t", "status": "done"}),
        envelope_data(payload_type="custom.thing", payload={"any": "thing"}),
        envelope_data(payload_type=5),
        envelope_data(unknown_key=1),
        envelope_data(requires_ack="yes"),
        envelope_data(extensions=[]),
        envelope_data(timestamp="yesterday"),
        {"payload_type": "task.request"},
        "not an envelope",
    ]
    for variant in ("payload", "sender", "asap_version"):
        data = envelope_data()
        del data[variant]
        cases.append(data)
    return cases


@pytest.mark.parametrize("data", _lean_cases())
def test_validate_envelope_answers_as_model_validate_does(data: Any) -> None:
    """The hot path's lean validation gives the same envelope, or the same errors, as the
    model's full validation, for every captured envelope and each rule's edge cases."""
    from asap.models.envelope import validate_envelope

    try:
        expected = Envelope.model_validate(data)
    except ValidationError as exc:
        with pytest.raises(ValidationError) as caught:
            validate_envelope(data)
        assert caught.value.json() == exc.json()
        return
    got = validate_envelope(data)
    assert type(got) is Envelope
    assert type(got.payload) is type(expected.payload)
    generated = {key for key in ("id", "timestamp") if data.get(key) is None}
    assert got.model_dump(exclude=generated) == expected.model_dump(exclude=generated)
    assert got.model_fields_set == expected.model_fields_set


def test_the_lean_validation_covers_every_payload_type_without_a_correlation_rule() -> None:
    """Guard for pydantic upgrades: the lean validators are built from Envelope's core schema;
    were its shape to change, every envelope would take the (correct, slower) full path."""
    from asap.models.envelope import _LEAN
    from asap.models.payloads import CORRELATED_PAYLOAD_TYPES, PAYLOAD_MODELS

    assert set(_LEAN) == set(PAYLOAD_MODELS) - CORRELATED_PAYLOAD_TYPES

"""The envelope that carries every ASAP message (spec 1.2)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import SchemaValidator, core_schema

from asap.models.base import ASAPBaseModel, UTCDateTime, utc_now
from asap.models.ids import generate_id
from asap.models.payloads import (
    CORRELATED_PAYLOAD_TYPES,
    PAYLOAD_MODELS,
    normalize_payload_type,
)

__all__ = ["AGENT_URN_MAX_LENGTH", "Envelope", "validate_agent_urn", "validate_envelope"]

AGENT_URN_PATTERN = re.compile(r"^urn:asap:agent:[a-z0-9-]+(?::[a-z0-9-]+)?$")
AGENT_URN_MAX_LENGTH = 256
_DEFAULTED = ("id", "timestamp")


def validate_agent_urn(value: str) -> str:
    """Check an agent URN against spec 1.3 and return it; raise ``ValueError`` otherwise."""
    if len(value) > AGENT_URN_MAX_LENGTH:
        raise ValueError(
            f"Agent URN must be at most {AGENT_URN_MAX_LENGTH} characters, got {len(value)}"
        )
    if not AGENT_URN_PATTERN.match(value):
        raise ValueError(f"Agent ID must follow URN format 'urn:asap:agent:{{name}}', got: {value}")
    return value


class Envelope(ASAPBaseModel):
    """One ASAP message: routing, correlation and a payload typed by ``payload_type``.

    ``id`` and ``timestamp`` are filled in when absent or null. A known payload type (spec 1.4)
    makes ``payload`` the matching model from :mod:`asap.models.payloads`; an unknown one keeps
    it a plain dict. Response-like payloads need a ``correlation_id`` (spec 1.2).
    """

    id: str = Field(default_factory=generate_id)
    asap_version: str
    timestamp: UTCDateTime = Field(default_factory=utc_now)
    sender: str
    recipient: str
    payload_type: str
    payload: Any
    correlation_id: str | None = None
    trace_id: str | None = None
    requires_ack: bool = False
    extensions: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        # spec 1.2: a null id or timestamp is generated, as if absent
        if isinstance(data, dict) and (
            data.get("id", 0) is None or data.get("timestamp", 0) is None
        ):
            data = {k: v for k, v in data.items() if v is not None or k not in ("id", "timestamp")}
        return data

    _agent_urn = field_validator("sender", "recipient")(validate_agent_urn)

    @field_validator("payload")
    @classmethod
    def _typed_payload(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict | ASAPBaseModel):
            raise ValueError("payload must be a JSON object")
        payload_type = info.data.get("payload_type")
        if isinstance(value, dict) and isinstance(payload_type, str):
            model = PAYLOAD_MODELS.get(normalize_payload_type(payload_type))
            if model is not None:
                # Errors keep their full location (["payload", "skill_id"]); the reference
                # drops the "payload" prefix, which hides where the problem is.
                return model.model_validate(value)
        return value

    @model_validator(mode="after")
    def _correlation_rule(self) -> Envelope:
        if self.payload_key in CORRELATED_PAYLOAD_TYPES and not self.correlation_id:
            raise ValueError(f"{self.payload_type} must have correlation_id for request tracking")
        return self

    @property
    def payload_key(self) -> str:
        """The normalized payload type (spec 1.4), used for matching and dispatch."""
        return normalize_payload_type(self.payload_type)

    @property
    def payload_dict(self) -> dict[str, Any]:
        """The payload as a plain JSON-ready dict, whether it is typed or not."""
        if isinstance(self.payload, ASAPBaseModel):
            return self.payload.to_wire()
        return dict(self.payload)


def _lean_validators() -> dict[str, SchemaValidator]:
    """Per normalized payload type, a validator of :class:`Envelope` without its Python
    validators: the URN rule as a pydantic-core pattern and length, ``payload`` as that
    type's model. Payload types that need a ``correlation_id`` have none. Built from the
    model's own core schema; if that ever has another shape, there are none (everything
    takes the full path)."""
    outer: Any = Envelope.__pydantic_core_schema__
    try:
        model = outer["schema"]
        fields_schema = model["schema"]["schema"]  # inside _fill_defaults
        fields = fields_schema["fields"]
        if not (
            outer["type"] == "function-after"
            and model["type"] == "model"
            and model["schema"]["type"] == "function-before"
            and fields_schema["type"] == "model-fields"
        ):
            return {}
        urn = core_schema.str_schema(
            pattern=AGENT_URN_PATTERN.pattern, max_length=AGENT_URN_MAX_LENGTH
        )
        lean: dict[str, SchemaValidator] = {}
        for key, payload_model in PAYLOAD_MODELS.items():
            if key in CORRELATED_PAYLOAD_TYPES:
                continue
            lean_fields = {
                **fields,
                "sender": {**fields["sender"], "schema": urn},
                "recipient": {**fields["recipient"], "schema": urn},
                "payload": {**fields["payload"], "schema": payload_model.__pydantic_core_schema__},
            }
            schema = {**model, "schema": {**fields_schema, "fields": lean_fields}}
            lean[key] = SchemaValidator(schema, model.get("config"))
        return lean
    except (KeyError, TypeError):
        return {}


_LEAN = _lean_validators()


def validate_envelope(data: Any) -> Envelope:
    """``Envelope.model_validate(data)``, at half the cost for the usual envelope: one whose
    payload type needs no ``correlation_id`` and whose ``id`` and ``timestamp`` are not null
    takes a validator without Python callbacks (:func:`_lean_validators`). What it refuses,
    or accepts only through a Python check it cannot make, goes through the full validation,
    whose result or errors are the answer: both paths give the same envelope."""
    if (
        type(data) is dict
        and type(payload_type := data.get("payload_type")) is str
        and data.get("id", 0) is not None
        and data.get("timestamp", 0) is not None
    ):
        lean = _LEAN.get(normalize_payload_type(payload_type))
        if lean is not None:
            try:
                return lean.validate_python(data)  # type: ignore[no-any-return]
            except ValidationError:
                pass  # explained below, with the full rules' messages
    return Envelope.model_validate(data)

"""JSON-RPC 2.0 framing of ``POST /asap`` (spec 3.2, 3.3 steps 7-11, 3.5, 3.7)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from asap.errors import InvalidParamsError, InvalidRequestError, JsonRpcError, MethodNotFoundError

__all__ = [
    "METHOD",
    "error_reply",
    "parse_frame",
    "request_id_of",
    "success_reply",
]

METHOD = "asap.send"
_FRAME_KEYS = frozenset({"jsonrpc", "method", "params", "id"})


class _Frame(BaseModel):
    """Used only to explain a bad frame in pydantic's error layout, as the reference does."""

    model_config = ConfigDict(extra="forbid")

    jsonrpc: Literal["2.0"] = "2.0"
    method: StrictStr
    params: dict[str, Any]
    id: StrictStr | StrictInt


def request_id_of(frame: Any) -> str | int | None:
    """The JSON-RPC id to echo in a reply: a string or an integer, else null."""
    if isinstance(frame, dict):
        value = frame.get("id")
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
    return None


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as JSON-safe dicts (``ctx`` values become strings).

    The standard library parses pydantic's output because it may hold ``NaN``.
    """
    return list(json.loads(exc.json()))


def parse_frame(frame: Any, authenticate: Callable[[], None] | None = None) -> dict[str, Any]:
    """Check one JSON-RPC request object and return its ``envelope`` dict.

    Raises the JSON-RPC error of spec 3.3 for the first rule the frame breaks;
    ``authenticate`` (step 10) runs between the method check and the envelope's.
    """
    if not isinstance(frame, dict):
        raise InvalidRequestError(
            {"error": "JSON-RPC request must be an object", "received_type": _type_name(frame)}
        )
    request_id = frame.get("id")
    if not (
        frame.keys() <= _FRAME_KEYS
        and frame.get("jsonrpc", "2.0") == "2.0"
        and type(frame.get("method")) is str
        and type(frame.get("params")) is dict
        and (type(request_id) is str or type(request_id) is int)
    ):
        _explain_bad_frame(frame)
    if frame["method"] != METHOD:
        raise MethodNotFoundError({"method": frame["method"]})
    if authenticate is not None:
        authenticate()
    params = frame["params"]
    if "envelope" not in params:
        raise InvalidParamsError({"error": "Missing 'envelope' in params"})
    envelope = params["envelope"]
    if not isinstance(envelope, dict):
        raise InvalidParamsError({"error": "'envelope' must be a JSON object"})
    return envelope


def _explain_bad_frame(frame: dict[str, Any]) -> None:
    try:
        _Frame.model_validate(frame)
    except ValidationError as exc:
        errors = validation_errors(exc)
        if all(error["loc"][:1] == ["params"] and error["type"] == "dict_type" for error in errors):
            raise InvalidParamsError(
                {"error": "JSON-RPC 'params' must be an object", "validation_errors": errors}
            ) from None
        raise InvalidRequestError(
            {"error": "Invalid JSON-RPC structure", "validation_errors": errors}
        ) from None
    raise InvalidRequestError({"error": "Invalid JSON-RPC structure"})  # pragma: no cover


def _type_name(value: Any) -> str:
    return type(value).__name__


def success_reply(envelope: dict[str, Any], request_id: str | int | None) -> dict[str, Any]:
    """``{"jsonrpc":"2.0","result":{"envelope":...},"id":...}`` (spec 3.3 step 16)."""
    return {"jsonrpc": "2.0", "result": {"envelope": envelope}, "id": request_id}


def error_reply(error: JsonRpcError | Any, request_id: str | int | None) -> dict[str, Any]:
    """``{"jsonrpc":"2.0","error":{...},"id":...}`` for any :class:`~asap.errors.ASAPError`."""
    return {"jsonrpc": "2.0", "error": error.to_rpc_error(), "id": request_id}

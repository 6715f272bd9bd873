"""From a decoded JSON-RPC body to a reply: spec 3.3 steps 7-16 and the batch path of 3.7.

Each step is a small function that returns or raises a typed error; :class:`Dispatcher` chains
them and turns every error into the documented JSON-RPC reply, so nothing a caller sends
becomes an HTTP 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
from pydantic import ValidationError

from asap.errors import (
    ASAPError,
    HandlerNotFoundError,
    InternalError,
    InvalidNonceError,
    InvalidParamsError,
    InvalidRequestError,
    InvalidTimestampError,
    JsonRpcError,
    MethodNotFoundError,
    SkillNotFoundError,
    TaskNotFoundError,
)
from asap.models.base import utc_timestamp
from asap.models.entities import Manifest
from asap.models.enums import TaskStatus
from asap.models.envelope import Envelope, validate_envelope
from asap.models.ids import generate_id, generate_span_id, generate_trace_id
from asap.models.payloads import StateQuery, StateRestore, TaskCancel, TaskRequest
from asap.observability.logging import get_logger
from asap.observability.metrics import Metrics, payload_label
from asap.registry import SkillRegistry
from asap.security import Authenticator, sender_mismatch
from asap.settings import Settings
from asap.tasks import TaskManager
from asap.transport.jsonrpc import (
    error_reply,
    parse_frame,
    request_id_of,
    success_reply,
    validation_errors,
)

__all__ = ["Dispatcher", "RequestMeta"]

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_log = get_logger("asap.server")

ERROR_TYPES: dict[type[ASAPError], str] = {
    InvalidRequestError: "invalid_request",
    MethodNotFoundError: "method_not_found",
    InvalidParamsError: "invalid_params",
    InvalidTimestampError: "invalid_timestamp",
    InvalidNonceError: "invalid_nonce",
    HandlerNotFoundError: "handler_not_found",
    SkillNotFoundError: "skill_not_found",
    InternalError: "internal_error",
}
"""``error_type`` label of each error (spec 6.2); other errors use their class name."""


@dataclass(slots=True)
class RequestMeta:
    """What the HTTP layer knows about a request that the protocol layer may use. Treated
    as immutable (:meth:`for_frame` and ``dataclasses.replace`` make new ones); not frozen,
    because a frozen dataclass's ``__init__`` costs four times as much, twice per request."""

    traceparent: str | None = None
    idempotency_key: str | None = None
    respond_async: bool = False
    """The caller sent ``Prefer: respond-async``: reply ``working`` without waiting."""
    identity: str | None = None
    """The agent URN the caller's bearer token speaks for (authentication on)."""
    auth_error: JsonRpcError | None = None
    """Why the caller is not authenticated (authentication on, token missing or wrong)."""
    source: dict[str, Any] | None = None
    """The envelope as received (JSON values), stored with the task it creates."""

    def for_frame(self, idempotency_key: str | None, source: dict[str, Any]) -> RequestMeta:
        """This request's meta for one of its frames (``dataclasses.replace``, cheaper)."""
        return RequestMeta(
            self.traceparent,
            idempotency_key,
            self.respond_async,
            self.identity,
            self.auth_error,
            source,
        )


def request_fingerprint(request: TaskRequest) -> str:
    """What makes two requests the same request, for idempotency."""
    material = [request.skill_id, request.conversation_id, request.input]
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _otel_trace_id(envelope: Envelope, meta: RequestMeta) -> str:
    """The W3C trace id of this request (set by :func:`join_trace`), or a new one."""
    trace = (envelope.extensions or {}).get("trace_id")
    return trace if isinstance(trace, str) and _HEX32.match(trace) else generate_trace_id()


def join_trace(raw: dict[str, Any], meta: RequestMeta) -> None:
    """Record in a request envelope (before validation) the W3C trace it joins: the
    ``traceparent`` header's, else ``extensions.trace_id`` (+ ``span_id`` as the parent), else
    its ``trace_id`` if that is one, else a new trace; and give it a ``trace_id`` (the
    caller's, else the W3C one). A task logs that ``trace_id`` and its sub-requests carry both
    on, so one orchestration is one trace in every agent's logs (spec 6.3, pitfall 14)."""
    extensions = raw.get("extensions")
    if extensions is None:
        extensions = {}
    elif not isinstance(extensions, dict):
        return  # validation refuses it
    trace, parent = extensions.get("trace_id"), extensions.get("span_id")
    if meta.traceparent:
        match = _TRACEPARENT.match(meta.traceparent.strip())
        if match and match.group(1) != "0" * 32:
            trace, parent = match.group(1), match.group(2)
    if not (isinstance(trace, str) and _HEX32.match(trace)):
        given = raw.get("trace_id")
        trace = given if isinstance(given, str) and _HEX32.match(given) else generate_trace_id()
    if not (isinstance(parent, str) and _HEX16.match(parent)):
        parent = None
    raw["extensions"] = {**extensions, "trace_id": trace, "span_id": parent}
    if raw.get("trace_id") is None:
        raw["trace_id"] = trace


class Dispatcher:
    """Runs the protocol pipeline for one agent: frames, envelopes, skills, replies."""

    def __init__(
        self,
        settings: Settings,
        registry: SkillRegistry,
        manifest: Manifest,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.manifest = manifest
        self.metrics = metrics or Metrics()
        self.tasks = TaskManager(settings, registry, manifest.id, self.metrics)
        self.auth = Authenticator.from_settings(settings.auth_tokens, settings.auth_tokens_file)
        self.handlers: dict[str, Callable[[Envelope, RequestMeta], Awaitable[dict[str, Any]]]]
        self.handlers = {
            "taskrequest": self.on_task_request,
            "taskcancel": self.on_task_cancel,
            "statequery": self.on_state_query,
            "staterestore": self.on_state_restore,
        }

    # -- whole bodies --------------------------------------------------------------------

    async def handle_body(self, body: Any, meta: RequestMeta) -> dict[str, Any] | list[Any]:
        """Answer a decoded body: one request object, or a batch array (spec 3.7)."""
        if not isinstance(body, list):
            return await self.handle_frame(body, meta)
        if not body:
            return error_reply(InvalidRequestError({"reason": "empty batch"}), None)
        limit = self.settings.max_batch_size
        if len(body) > limit:
            return error_reply(
                InvalidRequestError({"reason": f"batch size {len(body)} exceeds max {limit}"}),
                None,
            )
        return list(await asyncio.gather(*(self._batch_item(item, meta) for item in body)))

    async def _batch_item(self, item: Any, meta: RequestMeta) -> dict[str, Any]:
        if not isinstance(item, dict):
            return error_reply(InvalidRequestError(None), None)
        # One header cannot key many requests: batch items use their own params key only.
        return await self.handle_frame(item, replace(meta, idempotency_key=None))

    async def handle_frame(self, frame: Any, meta: RequestMeta) -> dict[str, Any]:
        """Answer one JSON-RPC request object; never raises."""
        request_id = request_id_of(frame)
        started = time.perf_counter()
        payload_key = None
        try:
            envelope, source = await self.prepare(frame, meta)
            payload_key = envelope.payload_key
            params_key = frame["params"].get("idempotency_key")
            if not (isinstance(params_key, str) and params_key):
                params_key = meta.idempotency_key
            meta = meta.for_frame(params_key, source)
            handler = self.handlers.get(payload_key)  # route by normalized type (spec 1.4)
            if handler is None:
                raise HandlerNotFoundError(envelope.payload_type)
            reply = await handler(envelope, meta)
            self.count(payload_key, started)
            return success_reply(reply, request_id)
        except ASAPError as exc:
            _log.info(
                "asap.request.error",
                rpc_code=exc.rpc_code,
                error=exc.message,
                error_type=type(exc).__name__,
            )
            self.count(payload_key, started, exc)
            return error_reply(exc, request_id)
        except Exception as exc:
            _log.exception("asap.request.internal_error")
            error = self.internal_error(exc)
            self.count(payload_key, started, error)
            return error_reply(error, request_id)

    def count(
        self, payload_key: str | None, started: float, error: ASAPError | None = None
    ) -> None:
        """Record one answered request in the metrics."""
        error_type = None if error is None else ERROR_TYPES.get(type(error), type(error).__name__)
        self.metrics.request_answered(
            payload_label(payload_key), time.perf_counter() - started, error_type
        )

    def internal_error(self, exc: BaseException) -> InternalError:
        """The -32603 reply; the exception stays in the log unless debug is on."""
        data: dict[str, Any] = {"error": "Internal server error"}
        if self.settings.debug:
            data["type"] = type(exc).__name__
            data["traceback"] = traceback.format_exception(exc)
        return InternalError(data)

    # -- one envelope --------------------------------------------------------------------

    async def prepare(self, frame: Any, meta: RequestMeta) -> tuple[Envelope, dict[str, Any]]:
        """Frame, authentication, envelope, sender, replay window and nonce checks (spec 3.3
        steps 7-14); the envelope, and the JSON it was validated from."""

        def authenticate() -> None:
            if meta.auth_error is not None:
                self.metrics.auth_failures.inc()
                _log.info("asap.request.auth_failed", error=meta.auth_error.data["error"])
                raise meta.auth_error

        raw = parse_frame(frame, authenticate if self.auth else None)
        join_trace(raw, meta)
        stamped = raw.get("timestamp") is None
        if stamped:  # given now (spec 1.2), as text: the stored request needs no formatting
            raw["timestamp"] = utc_timestamp()
        try:
            envelope = validate_envelope(raw)
        except ValidationError as exc:
            raise InvalidParamsError(
                {"error": "Invalid envelope structure", "validation_errors": validation_errors(exc)}
            ) from None
        if self.auth is not None and envelope.sender != meta.identity:
            self.metrics.sender_mismatch.inc()
            _log.info("asap.request.sender_mismatch", sender=envelope.sender)
            raise sender_mismatch()
        if not stamped:  # a timestamp given now needs no check
            self.check_timestamp(envelope)
        if self.settings.require_nonce:
            await self.check_nonce(envelope)
        return envelope, raw

    async def check_nonce(self, envelope: Envelope) -> None:
        """Refuse an envelope without ``extensions.nonce`` or with one already used, by this
        process or any other sharing the storage (spec 3.13)."""
        nonce = (envelope.extensions or {}).get("nonce")
        if not isinstance(nonce, str) or not nonce or len(nonce) > 128:
            self.metrics.invalid_nonce.inc()
            got = "empty string" if nonce == "" else type(nonce).__name__
            if isinstance(nonce, str) and nonce:
                got = f"{len(nonce)} characters (max 128)"
            raise InvalidNonceError(
                f"Nonce must be a non-empty string of at most 128 characters, got {got}",
                {"envelope_id": envelope.id},
            )
        assert self.tasks.storage is not None
        ttl = float(self.settings.nonce_ttl_seconds)
        if not await self.tasks.storage.guard.use_nonce(f"{envelope.sender} {nonce}", ttl):
            self.metrics.invalid_nonce.inc()
            _log.info("asap.request.invalid_nonce", nonce=nonce, envelope_id=envelope.id)
            raise InvalidNonceError(
                f"Duplicate nonce detected: {nonce}", {"nonce": nonce, "envelope_id": envelope.id}
            )

    def check_timestamp(self, envelope: Envelope) -> None:
        """Reject envelopes older than the window or too far ahead (spec 3.13)."""
        stamp = envelope.timestamp
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        age = (datetime.now(UTC) - stamp).total_seconds()
        max_age = self.settings.max_envelope_age_seconds
        tolerance = self.settings.max_future_tolerance_seconds
        if age > max_age:
            raise InvalidTimestampError(
                f"Envelope timestamp is too old: {age:.1f} seconds (max: {max_age} seconds)",
                {
                    "timestamp": stamp.isoformat(),
                    "age_seconds": age,
                    "envelope_id": envelope.id,
                    "max_age_seconds": max_age,
                },
            )
        if -age > tolerance:
            raise InvalidTimestampError(
                f"Envelope timestamp is too far in the future: {-age:.1f} seconds "
                f"(max tolerance: {tolerance} seconds)",
                {
                    "timestamp": stamp.isoformat(),
                    "future_offset_seconds": -age,
                    "envelope_id": envelope.id,
                    "max_future_tolerance_seconds": tolerance,
                },
            )

    async def on_task_request(self, envelope: Envelope, meta: RequestMeta) -> dict[str, Any]:
        """Run a skill as a stored task; reply with its outcome, or ``working`` at once when
        the caller sent ``Prefer: respond-async``."""
        request: TaskRequest = envelope.payload
        spec = self.tasks.find_skill(request.skill_id)
        task_input = spec.parse_input(request.input)  # invalid: -32602 before any task exists
        key = (request.config and request.config.idempotency_key) or meta.idempotency_key
        fingerprint = request_fingerprint(request) if key else ""

        execute = partial(
            self.tasks.submit,
            spec,
            envelope,
            fingerprint,
            wait=not meta.respond_async,
            source=meta.source,
            task_input=task_input,
        )
        if key:
            assert self.tasks.storage is not None
            record, replayed = await self.tasks.storage.idempotency.run_once(
                f"{envelope.sender} {key}", fingerprint, execute
            )
            if replayed:
                self.metrics.idempotent_replays.inc()
                _log.info("asap.request.replayed", idempotency_key=key, task_id=record.task_id)
        else:
            record = await execute()
        return self.task_response(envelope, meta, record.task_id, record.status, record.result)

    async def on_task_cancel(self, envelope: Envelope, meta: RequestMeta) -> dict[str, Any]:
        """``task.cancel``: stop a running task wherever it runs (spec 3.6: -32010, -32030)."""
        cancel: TaskCancel = envelope.payload
        record = await self.tasks.cancel(cancel.task_id, cancel.reason)
        return self.task_response(envelope, meta, record.id, record.status.value, record.result)

    async def on_state_query(self, envelope: Envelope, meta: RequestMeta) -> dict[str, Any]:
        """``state.query``: the task's status and result, and a snapshot as ``final_state``
        (the latest, or ``version``)."""
        query: StateQuery = envelope.payload
        assert self.tasks.storage is not None
        record = await self.tasks.lookup(query.task_id)
        snapshot = await self.tasks.storage.snapshots.get(query.task_id, query.version)
        if record is None and snapshot is None:
            raise TaskNotFoundError(query.task_id)
        status = record.status.value if record else TaskStatus.SUBMITTED.value
        return self.task_response(
            envelope,
            meta,
            query.task_id,
            status,
            record.result if record else None,
            snapshot.to_wire() if snapshot else None,
            {"progress": record.progress} if record and record.progress else None,
        )

    async def on_state_restore(self, envelope: Envelope, meta: RequestMeta) -> dict[str, Any]:
        """``state.restore``: make a snapshot the latest state; a resumable task resumes from
        it. A snapshot moved from another agent travels in ``extensions.snapshot``."""
        restore: StateRestore = envelope.payload
        carried = (envelope.extensions or {}).get("snapshot")
        if carried is not None and not isinstance(carried, dict):
            raise InvalidParamsError({"error": "extensions.snapshot must be an object"})
        try:
            record, snapshot = await self.tasks.restore(
                restore.task_id, restore.snapshot_id, carried
            )
        except ValidationError as exc:
            raise InvalidParamsError(
                {
                    "error": "Invalid extensions.snapshot",
                    "validation_errors": validation_errors(exc),
                }
            ) from None
        status = record.status.value if record else TaskStatus.SUBMITTED.value
        return self.task_response(
            envelope,
            meta,
            restore.task_id,
            status,
            record.result if record else None,
            snapshot.to_wire(),
        )

    def task_response(
        self,
        envelope: Envelope,
        meta: RequestMeta,
        task_id: str,
        status: str,
        result: dict[str, Any] | None,
        final_state: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A ``task.response`` reply bound to ``envelope``."""
        payload = {
            "task_id": task_id,
            "status": status,
            "result": result,
            "final_state": final_state,
            "metrics": metrics,
        }
        return self.reply(envelope, meta, "task.response", payload)

    def reply(
        self,
        request: Envelope,
        meta: RequestMeta,
        payload_type: str,
        payload: dict[str, Any],
        trace: str | None = None,
    ) -> dict[str, Any]:
        """A reply envelope bound to ``request`` (spec 3.4), as a JSON-ready dict."""
        trace = trace or _otel_trace_id(request, meta)
        return {
            "id": generate_id(),
            "asap_version": request.asap_version,
            "timestamp": utc_timestamp(),
            "sender": self.manifest.id,
            "recipient": request.sender,
            "payload_type": payload_type,
            "payload": payload,
            "correlation_id": request.id,
            "trace_id": request.trace_id or trace,
            "requires_ack": False,
            "extensions": {"trace_id": trace, "span_id": generate_span_id()},
        }

    async def stream(self, frame: Any, meta: RequestMeta) -> AsyncIterator[dict[str, Any]]:
        """``POST /asap/stream``: run a task and yield ``TaskStream`` chunks (spec 3.8): one
        when it starts, one per progress report, and a final one with the outcome.

        Errors before the task starts are raised, to be answered as JSON-RPC (as the
        reference does).
        """
        envelope, source = await self.prepare(frame, meta)
        if envelope.payload_key != "taskrequest":
            raise HandlerNotFoundError(envelope.payload_type, streaming=True)
        request: TaskRequest = envelope.payload
        spec = self.tasks.find_skill(request.skill_id)
        task_input = spec.parse_input(request.input)
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        record = await self.tasks.submit(
            spec,
            envelope,
            wait=False,
            listener=events.put_nowait,
            source=source,
            task_input=task_input,
        )
        return self._stream_task(envelope, meta, record.task_id, events)

    async def _stream_task(
        self,
        envelope: Envelope,
        meta: RequestMeta,
        task_id: str,
        events: asyncio.Queue[dict[str, Any]],
    ) -> AsyncIterator[dict[str, Any]]:
        trace = _otel_trace_id(envelope, meta)

        def chunk(text: str, progress: float | None, final: bool, status: str) -> dict[str, Any]:
            payload = {"chunk": text, "progress": progress, "final": final, "status": status}
            return self.reply(envelope, meta, "TaskStream", payload, trace)

        yield chunk(orjson.dumps({"task_id": task_id}).decode(), 0.0, False, "working")
        while True:
            event = await events.get()
            if not event.get("final"):
                progress = event["progress"]
                percent = progress.get("percent")
                fraction = None if percent is None else percent / 100
                yield chunk(orjson.dumps(progress).decode(), fraction, False, "working")
                continue
            status, result = event["status"], event["result"]
            try:
                text = orjson.dumps({"task_id": task_id, "result": result}).decode()
            except TypeError as exc:  # a skill returned something JSON cannot carry
                _log.exception("asap.response.unserializable")
                status = TaskStatus.FAILED.value
                error = {"error": self.tasks.safe_error(exc)}
                text = orjson.dumps({"task_id": task_id, "result": error}).decode()
            yield chunk(text, 1.0, True, status)
            return

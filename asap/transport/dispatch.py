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
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from structlog.contextvars import bound_contextvars

from asap.context import Context, current_deadline
from asap.errors import (
    ASAPError,
    ASAPTimeoutError,
    HandlerNotFoundError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    InvalidTimestampError,
    MethodNotFoundError,
    SkillNotFoundError,
    TaskFailedError,
)
from asap.models.base import format_timestamp
from asap.models.entities import Manifest
from asap.models.enums import TaskStatus
from asap.models.envelope import Envelope
from asap.models.ids import generate_id, generate_span_id, generate_task_id, generate_trace_id
from asap.models.payloads import TaskRequest
from asap.observability.logging import get_logger
from asap.observability.metrics import Metrics, payload_label
from asap.registry import SkillRegistry, SkillSpec
from asap.settings import Settings
from asap.transport.idempotency import IdempotencyRecord, IdempotencyStore, MemoryIdempotencyStore
from asap.transport.jsonrpc import (
    error_reply,
    parse_frame,
    request_id_of,
    success_reply,
    validation_errors,
)

__all__ = ["Dispatcher", "RequestMeta"]

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_log = get_logger("asap.server")

ERROR_TYPES: dict[type[ASAPError], str] = {
    InvalidRequestError: "invalid_request",
    MethodNotFoundError: "method_not_found",
    InvalidParamsError: "invalid_params",
    InvalidTimestampError: "invalid_timestamp",
    HandlerNotFoundError: "handler_not_found",
    SkillNotFoundError: "skill_not_found",
    InternalError: "internal_error",
}
"""``error_type`` label of each error (spec 6.2); other errors use their class name."""


@dataclass(frozen=True)
class RequestMeta:
    """What the HTTP layer knows about a request that the protocol layer may use."""

    traceparent: str | None = None
    idempotency_key: str | None = None


def request_fingerprint(request: TaskRequest) -> str:
    """What makes two requests the same request, for idempotency."""
    material = [request.skill_id, request.conversation_id, request.input]
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _otel_trace_id(envelope: Envelope, meta: RequestMeta) -> str:
    """The W3C trace id this request joins, or a new one (spec 6.3)."""
    if meta.traceparent:
        match = _TRACEPARENT.match(meta.traceparent.strip())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    extensions = envelope.extensions or {}
    candidate = extensions.get("trace_id") or envelope.trace_id
    if isinstance(candidate, str) and _HEX32.match(candidate):
        return candidate
    return generate_trace_id()


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
        self.peers = settings.peer_urls()
        self.idempotency: IdempotencyStore = MemoryIdempotencyStore(
            settings.idempotency_ttl_seconds, settings.idempotency_max_entries
        )
        self.client: Any = None  # the shared ClientPool, set by the lifespan

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
            envelope = self.prepare(frame)
            payload_key = envelope.payload_key
            params_key = frame["params"].get("idempotency_key")
            if isinstance(params_key, str) and params_key:
                meta = replace(meta, idempotency_key=params_key)
            reply = await self.dispatch(envelope, meta)
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
        label = payload_label(payload_key)
        metrics = self.metrics
        status = "success" if error is None else "error"
        metrics.requests.labels(label, status).inc()
        metrics.request_duration.labels(label, status).observe(time.perf_counter() - started)
        if error is None:
            metrics.requests_success.labels(label).inc()
        else:
            error_type = ERROR_TYPES.get(type(error), type(error).__name__)
            metrics.requests_error.labels(label, error_type).inc()

    def internal_error(self, exc: BaseException) -> InternalError:
        """The -32603 reply; the exception stays in the log unless debug is on."""
        data: dict[str, Any] = {"error": "Internal server error"}
        if self.settings.debug:
            data["type"] = type(exc).__name__
            data["traceback"] = traceback.format_exception(exc)
        return InternalError(data)

    # -- one envelope --------------------------------------------------------------------

    def prepare(self, frame: Any) -> Envelope:
        """Frame, envelope and replay-window checks (spec 3.3 steps 7-13)."""
        raw = parse_frame(frame)
        try:
            envelope = Envelope.model_validate(raw)
        except ValidationError as exc:
            raise InvalidParamsError(
                {"error": "Invalid envelope structure", "validation_errors": validation_errors(exc)}
            ) from None
        self.check_timestamp(envelope)
        return envelope

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

    async def dispatch(self, envelope: Envelope, meta: RequestMeta) -> dict[str, Any]:
        """Route by normalized payload type (spec 1.4) and return the reply envelope."""
        if envelope.payload_key != "taskrequest":
            raise HandlerNotFoundError(envelope.payload_type)
        request: TaskRequest = envelope.payload
        spec = self.find_skill(request.skill_id)
        task_input = spec.parse_input(request.input)

        async def execute() -> IdempotencyRecord:
            task_id = generate_task_id()
            status, result = await self.run_skill(spec, task_input, envelope, request, task_id)
            return IdempotencyRecord(fingerprint, task_id, status.value, result)

        key = (request.config and request.config.idempotency_key) or meta.idempotency_key
        fingerprint = ""
        if key:
            fingerprint = request_fingerprint(request)
            record, replayed = await self.idempotency.run_once(
                f"{envelope.sender} {key}", fingerprint, execute
            )
            if replayed:
                self.metrics.idempotent_replays.inc()
                _log.info("asap.request.replayed", idempotency_key=key, task_id=record.task_id)
        else:
            record = await execute()
        return self.reply(
            envelope,
            meta,
            "task.response",
            {
                "task_id": record.task_id,
                "status": record.status,
                "result": record.result,
                "final_state": None,
                "metrics": None,
            },
        )

    def find_skill(self, skill_id: str) -> SkillSpec:
        """The skill named by a request, or :class:`SkillNotFoundError` listing what exists."""
        spec = self.registry.get(skill_id)
        if spec is None:
            raise SkillNotFoundError(skill_id, self.registry.ids())
        return spec

    def make_context(
        self, spec: SkillSpec, envelope: Envelope, request: TaskRequest, task_id: str
    ) -> Context:
        """The :class:`Context` a skill receives for one task."""
        timeout = self.task_timeout(request)
        logger = get_logger("asap.skill")
        return Context(
            task_id=task_id,
            conversation_id=request.conversation_id,
            trace_id=envelope.trace_id,
            skill_id=spec.id,
            envelope=envelope,
            agent_id=self.manifest.id,
            logger=logger,
            client=self.client,
            deadline=time.monotonic() + timeout if timeout else None,
            peers=self.peers,
            settings=self.settings,
        )

    def task_timeout(self, request: TaskRequest) -> int | None:
        """Seconds a task may run: the request's ``timeout_seconds``, else the agent default."""
        requested = request.config.timeout_seconds if request.config else None
        return requested or self.settings.task_timeout_seconds

    async def run_skill(
        self,
        spec: SkillSpec,
        task_input: Any,
        envelope: Envelope,
        request: TaskRequest,
        task_id: str,
    ) -> tuple[TaskStatus, dict[str, Any] | None]:
        """Run a skill; a raised exception becomes a ``failed`` task with a safe error."""
        ctx = self.make_context(spec, envelope, request, task_id)
        args = (task_input, ctx) if spec.takes_context else (task_input,)
        started = time.perf_counter()
        timeout = self.task_timeout(request)
        deadline_token = current_deadline.set(ctx.deadline)
        with bound_contextvars(
            trace_id=envelope.trace_id,
            correlation_id=envelope.id,
            skill_id=spec.id,
            task_id=task_id,
        ):
            limit = asyncio.timeout(timeout)
            try:
                async with limit:
                    if spec.is_async:
                        value = await spec.func(*args)
                    else:
                        # A thread cannot be stopped: past the deadline we answer and stop
                        # waiting, and the thread finishes on its own.
                        value = await run_in_threadpool(partial(spec.func, *args))
                result = spec.dump_output(value)
                status = TaskStatus.COMPLETED
            except TimeoutError as exc:
                if limit.expired():
                    _log.warning("asap.handler.timeout", timeout_seconds=timeout)
                    error = self.deadline_error(spec, timeout)
                else:  # the skill's own timeout, not our deadline
                    _log.exception("asap.handler.error", error_type=type(exc).__name__)
                    error = self.safe_error(exc)
                status, result = TaskStatus.FAILED, {"error": error}
            except TaskFailedError as exc:
                _log.warning("asap.handler.failed", error=exc.message)
                error = {"type": type(exc).__name__, "message": exc.message}
                status, result = TaskStatus.FAILED, {"error": error, **exc.result}
            except Exception as exc:
                _log.exception("asap.handler.error", error_type=type(exc).__name__)
                status, result = TaskStatus.FAILED, {"error": self.safe_error(exc)}
            finally:
                current_deadline.reset(deadline_token)
            elapsed = time.perf_counter() - started
            _log.info(
                "asap.request.processed", status=status.value, duration_ms=round(elapsed * 1000, 3)
            )
        label = payload_label(envelope.payload_key)
        self.metrics.handler_executions.labels(label).inc()
        self.metrics.handler_duration.labels(label).observe(elapsed)
        if status is TaskStatus.FAILED:
            self.metrics.handler_errors.labels(label).inc()
        return status, result

    def deadline_error(self, spec: SkillSpec, timeout: int | None) -> dict[str, Any]:
        """The error of a task cancelled at its deadline."""
        error = ASAPTimeoutError(
            f"Skill '{spec.id}' did not finish within {timeout} s and was cancelled",
            {"timeout_seconds": timeout},
        )
        return self.safe_error(error)

    def safe_error(self, exc: BaseException) -> dict[str, Any]:
        """What a caller learns about a skill's exception: type and message (traceback: debug)."""
        error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, ASAPError):
            error["code"] = exc.code
            error["rpc_code"] = exc.rpc_code
        if self.settings.debug:
            error["traceback"] = traceback.format_exception(exc)
        return error

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
            "timestamp": format_timestamp(datetime.now(UTC)),
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
        """``POST /asap/stream``: run a task and yield ``TaskStream`` chunks (spec 3.8).

        Must be primed by :meth:`prepare` (errors are answered before the stream starts).
        """
        envelope = self.prepare(frame)
        if envelope.payload_key != "taskrequest":
            raise HandlerNotFoundError(envelope.payload_type, streaming=True)
        request: TaskRequest = envelope.payload
        spec = self.find_skill(request.skill_id)
        task_input = spec.parse_input(request.input)
        return self._stream_task(spec, task_input, envelope, request, meta)

    async def _stream_task(
        self,
        spec: SkillSpec,
        task_input: Any,
        envelope: Envelope,
        request: TaskRequest,
        meta: RequestMeta,
    ) -> AsyncIterator[dict[str, Any]]:
        task_id = generate_task_id()
        trace = _otel_trace_id(envelope, meta)
        yield self.reply(
            envelope,
            meta,
            "TaskStream",
            {"chunk": "", "progress": 0.0, "final": False, "status": TaskStatus.WORKING.value},
            trace,
        )
        status, result = await self.run_skill(spec, task_input, envelope, request, task_id)
        try:
            final_chunk = orjson.dumps({"task_id": task_id, "result": result}).decode()
        except TypeError as exc:  # a skill returned something JSON cannot carry
            _log.exception("asap.response.unserializable")
            status = TaskStatus.FAILED
            error = {"error": self.safe_error(exc)}
            final_chunk = orjson.dumps({"task_id": task_id, "result": error}).decode()
        yield self.reply(
            envelope,
            meta,
            "TaskStream",
            {
                "chunk": final_chunk,
                "progress": 1.0,
                "final": True,
                "status": status.value,
            },
            trace,
        )

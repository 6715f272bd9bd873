"""OpenTelemetry spans, when the ``otel`` extra is installed and ``OTEL_*`` variables ask.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``console`` or ``otlp``) or an
``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set, and ``opentelemetry-sdk`` imports
(``pip install 'asap[otel]'``). Otherwise :func:`span` is a no-op context manager and nothing
of OpenTelemetry is imported: no cost.

Every task runs in a span ``asap.handler.execute`` (spec 6.3: attributes
``asap.payload_type``, ``asap.agent.urn``, ``asap.envelope.id``, plus ``asap.skill.id`` and
``asap.task.id``) whose parent is the caller's hop (``extensions.trace_id`` + ``span_id``,
which the agent fills from ``traceparent``), so an orchestration and its sub-tasks on other
agents form one tree. A sub-request names the current span as its parent
(:func:`current_span_id`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

__all__ = ["current_span_id", "enabled", "setup_tracing", "span"]

_tracer: Any = None


def _wanted() -> str | None:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter and exporter != "none":
        return exporter.split(",")[0].strip()
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return "otlp"
    return None


def setup_tracing(service_name: str) -> bool:
    """Configure the tracer once per process when the environment asks; True when on."""
    global _tracer
    if _tracer is not None:
        return True
    exporter_name = _wanted()
    if exporter_name is None:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        from asap.observability.logging import get_logger

        get_logger("asap.tracing").warning(
            "asap.tracing.unavailable", reason="pip install 'asap[otel]' to export spans"
        )
        return False
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if exporter_name == "console":  # one JSON object per line, on stderr (stdout: the logs)
        console = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda s: s.to_json(indent=None) + "\n"
        )
        provider.add_span_processor(SimpleSpanProcessor(console))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,  # the otel extra; not among the dev tools
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("asap")
    return True


_OFF: AbstractContextManager[None] = nullcontext()
"""What :func:`span` returns when tracing is off."""


def enabled() -> bool:
    """Whether spans are recorded (so that callers can skip building their attributes)."""
    return _tracer is not None


def span(
    name: str, extensions: dict[str, Any] | None, attributes: dict[str, Any]
) -> AbstractContextManager[None]:
    """A span under the caller's hop in ``extensions``; nothing when tracing is off."""
    return _OFF if _tracer is None else _span(name, extensions, attributes)


@contextmanager
def _span(
    name: str, extensions: dict[str, Any] | None, attributes: dict[str, Any]
) -> Iterator[None]:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    assert _tracer is not None
    context = None
    trace_id, span_id = (extensions or {}).get("trace_id"), (extensions or {}).get("span_id")
    if isinstance(trace_id, str) and len(trace_id) == 32:
        # no span id: a root; a parent that names only the trace keeps its trace id
        parent = int(span_id, 16) if isinstance(span_id, str) and len(span_id) == 16 else 1
        remote = SpanContext(int(trace_id, 16), parent, True, TraceFlags(TraceFlags.SAMPLED))
        context = trace.set_span_in_context(NonRecordingSpan(remote))
    clean = {k: v for k, v in attributes.items() if v is not None}
    with _tracer.start_as_current_span(name, context=context, attributes=clean):
        yield


def current_span_id() -> str | None:
    """The current span's id (16 hex) while tracing, for a sub-request's parent; else None."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    current = trace.get_current_span().get_span_context()
    return f"{current.span_id:016x}" if current.is_valid else None

"""Prometheus metrics of one agent, served at ``GET /asap/metrics`` (spec 6.2).

Metric names are the reference's. Each app owns its registry (no process-global collector),
and histogram buckets are cumulative once, as Prometheus defines them.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# One ``_total`` sample per counter, as the reference prints; no ``_created`` series.
disable_created_metrics()  # type: ignore[no-untyped-call]

_CANONICAL = {"taskrequest": "task.request"}


def payload_label(payload_key: str | None) -> str:
    """The ``payload_type`` label: the canonical name of a handled type, else ``other``."""
    return _CANONICAL.get(payload_key or "", "other")


class Metrics:
    """The counters and histograms of one agent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self.requests = Counter(
            "asap_requests",
            "Total number of ASAP requests received",
            ["payload_type", "status"],
            registry=registry,
        )
        self.requests_success = Counter(
            "asap_requests_success",
            "Total number of successful ASAP requests",
            ["payload_type"],
            registry=registry,
        )
        self.requests_error = Counter(
            "asap_requests_error",
            "Total number of failed ASAP requests",
            ["payload_type", "error_type"],
            registry=registry,
        )
        self.handler_executions = Counter(
            "asap_handler_executions",
            "Total number of handler executions",
            ["payload_type"],
            registry=registry,
        )
        self.handler_errors = Counter(
            "asap_handler_errors",
            "Total number of handler execution failures",
            ["payload_type"],
            registry=registry,
        )
        self.parse_errors = Counter(
            "asap_parse_errors",
            "Total number of request bodies that were not JSON",
            registry=registry,
        )
        self.auth_failures = Counter(
            "asap_auth_failures",
            "Requests refused for a missing or wrong bearer token",
            registry=registry,
        )
        self.sender_mismatch = Counter(
            "asap_sender_mismatch",
            "Requests whose envelope sender was not the authenticated agent",
            registry=registry,
        )
        self.invalid_nonce = Counter(
            "asap_invalid_nonce",
            "Envelopes refused for a missing, malformed or replayed nonce",
            registry=registry,
        )
        self.rate_limited = Counter(
            "asap_rate_limit_exceeded",
            "Requests refused by the rate limit (HTTP 429)",
            registry=registry,
        )
        self.overloaded = Counter(
            "asap_thread_pool_exhausted",
            "Requests refused because the agent ran its maximum of concurrent tasks",
            registry=registry,
        )
        self.idempotent_replays = Counter(
            "asap_idempotent_replays",
            "Requests answered from a stored outcome",
            registry=registry,
        )
        self.request_duration = Histogram(
            "asap_request_duration_seconds",
            "Time to answer an ASAP request",
            ["payload_type", "status"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.handler_duration = Histogram(
            "asap_handler_duration_seconds",
            "Time spent in skills",
            ["payload_type"],
            buckets=BUCKETS,
            registry=registry,
        )
        started = time.monotonic()
        uptime = Gauge(
            "asap_process_uptime_seconds", "Seconds since the agent started", registry=registry
        )
        uptime.set_function(lambda: round(time.monotonic() - started, 3))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

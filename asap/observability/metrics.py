"""Prometheus metrics of one agent, served at ``GET /asap/metrics`` (spec 6.2).

The reference's metric names are kept, and more are added: skills by outcome and their
latency, tasks in flight, client retries and circuit breakers, orchestration fan-out (see
``docs/metrics.md``). Histogram buckets are cumulative once, as Prometheus defines them.

Each app owns its registry (no process-global collector), so the apps a test process creates
never see each other's counts.

Several worker processes serving one port (``uvicorn --workers N``) would each answer a
scrape with its own counts only. With ``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory
in the environment of every worker before they start, prometheus-client's multiprocess mode
is used: each process writes its values to files there, and a scrape answered by any worker
aggregates the files of all of them.

In a single process (the default) the per-request counts and latencies are held in plain
Python and added to the Prometheus metrics when a scrape asks for them, or every
:data:`HOLD_MAX` requests: a request then costs a list append instead of a dozen locked
increments. In multiprocess mode every value is written as it happens, since a scrape may be
answered by another worker.
"""

from __future__ import annotations

import glob
import math
import os
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = [
    "CONTENT_TYPE",
    "FAN_OUT_BUCKETS",
    "MULTIPROC_ENV",
    "SKILL_BUCKETS",
    "Metrics",
    "prune_dead_processes",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""The reference's buckets, kept for its histograms."""
SKILL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Skill latency from 1 ms (an echo) to 60 s (a long task; longer ones land in +Inf)."""
FAN_OUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
"""Sub-requests per orchestration, up to the ceiling of steps in a plan."""
HOLD_MAX = 1024
"""Requests whose counts a single process holds before adding them to its metrics."""
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
"""The value of ``asap_circuit_breaker_state`` for each state."""

# One ``_total`` sample per counter, as the reference prints; no ``_created`` series.
disable_created_metrics()  # type: ignore[no-untyped-call]

_CANONICAL = {"taskrequest": "task.request"}
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


def payload_label(payload_key: str | None) -> str:
    """The ``payload_type`` label: the canonical name of a handled type, else ``other``."""
    return _CANONICAL.get(payload_key or "", "other")


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process writes its values there, else None.

    prometheus-client chooses at import time from ``PROMETHEUS_MULTIPROC_DIR``: the variable
    must be in the environment before the process starts (as uvicorn's workers inherit it).
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(MULTIPROC_ENV) or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def prune_dead_processes(path: str) -> list[int]:
    """Forget the live gauges (tasks in flight, breaker states) of processes that are gone,
    e.g. a worker killed and replaced by uvicorn; their counters and histograms stay, as
    Prometheus counters must not go down. Returns the pids pruned."""
    pruned = []
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.search(name)
        if match is None:
            continue
        pid = int(match[1])
        if pid != os.getpid() and pid not in pruned and not _alive(pid):
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
            pruned.append(pid)
    return pruned


class _Uptime:
    """``asap_process_uptime_seconds`` of the process answering the scrape (3 decimals)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        uptime = GaugeMetricFamily("asap_process_uptime_seconds", "Seconds since the agent started")
        uptime.add_metric([], round(time.monotonic() - self.started, 3))
        yield uptime


class _Held:
    """The counters and histograms one kind of request feeds, and the latencies of the
    requests not yet added to them."""

    __slots__ = ("counters", "histograms", "seconds")

    def __init__(self, counters: tuple[Any, ...], histograms: tuple[Any, ...]) -> None:
        self.counters, self.histograms = counters, histograms
        self.seconds: list[float] = []

    def add(self) -> None:
        seconds, self.seconds = self.seconds, []
        for counter in self.counters:
            counter.inc(len(seconds))
        for histogram in self.histograms:
            _observe_all(histogram, seconds)


def _observe_all(histogram: Any, amounts: list[float]) -> None:
    """``histogram.observe`` for each amount: one increment per bucket hit and one of the sum
    through prometheus-client's bucket values when it has them (as it has had for years),
    else one ``observe`` each."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for amount in amounts:
            histogram.observe(amount)
        return
    hits = [0] * len(bounds)
    for amount in amounts:
        hits[bisect_left(bounds, amount)] += 1  # the first bound >= amount (+Inf is last)
    for bucket, count in zip(buckets, hits, strict=True):
        if count:
            bucket.inc(count)
    total.inc(math.fsum(amounts))


class Metrics:
    """The counters, histograms and gauges of one agent."""

    def __init__(self) -> None:
        # Labelled children looked up once per label set (label values come from bounded
        # sets: payload types, error classes, registered skills): ``labels()`` costs more
        # than the increment itself, several times per request.
        self._answered: dict[tuple[str, str | None], _Held] = {}
        self._finished: dict[tuple[str, str], _Held] = {}
        self._holding = 0
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir:
            os.makedirs(self.multiprocess_dir, exist_ok=True)
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
        # -- skills and tasks --------------------------------------------------------------
        self.skill_requests = Counter(
            "asap_skill_requests",
            "Skill runs by skill and outcome (completed, failed, cancelled, timeout)",
            ["skill", "outcome"],
            registry=registry,
        )
        self.skill_duration = Histogram(
            "asap_skill_duration_seconds",
            "Time a skill ran, whatever its outcome",
            ["skill"],
            buckets=SKILL_BUCKETS,
            registry=registry,
        )
        self.tasks_in_flight = Gauge(
            "asap_tasks_in_flight",
            "Tasks running in the agent (all worker processes)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # -- outgoing calls (the agent's client pool) --------------------------------------
        self.transport_retries = Counter(
            "asap_transport_retries",
            "Requests to peers sent again after a failure a resend can cure",
            ["target", "reason"],
            registry=registry,
        )
        self.circuit_transitions = Counter(
            "asap_circuit_breaker_transitions",
            "Circuit breaker state changes per peer",
            ["target", "from_state", "to_state"],
            registry=registry,
        )
        self.circuit_state = Gauge(
            "asap_circuit_breaker_state",
            "Circuit breaker state per peer: 0 closed, 1 half-open, 2 open (the worst "
            "among worker processes)",
            ["target"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.orchestration_fan_out = Histogram(
            "asap_orchestration_fan_out",
            "Sub-requests an orchestration sends to peers (its unfinished steps)",
            ["mode"],
            buckets=FAN_OUT_BUCKETS,
            registry=registry,
        )
        self._uptime = _Uptime()
        registry.register(self._uptime)

    # -- recording helpers -----------------------------------------------------------------

    def request_answered(self, payload_type: str, seconds: float, error: str | None) -> None:
        """One JSON-RPC request answered, with the ``error_type`` label of its error if any."""
        held = self._answered.get((payload_type, error))
        if held is None:
            status = "success" if error is None else "error"
            held = _Held(
                (
                    self.requests.labels(payload_type, status),
                    self.requests_success.labels(payload_type)
                    if error is None
                    else self.requests_error.labels(payload_type, error),
                ),
                (self.request_duration.labels(payload_type, status),),
            )
            self._answered[(payload_type, error)] = held
        self._record(held, seconds)

    def skill_finished(self, skill: str, outcome: str, seconds: float) -> None:
        """One skill run (a ``task.request``) ended with ``outcome`` after ``seconds``."""
        held = self._finished.get((skill, outcome))
        if held is None:
            counters = [
                self.handler_executions.labels("task.request"),
                self.skill_requests.labels(skill, outcome),
            ]
            if outcome in ("failed", "timeout"):
                counters.append(self.handler_errors.labels("task.request"))
            histograms = (
                self.handler_duration.labels("task.request"),
                self.skill_duration.labels(skill),
            )
            held = _Held(tuple(counters), histograms)
            self._finished[(skill, outcome)] = held
        self._record(held, seconds)

    def _record(self, held: _Held, seconds: float) -> None:
        held.seconds.append(seconds)
        if self.multiprocess_dir:  # another worker may answer the next scrape: write now
            held.add()
            return
        self._holding += 1
        if self._holding >= HOLD_MAX:
            self.add_held()

    def add_held(self) -> None:
        """Add the counts and latencies held since the last call to the metrics."""
        self._holding = 0
        for held in (*self._answered.values(), *self._finished.values()):
            if held.seconds:
                held.add()

    def track_in_flight(self, count: Callable[[], int]) -> None:
        """``asap_tasks_in_flight`` is ``count()`` at each scrape (in multiprocess mode, the
        caller sets it on every change instead: a scrape may read another worker's files)."""
        if not self.multiprocess_dir:
            self.tasks_in_flight.set_function(count)

    def transport_retry(self, target: str, reason: str) -> None:
        """The client sends a request to ``target`` again after ``reason``."""
        self.transport_retries.labels(target, reason).inc()

    def circuit_changed(self, target: str, old: str | None, new: str) -> None:
        """The breaker of ``target`` moved from ``old`` to ``new`` (``old`` None: created)."""
        if old is not None:
            self.circuit_transitions.labels(target, old, new).inc()
        self.circuit_state.labels(target).set(CIRCUIT_STATES[new])

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (of every worker process in
        multiprocess mode)."""
        self.add_held()
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        prune_dead_processes(self.multiprocess_dir)
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(self._uptime)
        return generate_latest(registry)

    def close(self) -> None:
        """The agent stops: in multiprocess mode, drop this process's live gauges (its tasks
        in flight and breaker states) from the aggregate."""
        if self.multiprocess_dir:
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]

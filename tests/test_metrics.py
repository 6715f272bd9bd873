"""Metrics at ``GET /asap/metrics`` (docs/metrics.md): skills by outcome and latency, tasks in
flight, client retries and circuit breakers, orchestration fan-out.

Real processes: a 2-worker ``uvicorn --workers 2`` agent in multiprocess mode, whose every
scrape (answered by either worker) must report exactly what both served; an orchestrator
calling a worker that answers HTTP 500 on demand. In-process: apps never share counts, and
the timeout and cancelled outcomes.
"""

from __future__ import annotations

import asyncio
import glob
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from asap.observability.metrics import (
    FAN_OUT_BUCKETS,
    HOLD_MAX,
    SKILL_BUCKETS,
    _observe_all,
    prune_dead_processes,
)
from asap.process import AgentProcess, free_port
from asap.transport.app import create_app
from tests.conftest import echo_settings, serve_in_process

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SKILLS = "skills.echo,tests.agent_skills"


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; a series never created counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def histogram(samples: Samples, name: str, **labels: str) -> tuple[list[float], list[float]]:
    """``(bounds, cumulative counts)`` of one histogram series, in bucket order."""
    fixed = set(labels.items())
    buckets = sorted(
        (float(dict(key)["le"]), count)
        for (sample, key), count in samples.items()
        if sample == name + "_bucket" and fixed <= key and len(key) == len(fixed) + 1
    )
    return [bound for bound, _ in buckets], [count for _, count in buckets]


def check_histogram(samples: Samples, name: str, count: float, **labels: str) -> list[float]:
    """Buckets cumulative once (never more than the count), +Inf equal to ``_count``."""
    bounds, counts = histogram(samples, name, **labels)
    assert counts == sorted(counts), (name, labels, counts)
    assert math.isinf(bounds[-1]) and counts[-1] == count, (name, labels, bounds, counts)
    assert value(samples, name + "_count", **labels) == count
    return bounds


def task_frame(skill: str, data: dict[str, Any], rid: Any = "m", **config: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"conversation_id": "c-metrics", "skill_id": skill, "input": data}
    if config:
        payload["config"] = config
    return rpc("task.request", payload, rid)


def rpc(payload_type: str, payload: dict[str, Any], rid: Any = "m") -> dict[str, Any]:
    envelope = {
        "asap_version": "0.1",
        "sender": "urn:asap:agent:metrics-test",
        "recipient": "urn:asap:agent:agent",
        "payload_type": payload_type,
        "payload": payload,
    }
    return {"jsonrpc": "2.0", "method": "asap.send", "params": {"envelope": envelope}, "id": rid}


def task_payload(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    reply = response.json()
    assert "result" in reply, reply
    return reply["result"]["envelope"]["payload"]  # type: ignore[no-any-return]


# -- in-process: one registry per app ------------------------------------------------------------


async def test_apps_in_one_process_never_share_counts() -> None:
    settings = echo_settings()
    async with (
        serve_in_process(create_app(settings)) as one,
        serve_in_process(create_app(settings)) as other,
    ):
        for i in range(3):
            assert task_payload(await one.post("/asap", json=task_frame("echo", {"i": i})))
        mine = parse((await one.get("/asap/metrics")).text)
        theirs = parse((await other.get("/asap/metrics")).text)
    labels = {"payload_type": "task.request", "status": "success"}
    assert value(mine, "asap_requests_total", **labels) == 3
    assert value(mine, "asap_skill_requests_total", skill="echo", outcome="completed") == 3
    bounds = check_histogram(mine, "asap_skill_duration_seconds", 3, skill="echo")
    assert bounds == [*SKILL_BUCKETS, math.inf]
    assert value(theirs, "asap_requests_total", **labels) == 0
    assert value(theirs, "asap_skill_requests_total", skill="echo", outcome="completed") == 0
    assert value(theirs, "asap_tasks_in_flight") == 0


async def test_held_counts_reach_the_metrics_at_a_scrape_and_past_the_hold_limit() -> None:
    # A single process holds per-request counts in plain Python: none may be lost or added,
    # whether a scrape asks for them or HOLD_MAX requests push them out in between.
    settings = echo_settings(rate_limit="off")
    labels = {"payload_type": "task.request", "status": "success"}
    async with serve_in_process(create_app(settings)) as agent:
        for i in range(5):
            assert task_payload(await agent.post("/asap", json=task_frame("echo", {"i": i})))
        first = parse((await agent.get("/asap/metrics")).text)
        for i in range(HOLD_MAX + 7):
            assert task_payload(await agent.post("/asap", json=task_frame("echo", {"i": i})))
        second = parse((await agent.get("/asap/metrics")).text)
    assert value(first, "asap_requests_total", **labels) == 5
    check_histogram(first, "asap_skill_duration_seconds", 5, skill="echo")
    total = 5 + HOLD_MAX + 7
    assert value(second, "asap_requests_total", **labels) == total
    assert value(second, "asap_requests_success_total", payload_type="task.request") == total
    assert value(second, "asap_handler_executions_total", payload_type="task.request") == total
    check_histogram(second, "asap_request_duration_seconds", total, **labels)
    check_histogram(second, "asap_handler_duration_seconds", total, payload_type="task.request")
    check_histogram(second, "asap_skill_duration_seconds", total, skill="echo")
    assert value(second, "asap_skill_duration_seconds_sum", skill="echo") > 0


def test_held_latencies_land_in_the_buckets_observe_would_choose() -> None:
    amounts = [0.0, 0.0005, 0.001, 0.0010001, 0.25, 0.2499, 59.9, 60.0, 61.0, 1e9, 0.003] * 3
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    observed = Histogram("h", "h", buckets=SKILL_BUCKETS, registry=one_by_one)
    held = Histogram("h", "h", buckets=SKILL_BUCKETS, registry=at_once)
    for amount in amounts:
        observed.observe(amount)
    _observe_all(held, amounts[:10])
    _observe_all(held, amounts[10:])
    assert generate_latest(at_once) == generate_latest(one_by_one)


async def test_timeout_and_cancelled_outcomes() -> None:
    settings = echo_settings(skills=tuple(SKILLS.split(",")))
    async with serve_in_process(create_app(settings)) as agent:
        late = task_frame("sleep", {"seconds": 30}, timeout_seconds=1)
        assert task_payload(await agent.post("/asap", json=late))["status"] == "failed"
        slow = task_frame("progress", {"steps": 200, "seconds": 0.05})
        started = await agent.post("/asap", json=slow, headers={"prefer": "respond-async"})
        task_id = task_payload(started)["task_id"]
        query = rpc("state.query", {"task_id": task_id})
        deadline = time.monotonic() + 10
        while not task_payload(await agent.post("/asap", json=query))["metrics"]:
            assert time.monotonic() < deadline, "the skill never reported progress"
            await asyncio.sleep(0.01)  # poll until the skill runs (it reports every step)
        running = parse((await agent.get("/asap/metrics")).text)
        assert value(running, "asap_tasks_in_flight") == 1
        cancel = rpc("task.cancel", {"task_id": task_id})
        assert task_payload(await agent.post("/asap", json=cancel))["status"] == "cancelled"
        done = parse((await agent.get("/asap/metrics")).text)
    assert value(done, "asap_skill_requests_total", skill="sleep", outcome="timeout") == 1
    assert value(done, "asap_skill_requests_total", skill="progress", outcome="cancelled") == 1
    assert value(done, "asap_skill_requests_total", skill="sleep", outcome="failed") == 0
    bounds, counts = histogram(done, "asap_skill_duration_seconds", skill="sleep")
    assert counts[bounds.index(0.5)] == 0 and counts[bounds.index(2.5)] == 1  # the timeout, 1 s
    assert value(done, "asap_tasks_in_flight") == 0


def test_live_gauges_of_dead_processes_are_pruned(tmp_path: Path) -> None:
    """A worker killed without shutting down leaves its live gauge files; a scrape drops them
    (not its counters)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in (f"gauge_livesum_{gone.pid}.db", f"counter_{gone.pid}.db"):
        (tmp_path / name).touch()
    (tmp_path / f"gauge_livesum_{os.getpid()}.db").touch()
    assert prune_dead_processes(str(tmp_path)) == [gone.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db"]
    )


# -- two worker processes on one port ------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, Path]]:
    """``uvicorn asap.server:app --workers 2`` with ``PROMETHEUS_MULTIPROC_DIR``."""
    base = tmp_path_factory.mktemp("metrics-workers")
    shared = base / "prometheus"
    shared.mkdir()
    port = free_port()
    agent = AgentProcess(
        ["-m", "uvicorn", "asap.server:app", "--workers", "2", "--port", str(port)],
        port,
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(shared),
            "ASAP_STORAGE_URL": "memory://",
            "ASAP_RATE_LIMIT": "off",
            "ASAP_SKILLS": SKILLS,
            "ASAP_LOG_LEVEL": "WARNING",
        },
        log_path=base / "agent.log",
    )
    with agent:
        yield agent, shared


async def scrape(url: str) -> Samples:
    """One scrape on a new connection (so that either worker may answer it)."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + "/asap/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def send_all(url: str, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every frame at once, each on its own connection."""

    async def one(frame: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            return task_payload(await client.post(url + "/asap", json=frame))

    return list(await asyncio.gather(*(one(frame) for frame in frames)))


def served_by_pid(shared: Path, skill: str) -> dict[str, float]:
    """Runs of ``skill`` recorded in each process's own counter file."""
    served = {}
    for path in glob.glob(str(shared / "counter_*.db")):
        pid = Path(path).stem.split("_")[1]
        families = MultiProcessCollector.merge([path])  # type: ignore[no-untyped-call]
        merged = {m.name: m for m in families}
        family = merged.get("asap_skill_requests")
        served[pid] = sum(
            s.value for s in (family.samples if family else []) if s.labels.get("skill") == skill
        )
    return served


async def test_every_scrape_counts_the_requests_of_both_workers(
    workers: tuple[AgentProcess, Path],
) -> None:
    agent, shared = workers
    request_labels = {"payload_type": "task.request", "status": "success"}
    before = value(await scrape(agent.url), "asap_requests_total", **request_labels)
    sent = 0
    deadline = time.monotonic() + 20
    while True:  # rounds of 20 on new connections, until both workers have served some
        replies = await send_all(
            agent.url, [task_frame("greet", {"name": f"n{sent + i}"}) for i in range(20)]
        )
        assert {r["status"] for r in replies} == {"completed"}
        sent += 20
        served = served_by_pid(shared, "greet")
        if len(served) == 2 and all(served.values()):
            break
        assert time.monotonic() < deadline, f"one worker served everything: {served}"
    failed = await send_all(agent.url, [task_frame("fail", {}) for _ in range(5)])
    assert {r["status"] for r in failed} == {"failed"}
    assert sum(served_by_pid(shared, "greet").values()) == sent

    for _ in range(3):  # each scrape may hit either worker: all report the same totals
        scrapes = await asyncio.gather(*(scrape(agent.url) for _ in range(4)))
        for samples in scrapes:
            total = value(samples, "asap_requests_total", **request_labels)
            assert total - before == sent + 5
            assert value(samples, "asap_requests_success_total", payload_type="task.request") == (
                total
            )
            completed = value(
                samples, "asap_skill_requests_total", skill="greet", outcome="completed"
            )
            assert completed == sent
            assert value(samples, "asap_skill_requests_total", skill="fail", outcome="failed") == 5
            assert value(samples, "asap_skill_requests_total", skill="greet", outcome="failed") == 0
            bounds = check_histogram(samples, "asap_skill_duration_seconds", sent, skill="greet")
            assert bounds == [*SKILL_BUCKETS, math.inf]
            check_histogram(samples, "asap_skill_duration_seconds", 5, skill="fail")
            assert value(samples, "asap_tasks_in_flight") == 0
            assert ("asap_process_uptime_seconds", frozenset()) in samples


async def test_tasks_in_flight_add_up_across_workers(workers: tuple[AgentProcess, Path]) -> None:
    agent, _ = workers
    assert value(await scrape(agent.url), "asap_tasks_in_flight") == 0
    sleepers = asyncio.ensure_future(
        send_all(agent.url, [task_frame("sleep", {"seconds": 2}) for _ in range(3)])
    )
    seen = []
    while not sleepers.done():  # poll while they sleep
        seen.append(value(await scrape(agent.url), "asap_tasks_in_flight"))
        if seen[-1] == 3:
            break
    assert seen and seen[-1] == 3, seen
    assert [r["status"] for r in await sleepers] == ["completed"] * 3
    deadline = time.monotonic() + 10
    while (in_flight := value(await scrape(agent.url), "asap_tasks_in_flight")) != 0:
        assert time.monotonic() < deadline, in_flight
        await asyncio.sleep(0.02)


# -- the orchestrator's client: retries, circuit breaker, fan-out --------------------------------


@pytest.fixture(scope="module")
def orchestration(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    """A flaky worker and an orchestrator (breaker: 2 failures, 0.3 s) calling it."""
    logs = tmp_path_factory.mktemp("metrics-orchestration")
    shared = logs / "prometheus"
    shared.mkdir()
    port = free_port()
    worker = AgentProcess(
        ["-m", "uvicorn", "asap.examples.flaky_worker:app", "--port", str(port)],
        port,
        env={"ASAP_AGENT_ID": "urn:asap:agent:worker", "ASAP_LOG_LEVEL": "WARNING"},
        log_path=logs / "worker.log",
    ).start(wait=False)
    port = free_port()
    orchestrator = AgentProcess(
        ["-m", "uvicorn", "asap.server:app", "--port", str(port)],
        port,
        env={
            "ASAP_AGENT_ID": "urn:asap:agent:orchestrator",
            "ASAP_PEERS": f"worker={worker.url}",
            "ASAP_CLIENT_MAX_RETRIES": "3",
            "ASAP_CLIENT_BASE_DELAY": "0.01",
            "ASAP_CLIENT_BREAKER_THRESHOLD": "2",
            "ASAP_CLIENT_BREAKER_TIMEOUT": "0.3",
            "ASAP_LOG_LEVEL": "WARNING",
            "PROMETHEUS_MULTIPROC_DIR": str(shared),  # one worker process: also valid
        },
        log_path=logs / "orchestrator.log",
    ).start(wait=False)
    try:
        worker.wait_ready()
        orchestrator.wait_ready()
        yield orchestrator, worker
    finally:
        orchestrator.stop()
        worker.stop()


async def orchestrate(orchestrator: AgentProcess, mode: str, steps: int) -> str:
    plan = {
        "mode": mode,
        "steps": [
            {"id": f"s{i}", "peer": "worker", "skill": "work", "input": {"tag": f"s{i}"}}
            for i in range(steps)
        ],
    }
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            orchestrator.url + "/asap", json=task_frame("orchestrate", plan)
        )
    return str(task_payload(response)["status"])


async def test_retries_breaker_transitions_and_fan_out(
    orchestration: tuple[AgentProcess, AgentProcess],
) -> None:
    orchestrator, worker = orchestration
    target = worker.url

    def faults(**settings: int) -> None:
        httpx.post(worker.url + "/_faults", json=settings).raise_for_status()

    def transitions(samples: Samples, old: str, new: str) -> float:
        labels = {"target": target, "from_state": old, "to_state": new}
        return value(samples, "asap_circuit_breaker_transitions_total", **labels)

    faults()
    assert await orchestrate(orchestrator, "parallel", 5) == "completed"
    samples = await scrape(orchestrator.url)
    bounds = check_histogram(samples, "asap_orchestration_fan_out", 1, mode="parallel")
    assert bounds == [*map(float, FAN_OUT_BUCKETS), math.inf]
    assert value(samples, "asap_orchestration_fan_out_sum", mode="parallel") == 5
    assert value(samples, "asap_circuit_breaker_state", target=target) == 0  # closed
    assert value(samples, "asap_transport_retries_total", target=target, reason="HTTP 500") == 0

    # One logical call: 3 attempts answered 500 = 2 retries, 1 breaker failure (of 2).
    faults(http_500=3)
    assert await orchestrate(orchestrator, "sequential", 1) == "failed"
    samples = await scrape(orchestrator.url)
    assert value(samples, "asap_transport_retries_total", target=target, reason="HTTP 500") == 2
    assert value(samples, "asap_circuit_breaker_state", target=target) == 0
    assert transitions(samples, "closed", "open") == 0

    faults(http_500=3)  # the second failure opens the circuit
    assert await orchestrate(orchestrator, "sequential", 1) == "failed"
    samples = await scrape(orchestrator.url)
    assert value(samples, "asap_transport_retries_total", target=target, reason="HTTP 500") == 4
    assert value(samples, "asap_circuit_breaker_state", target=target) == 2  # open
    assert transitions(samples, "closed", "open") == 1

    # Open: calls fail at once, without retries, until a probe after 0.3 s closes it.
    deadline = time.monotonic() + 15
    attempts = 0
    while await orchestrate(orchestrator, "sequential", 1) != "completed":
        attempts += 1
        assert time.monotonic() < deadline, "the circuit never closed"
        await asyncio.sleep(0.05)
    samples = await scrape(orchestrator.url)
    assert transitions(samples, "open", "half_open") == 1
    assert transitions(samples, "half_open", "closed") == 1
    assert transitions(samples, "half_open", "open") == 0
    assert value(samples, "asap_circuit_breaker_state", target=target) == 0
    assert value(samples, "asap_transport_retries_total", target=target, reason="HTTP 500") == 4
    fan_out = 3 + attempts  # every sequential orchestration sent its one step
    check_histogram(samples, "asap_orchestration_fan_out", fan_out, mode="sequential")

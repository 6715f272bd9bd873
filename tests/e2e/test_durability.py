"""Durability with real processes: an orchestrator killed mid-plan resumes and finishes with
every step run exactly once; two agent processes sharing Redis behave as one agent."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asap.models.ids import generate_id
from asap.process import AgentProcess, free_port
from tests.conftest import asap_send, delete_redis_keys

pytestmark = pytest.mark.e2e


def rpc(url: str, payload_type: str, payload: dict[str, Any], **headers: str) -> dict[str, Any]:
    body = asap_send(payload_type, payload, recipient="urn:asap:agent:orchestrator")
    reply = httpx.post(url + "/asap", json=body, headers=headers, timeout=30).json()
    assert "result" in reply, reply
    return reply["result"]["envelope"]["payload"]  # type: ignore[no-any-return]


def poll(url: str, task_id: str, until: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = rpc(url, "state.query", {"task_id": task_id})
        if until(state):
            return state
        assert time.monotonic() < deadline, f"timed out waiting on {task_id}: {state}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    logs = tmp_path_factory.mktemp("workers")
    started = []
    try:
        for name in ("worker-a", "worker-b"):
            port = free_port()
            started.append(
                AgentProcess(
                    ["-m", "uvicorn", "asap.examples.flaky_worker:app", "--port", str(port)],
                    port,
                    env={
                        "ASAP_AGENT_ID": f"urn:asap:agent:{name}",
                        "ASAP_STORAGE_URL": "memory://",
                    },
                    log_path=logs / f"{name}.log",
                ).start(wait=False)
            )
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        for worker in started:
            worker.stop()


def test_killed_orchestrator_resumes_and_runs_every_step_once(
    workers: list[AgentProcess], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "ASAP_AGENT_ID": "urn:asap:agent:orchestrator",
        "ASAP_SKILLS": "skills.orchestrator",
        "ASAP_PEERS": f"worker-a={workers[0].url},worker-b={workers[1].url}",
        "ASAP_STORAGE_URL": f"sqlite:///{tmp_path}/orchestrator.db",
        "ASAP_TASK_LEASE_SECONDS": "1",
        "ASAP_CLIENT_BASE_DELAY": "0.05",
    }
    command = ["-m", "uvicorn", "asap.server:app", "--port", str(port)]
    steps = [
        {
            "id": f"s{n}",
            "peer": ("worker-a", "worker-b")[n % 2],
            "skill": "work",
            "input": {"tag": f"s{n}", "seconds": 0.25},
        }
        for n in range(8)
    ]
    first = AgentProcess(command, port, env=env, log_path=tmp_path / "first.log").start()
    try:
        started = rpc(
            first.url,
            "task.request",
            {
                "conversation_id": "crash",
                "skill_id": "orchestrate",
                "input": {"mode": "sequential", "steps": steps},
            },
            prefer="respond-async",
        )
        task_id = started["task_id"]
        assert started["status"] == "working"
        poll(
            first.url,
            task_id,
            lambda s: (
                s["final_state"] is not None and len(s["final_state"]["data"]["results"]) >= 3
            ),
        )
        first.kill()  # SIGKILL mid-plan
    finally:
        first.stop()
    second = AgentProcess(command, port, env=env, log_path=tmp_path / "second.log").start()
    try:
        final = poll(second.url, task_id, lambda s: s["status"] in ("completed", "failed"))
    finally:
        second.stop()
    assert final["status"] == "completed", final["result"]
    assert [s["status"] for s in final["result"]["steps"]] == ["completed"] * 8
    assert final["result"]["state"]["completed"] is True
    executions: dict[str, int] = {}
    for worker in workers:
        for tag, count in httpx.get(worker.url + "/_faults").json()["executions"].items():
            executions[tag] = executions.get(tag, 0) + count
    assert executions == {f"s{n}": 1 for n in range(8)}
    assert "asap.tasks.resuming" in (tmp_path / "second.log").read_text()


def redis_available() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_two_processes_on_redis_are_one_agent(tmp_path: Path) -> None:
    if not redis_available():
        if os.environ.get("CI"):
            pytest.fail("Redis is not reachable on 127.0.0.1:6379")
        pytest.skip("Redis is not reachable on 127.0.0.1:6379 (start it to run this test)")
    prefix = f"asap-test-{generate_id()}:"
    env = {
        "ASAP_STORAGE_URL": f"redis://127.0.0.1:6379/0?prefix={prefix}",
        "ASAP_SKILLS": "skills.echo,tests.agent_skills",
        "ASAP_TASK_LEASE_SECONDS": "1",
    }
    agents = []
    try:
        for name in ("a", "b"):
            port = free_port()
            agents.append(
                AgentProcess(
                    ["-m", "uvicorn", "asap.server:app", "--port", str(port)],
                    port,
                    env=env,
                    log_path=tmp_path / f"{name}.log",
                ).start(wait=False)
            )
        for agent in agents:
            agent.wait_ready()
        a, b = agents
        started = rpc(
            a.url,
            "task.request",
            {
                "conversation_id": "shared",
                "skill_id": "progress",
                "input": {"steps": 100, "seconds": 0.1},
            },
            prefer="respond-async",
        )
        task_id = started["task_id"]
        seen = poll(b.url, task_id, lambda s: s["final_state"] is not None)
        assert seen["status"] == "working"
        cancelled = rpc(b.url, "task.cancel", {"task_id": task_id})
        assert cancelled["status"] == "cancelled"
        after_a = rpc(a.url, "state.query", {"task_id": task_id})
        assert after_a["status"] == "cancelled"
        version = after_a["final_state"]["version"]
        time.sleep(0.3)  # a cancelled task writes no more checkpoints
        assert rpc(a.url, "state.query", {"task_id": task_id})["final_state"]["version"] == version
        # idempotency is shared too: the same key through the other process runs once
        body = {
            "conversation_id": "k",
            "skill_id": "echo",
            "input": {"n": 1},
            "config": {"idempotency_key": "shared-key"},
        }
        one = rpc(a.url, "task.request", body)
        two = rpc(b.url, "task.request", body)
        assert one["task_id"] == two["task_id"]
    finally:
        for agent in agents:
            agent.stop()
        delete_redis_keys(prefix)

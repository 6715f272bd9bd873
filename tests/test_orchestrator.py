"""The orchestrator skill, served by ``uvicorn asap.server:app`` with two real worker processes
and one configured peer that is down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest, TaskRequestConfig
from asap.process import AgentProcess, free_port
from asap.transport.client import ASAPClient

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProcess]]:
    logs = tmp_path_factory.mktemp("orchestration")
    started: dict[str, AgentProcess] = {}
    try:
        for name in ("worker-a", "worker-b"):
            port = free_port()
            started[name] = AgentProcess(
                ["-m", "uvicorn", "asap.examples.flaky_worker:app", "--port", str(port)],
                port,
                env={"ASAP_AGENT_ID": f"urn:asap:agent:{name}", "ASAP_LOG_LEVEL": "WARNING"},
                log_path=logs / f"{name}.log",
            ).start(wait=False)
        peers = ",".join(f"{n}={a.url}" for n, a in started.items())
        peers += f",ghost=http://127.0.0.1:{free_port()}"
        port = free_port()
        started["orchestrator"] = AgentProcess(
            ["-m", "uvicorn", "asap.server:app", "--port", str(port)],
            port,
            env={
                "ASAP_AGENT_ID": "urn:asap:agent:orchestrator",
                "ASAP_PEERS": peers,
                "ASAP_CLIENT_BASE_DELAY": "0.01",
                "ASAP_CLIENT_BREAKER_THRESHOLD": "1000",
                "ASAP_MAX_FAN_OUT": "4",
                "ASAP_LOG_FORMAT": "json",
            },
            log_path=logs / "orchestrator.log",
        ).start(wait=False)
        for agent in started.values():
            agent.wait_ready()
        yield started
    finally:
        for agent in started.values():
            agent.stop()


def set_faults(agents: dict[str, AgentProcess], name: str, **faults: int) -> None:
    """Set a worker's faults and reset its counters."""
    httpx.post(agents[name].url + "/_faults", json=faults).raise_for_status()


@pytest.fixture(autouse=True)
def clean(agents: dict[str, AgentProcess]) -> None:
    for name in ("worker-a", "worker-b"):
        set_faults(agents, name)


def stats(agents: dict[str, AgentProcess], name: str) -> dict[str, Any]:
    return httpx.get(agents[name].url + "/_faults").json()  # type: ignore[no-any-return]


def step(sid: str, peer: str = "worker-a", **extra: Any) -> dict[str, Any]:
    data = extra.pop("input", {"tag": sid})
    return {"id": sid, "peer": peer, "skill": "work", "input": data, **extra}


async def orchestrate(
    agents: dict[str, AgentProcess], plan: dict[str, Any], **config: Any
) -> Envelope:
    envelope = Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:caller",
        recipient="urn:asap:agent:orchestrator",
        payload_type="task.request",
        payload=TaskRequest(
            conversation_id="conv-orch",
            skill_id="orchestrate",
            input=plan,
            config=TaskRequestConfig(**config) if config else None,
        ),
        trace_id="trace-orch",
    )
    async with ASAPClient(agents["orchestrator"].url) as client:
        return await client.send(envelope)


async def test_sequential_feeds_each_output_to_the_next(agents: dict[str, AgentProcess]) -> None:
    reply = await orchestrate(
        agents,
        {
            "mode": "sequential",
            "steps": [step("fetch"), step("transform", "worker-b"), step("summarize")],
        },
    )
    payload = reply.payload
    assert payload.status == "completed", payload.result
    outcomes = {s["id"]: s for s in payload.result["steps"]}
    assert [s["id"] for s in payload.result["steps"]] == ["fetch", "transform", "summarize"]
    assert outcomes["transform"]["peer"] == "worker-b"
    fetched = outcomes["fetch"]["result"]
    assert outcomes["transform"]["result"]["echo"]["previous_result"] == fetched
    state = payload.result["state"]
    assert state["completed"] is True and state["step"] == "complete" and state["error"] is None
    assert set(state["results"]) == {"fetch", "transform", "summarize"}
    assert stats(agents, "worker-a")["executions"] == {"fetch": 1, "summarize": 1}


async def test_sub_requests_share_conversation_and_trace(agents: dict[str, AgentProcess]) -> None:
    reply = await orchestrate(
        agents, {"mode": "parallel", "steps": [step("a"), step("b", "worker-b")]}
    )
    assert reply.payload.status == "completed"
    contexts = stats(agents, "worker-a")["contexts"] + stats(agents, "worker-b")["contexts"]
    assert {c["conversation_id"] for c in contexts} == {"conv-orch"}
    assert {c["trace_id"] for c in contexts} == {"trace-orch"}
    assert {c["parent"] for c in contexts} == {reply.payload.task_id}


async def test_parallel_fan_out_is_concurrent_and_bounded(agents: dict[str, AgentProcess]) -> None:
    plan = {
        "mode": "parallel",
        "max_concurrency": 3,
        "steps": [step(f"s{n}", input={"tag": f"s{n}", "seconds": 0.3}) for n in range(6)],
    }
    reply = await orchestrate(agents, plan)
    assert reply.payload.status == "completed"
    assert stats(agents, "worker-a")["max_running"] == 3  # concurrent, and never more
    plan["max_concurrency"] = 50  # above the agent's ASAP_MAX_FAN_OUT of 4
    set_faults(agents, "worker-a")
    await orchestrate(agents, plan)
    assert stats(agents, "worker-a")["max_running"] == 4


async def test_a_fan_out_to_one_peer_travels_as_one_batch(
    agents: dict[str, AgentProcess],
) -> None:
    plan = {
        "mode": "parallel",
        "steps": [step(f"b{n}") for n in range(4)] + [step("other", "worker-b")],
    }
    reply = await orchestrate(agents, plan)
    assert reply.payload.status == "completed"
    seen = stats(agents, "worker-a")
    assert seen["seen"] == 1  # four sub-requests, one HTTP exchange (spec 3.7 batch)
    assert seen["executions"] == {f"b{n}": 1 for n in range(4)}
    assert stats(agents, "worker-b")["seen"] == 1


async def test_graph_runs_after_dependencies(agents: dict[str, AgentProcess]) -> None:
    plan = {
        "mode": "graph",
        "steps": [
            step("join", depends_on=["left", "right"]),
            step("left", input={"tag": "left", "seconds": 0.2}),
            step("right", "worker-b"),
        ],
    }
    reply = await orchestrate(agents, plan)
    assert reply.payload.status == "completed", reply.payload.result
    join = reply.payload.result["steps"][0]
    deps = join["result"]["echo"]["dependencies"]
    assert deps["left"]["tag"] == "left" and deps["right"]["tag"] == "right"


async def test_fallback_to_another_peer(agents: dict[str, AgentProcess]) -> None:
    plan = {"steps": [step("x", "ghost", on_error="fallback", fallback=["worker-b"])]}
    reply = await orchestrate(agents, plan)
    outcome = reply.payload.result["steps"][0]
    assert reply.payload.status == "completed"
    assert outcome["peer"] == "worker-b" and outcome["attempts"] == 2
    assert stats(agents, "worker-b")["executions"] == {"x": 1}


async def test_retry_policy_rides_out_a_failing_task(agents: dict[str, AgentProcess]) -> None:
    plan = {"steps": [step("r", input={"tag": "r", "fail": True}, on_error="retry", retries=2)]}
    reply = await orchestrate(agents, plan)
    outcome = reply.payload.result["steps"][0]
    assert reply.payload.status == "failed"
    assert outcome["attempts"] == 3 and "failed on purpose" in outcome["error"]
    assert stats(agents, "worker-a")["executions"] == {"r": 3}  # a new key per attempt


async def test_http_failures_are_retried_without_running_twice(
    agents: dict[str, AgentProcess],
) -> None:
    set_faults(agents, "worker-a", lose_reply=1)
    reply = await orchestrate(agents, {"steps": [step("once")]})
    assert reply.payload.status == "completed"
    assert stats(agents, "worker-a")["executions"] == {"once": 1}


async def test_skip_policy_continues(agents: dict[str, AgentProcess]) -> None:
    plan = {"steps": [step("bad", "ghost", on_error="skip"), step("after")]}
    reply = await orchestrate(agents, plan)
    bad, after = reply.payload.result["steps"]
    assert reply.payload.status == "completed"
    assert bad["status"] == "skipped" and "ghost" in bad["error"]
    assert after["status"] == "completed"
    assert after["result"]["echo"]["previous_result"] is None


async def test_fail_policy_stops_and_reports_state(agents: dict[str, AgentProcess]) -> None:
    plan = {
        "steps": [step("first"), step("boom", input={"tag": "boom", "fail": True}), step("never")]
    }
    reply = await orchestrate(agents, plan)
    result = reply.payload.result
    assert reply.payload.status == "failed"
    assert result["error"]["type"] == "TaskFailedError"
    assert result["state"]["step"] == "failed_at_boom"
    assert result["state"]["completed"] is False
    assert [s["status"] for s in result["steps"]] == ["completed", "failed", "skipped"]
    assert stats(agents, "worker-a")["executions"] == {"first": 1, "boom": 1}


async def test_unconfigured_peers_are_refused_before_any_call(
    agents: dict[str, AgentProcess],
) -> None:
    plan = {"steps": [step("ok"), step("evil", "http://169.254.169.254")]}
    reply = await orchestrate(agents, plan)
    assert reply.payload.status == "failed"
    assert "unknown peers ['http://169.254.169.254']" in reply.payload.result["state"]["error"]
    assert stats(agents, "worker-a")["seen"] == 0


async def test_invalid_plans_are_32602(agents: dict[str, AgentProcess]) -> None:
    from asap.errors import RemoteRPCError

    cycle = {"mode": "graph", "steps": [step("a", depends_on=["b"]), step("b", depends_on=["a"])]}
    for plan, text in [
        (cycle, "dependency cycle"),
        ({"steps": [step("a"), step("a")]}, "unique"),
        ({"steps": [step("a", depends_on=["z"])]}, "needs mode 'graph'"),
        ({"steps": []}, "at least 1"),
    ]:
        with pytest.raises(RemoteRPCError) as invalid:
            await orchestrate(agents, plan)
        assert invalid.value.json_rpc_code == -32602
        assert text in str(invalid.value.data["validation_errors"])


async def test_deadline_reaches_the_workers(agents: dict[str, AgentProcess]) -> None:
    plan = {"steps": [step("slow", input={"tag": "slow", "seconds": 30})]}
    started = time.monotonic()
    reply = await orchestrate(agents, plan, timeout_seconds=2)
    assert time.monotonic() - started < 10
    assert reply.payload.status == "failed"
    seen = stats(agents, "worker-a")
    assert seen["contexts"][0]["time_left"] <= 2.0
    assert seen["cancelled"] == 1


async def test_plans_over_the_size_limits_are_refused_before_any_call(
    agents: dict[str, AgentProcess],
) -> None:
    """ASAP_MAX_PLAN_STEPS (100 here) fails the task; past the ceiling of 1000 the plan is not
    even validated step by step (-32602). No worker sees a request either way."""
    from asap.errors import RemoteRPCError

    reply = await orchestrate(agents, {"steps": [step(f"s{i}") for i in range(101)]})
    assert reply.payload.status == "failed"
    assert "plan has 101 steps; this agent accepts 100" in str(reply.payload.result)
    with pytest.raises(RemoteRPCError) as invalid:
        await orchestrate(agents, {"steps": [step(f"s{i}") for i in range(1001)]})
    assert invalid.value.json_rpc_code == -32602
    assert "at most 1000" in str(invalid.value.data["validation_errors"])
    assert stats(agents, "worker-a")["seen"] == 0

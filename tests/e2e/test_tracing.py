"""One orchestration is one trace: every agent's log lines about it carry the same trace id,
and a W3C ``traceparent`` from the caller is kept across every hop."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx

from asap.models.ids import generate_id
from asap.process import AgentProcess
from tests.security.common import start_uvicorn


def orchestrate(url: str, headers: dict[str, str], trace_id: str | None = None) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "asap_version": "0.1",
        "sender": "urn:asap:agent:caller",
        "recipient": "urn:asap:agent:orchestrator",
        "payload_type": "task.request",
        "payload": {
            "conversation_id": "traced",
            "skill_id": "orchestrate",
            "input": {
                "mode": "parallel",
                "steps": [
                    {"id": "a", "peer": "worker-a", "skill": "echo", "input": {"n": 1}},
                    {"id": "b", "peer": "worker-b", "skill": "echo", "input": {"n": 2}},
                ],
            },
        },
    }
    if trace_id:
        envelope["trace_id"] = trace_id
    body = {"jsonrpc": "2.0", "method": "asap.send", "params": {"envelope": envelope}, "id": "1"}
    reply = httpx.post(url + "/asap", json=body, headers=headers, timeout=30).json()
    assert reply["result"]["envelope"]["payload"]["status"] == "completed", reply
    return reply["result"]["envelope"]  # type: ignore[no-any-return]


def traces(log: Path, event: str) -> set[str]:
    """trace_id of every JSON log line with ``event``."""
    found = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.add(record.get("trace_id"))
    return found


def start_fleet(
    tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[AgentProcess, dict[str, AgentProcess]]:
    """Two workers and an orchestrator that knows them, ready (the orchestrator last)."""
    env = env or {}
    workers = {
        name: start_uvicorn(tmp_path, name, {"ASAP_AGENT_ID": f"urn:asap:agent:{name}", **env})
        for name in ("worker-a", "worker-b")
    }
    for worker in workers.values():
        worker.wait_ready()
    orchestrator = start_uvicorn(
        tmp_path,
        "orchestrator",
        {
            "ASAP_AGENT_ID": "urn:asap:agent:orchestrator",
            "ASAP_SKILLS": "skills.orchestrator",
            "ASAP_PEERS": ",".join(f"{n}={w.url}" for n, w in workers.items()),
            **env,
        },
    )
    return orchestrator, workers


def test_one_orchestration_is_one_trace_in_three_processes(tmp_path: Path) -> None:
    orchestrator, workers = start_fleet(tmp_path)
    try:
        orchestrator.wait_ready()
        # 1. the caller names no trace: the orchestrator starts one and passes it on
        first = orchestrate(orchestrator.url, {})
        # 2. a W3C traceparent from the caller (e.g. its HTTP tracer) is joined by every hop
        w3c = secrets.token_hex(16)
        parent = f"00-{w3c}-{secrets.token_hex(8)}-01"
        second = orchestrate(orchestrator.url, {"traceparent": parent})
        # 3. an ASAP trace_id of the caller's own choosing is the one everybody logs
        mine = f"trace_{generate_id()}"
        third = orchestrate(orchestrator.url, {}, trace_id=mine)
    finally:
        orchestrator.stop()
        for worker in workers.values():
            worker.stop()
    logs = [orchestrator.log_path, *(w.log_path for w in workers.values())]
    seen = [traces(log, "asap.request.processed") for log in logs]
    generated = first["trace_id"]
    assert len(generated) == 32 and first["extensions"]["trace_id"] == generated
    assert second["trace_id"] == w3c and second["extensions"]["trace_id"] == w3c
    assert third["trace_id"] == mine
    for name, ids in zip(("orchestrator", "worker-a", "worker-b"), seen, strict=True):
        assert ids == {generated, w3c, mine}, (name, ids)


def spans(log: Path) -> list[dict[str, Any]]:
    """The OpenTelemetry spans a process exported with the console exporter."""
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"asap.handler.execute"' in line:
            record = json.loads(line)
            if "context" in record:
                found.append(record)
    return found


def test_opentelemetry_spans_form_one_tree_across_agents(tmp_path: Path) -> None:
    """With the otel extra and OTEL_TRACES_EXPORTER set, the orchestrator's task span is the
    parent of each worker's task span, all in the caller's trace."""
    otel = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "asap-test"}
    orchestrator, workers = start_fleet(tmp_path, otel)
    w3c, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    try:
        orchestrator.wait_ready()
        orchestrate(orchestrator.url, {"traceparent": f"00-{w3c}-{caller_span}-01"})
    finally:
        orchestrator.stop()
        for worker in workers.values():
            worker.stop()
    (root,) = spans(orchestrator.log_path)
    assert root["context"]["trace_id"] == "0x" + w3c
    assert root["parent_id"] == "0x" + caller_span
    assert root["attributes"]["asap.skill.id"] == "orchestrate"
    for worker in workers.values():
        (child,) = spans(worker.log_path)
        assert child["context"]["trace_id"] == "0x" + w3c
        assert child["parent_id"] == root["context"]["span_id"]
        assert child["attributes"]["asap.agent.urn"].startswith("urn:asap:agent:worker-")

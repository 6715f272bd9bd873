"""Fetch, transform, summarize: three skills on three agents, driven by the orchestrator skill.

``python -m asap.examples.multi_step_workflow [--topic agents]`` starts a fetcher, a
transformer and a summarizer (each ``uvicorn asap.server:app`` serving one skill module) and an
orchestrator whose ``ASAP_PEERS`` names them, sends it a sequential plan, logs every step
(``asap.multi_step_workflow.step``) and the result, and stops the agents.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from asap.models.envelope import Envelope
from asap.models.ids import generate_id
from asap.models.payloads import TaskRequest
from asap.observability.logging import get_logger
from asap.process import AgentProcess
from asap.transport.client import ASAPClient

__all__ = ["WORKERS", "build_plan", "main", "run_workflow"]

log = get_logger("asap.examples.multi_step_workflow")

WORKERS = {
    "fetcher": "asap.examples.workflow.fetch",
    "transformer": "asap.examples.workflow.transform",
    "summarizer": "asap.examples.workflow.summarize",
}


def build_plan(topic: str) -> dict[str, Any]:
    """A sequential plan: each step's result becomes the next step's ``previous_result``."""
    return {
        "mode": "sequential",
        "steps": [
            {"id": "fetch", "peer": "fetcher", "skill": "fetch", "input": {"topic": topic}},
            {"id": "transform", "peer": "transformer", "skill": "transform", "on_error": "retry"},
            {"id": "summarize", "peer": "summarizer", "skill": "summarize", "on_error": "retry"},
        ],
    }


def start_agents() -> dict[str, AgentProcess]:
    """Start the three workers and the orchestrator on free loopback ports."""
    agents: dict[str, AgentProcess] = {}
    for name, module in WORKERS.items():
        agents[name] = AgentProcess.uvicorn(
            quiet=True, env={"ASAP_AGENT_ID": f"urn:asap:agent:{name}", "ASAP_SKILLS": module}
        ).start(wait=False)
    peers = ",".join(f"{name}={agent.url}" for name, agent in agents.items())
    agents["orchestrator"] = AgentProcess.uvicorn(
        quiet=True,
        env={
            "ASAP_AGENT_ID": "urn:asap:agent:orchestrator",
            "ASAP_PEERS": peers,
            "ASAP_SKILLS": "skills.orchestrator",
        },
    ).start(wait=False)
    for agent in agents.values():
        agent.wait_ready()
    return agents


async def run_workflow(orchestrator_url: str, topic: str) -> dict[str, Any]:
    """Ask the orchestrator to run the plan; return its result (steps and state)."""
    envelope = Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:workflow-client",
        recipient="urn:asap:agent:orchestrator",
        payload_type="task.request",
        payload=TaskRequest(
            conversation_id=generate_id(), skill_id="orchestrate", input=build_plan(topic)
        ),
        trace_id=generate_id(),
    )
    async with ASAPClient(orchestrator_url) as client:
        reply = await client.send(envelope)
    result: dict[str, Any] = reply.payload.result or {}
    for step in result.get("steps", []):
        log.info(
            "asap.multi_step_workflow.step",
            step=step["id"],
            peer=step["peer"],
            status=step["status"],
            result=step["result"],
        )
    log.info("asap.multi_step_workflow.complete", status=reply.payload.status)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; return 0 when the workflow completed."""
    parser = argparse.ArgumentParser(description="Fetch, transform and summarize on 3 agents.")
    parser.add_argument("--topic", default="agents")
    args = parser.parse_args(argv)
    agents = start_agents()
    try:
        result = asyncio.run(run_workflow(agents["orchestrator"].url, args.topic))
    finally:
        for agent in agents.values():
            agent.stop()
    completed = bool(result.get("state", {}).get("completed"))
    summary = result["steps"][-1]["result"] if completed else None
    log.info("asap.multi_step_workflow.demo_complete", completed=completed, summary=summary)
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())

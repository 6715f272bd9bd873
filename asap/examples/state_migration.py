"""Move a task's state from one agent to another: ``python -m asap.examples.state_migration``.

Starts a source and a target agent, each with its own storage. The source runs a task that
checkpoints its progress; a ``state.query`` to the source returns the latest snapshot; a
``state.restore`` to the target carries that snapshot in ``extensions.snapshot``, and the
target stores it. A ``state.query`` to the target then shows the moved state. Events:
``asap.state_migration.saved_on_source``, ``.state_query_envelope``, ``.moved``,
``.state_restore_envelope``, ``.demo_complete``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from asap.models.envelope import Envelope
from asap.models.ids import generate_id
from asap.models.payloads import StateQuery, StateRestore, TaskRequest
from asap.observability.logging import get_logger
from asap.process import AgentProcess

__all__ = ["main", "move_state"]

log = get_logger("asap.examples.state_migration")
SOURCE, TARGET = "urn:asap:agent:source", "urn:asap:agent:target"


def send(url: str, envelope: Envelope) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "method": "asap.send",
        "params": {"envelope": envelope.model_dump(mode="json")},
        "id": generate_id(),
    }
    reply = httpx.post(url + "/asap", json=body, timeout=30).json()
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return dict(reply["result"]["envelope"]["payload"])


def envelope(recipient: str, payload_type: str, payload: Any, **extra: Any) -> Envelope:
    return Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:migrator",
        recipient=recipient,
        payload_type=payload_type,
        payload=payload,
        **extra,
    )


def move_state(source_url: str, target_url: str, task_id: str) -> dict[str, Any]:
    """Copy the latest snapshot of ``task_id`` from the source agent to the target agent."""
    query = envelope(SOURCE, "state.query", StateQuery(task_id=task_id))
    log.info("asap.state_migration.state_query_envelope", envelope_id=query.id)
    snapshot = send(source_url, query)["final_state"]
    if snapshot is None:
        log.warning("asap.state_migration.no_snapshot", task_id=task_id)
        raise RuntimeError(f"no snapshot for {task_id} on the source")
    restore = envelope(
        TARGET,
        "state.restore",
        StateRestore(task_id=task_id, snapshot_id=snapshot["id"]),
        extensions={"snapshot": snapshot},
    )
    log.info("asap.state_migration.state_restore_envelope", envelope_id=restore.id)
    moved = send(target_url, restore)
    log.info("asap.state_migration.moved", task_id=task_id, version=moved["final_state"]["version"])
    return moved


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when the target holds the source's state."""
    argparse.ArgumentParser(description="Move a task's state between agents.").parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="asap-migration-"))
    agents = {}
    for name, agent_id in (("source", SOURCE), ("target", TARGET)):
        agents[name] = AgentProcess.uvicorn(
            quiet=True,
            env={
                "ASAP_AGENT_ID": agent_id,
                "ASAP_SKILLS": "asap.examples.long_running",
                "ASAP_STORAGE_URL": f"sqlite:///{folder}/{name}.db",
            },
        ).start(wait=False)
    try:
        for agent in agents.values():
            agent.wait_ready()
        source, target = agents["source"].url, agents["target"].url
        task = send(
            source,
            envelope(
                SOURCE,
                "task.request",
                TaskRequest(
                    conversation_id="migration",
                    skill_id="long_task",
                    input={"num_steps": 3, "seconds": 0.01},
                ),
            ),
        )
        task_id = task["task_id"]
        log.info("asap.state_migration.saved_on_source", task_id=task_id, status=task["status"])
        move_state(source, target, task_id)
        on_target = send(target, envelope(TARGET, "state.query", StateQuery(task_id=task_id)))
    finally:
        for agent in agents.values():
            agent.stop()
    state = on_target["final_state"]
    log.info("asap.state_migration.demo_complete", task_id=task_id, data=state["data"])
    return 0 if state["data"] == {"step": 3} else 1


if __name__ == "__main__":
    sys.exit(main())

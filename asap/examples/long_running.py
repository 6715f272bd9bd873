"""A long task that survives its agent crashing: ``python -m asap.examples.long_running
--num-steps 5 --crash-after 2``.

Starts an agent (SQLite storage in a temporary folder) serving the resumable skill
``long_task``, which checkpoints after every step. The first run kills its own process right
after checkpointing step ``--crash-after`` (a real crash: ``os._exit``). The example starts the
agent again; the new process finds the task whose owner stopped renewing its lease and resumes
it from the last checkpoint, under the same task id. Events: ``asap.long_running.checkpoint``,
``.crash_simulated``, ``.resuming``, ``.demo_complete``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from asap import Context, skill
from asap.models.ids import generate_id
from asap.observability.logging import get_logger
from asap.process import AgentProcess, free_port

__all__ = ["long_task", "main"]

log = get_logger("asap.examples.long_running")


@skill("long_task", description="Count to num_steps, checkpointing each step", resumable=True)
async def long_task(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Run ``num_steps`` steps; crash after ``crash_after`` on the first run."""
    steps, crash_after = int(data["num_steps"]), int(data.get("crash_after", 0))
    done = ctx.resumed.data["step"] if ctx.resumed is not None else 0
    if ctx.resumed is not None:
        log.info("asap.long_running.resuming", from_step=done, task_id=ctx.task_id)
    for step in range(done + 1, steps + 1):
        await asyncio.sleep(float(data.get("seconds", 0.1)))
        await ctx.checkpoint({"step": step})
        log.info("asap.long_running.checkpoint", step=step, task_id=ctx.task_id)
        if ctx.resumed is None and step == crash_after:
            log.warning("asap.long_running.crash_simulated", after_step=step)
            os._exit(1)
    return {"steps": steps, "resumed_from": done}


def call(url: str, payload_type: str, payload: dict[str, Any], **headers: str) -> dict[str, Any]:
    """One JSON-RPC ``asap.send``; the reply's payload."""
    envelope = {
        "asap_version": "0.1",
        "sender": "urn:asap:agent:long-running-demo",
        "recipient": "urn:asap:agent:worker",
        "payload_type": payload_type,
        "payload": payload,
    }
    body = {
        "jsonrpc": "2.0",
        "method": "asap.send",
        "params": {"envelope": envelope},
        "id": generate_id(),
    }
    reply = httpx.post(url + "/asap", json=body, headers=headers, timeout=30).json()
    return dict(reply["result"]["envelope"]["payload"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when the task completed after its crash."""
    parser = argparse.ArgumentParser(description="Crash mid-task, then resume from a snapshot.")
    parser.add_argument("--num-steps", type=int, default=5)
    parser.add_argument("--crash-after", type=int, default=2, help="0 disables the crash")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="asap-long-running-"))
    port = free_port()
    env = {
        "ASAP_SKILLS": "asap.examples.long_running",
        "ASAP_STORAGE_URL": f"sqlite:///{folder}/state.db",
        "ASAP_TASK_LEASE_SECONDS": "1",
    }
    command = ["-m", "uvicorn", "asap.server:app", "--port", str(port), "--log-level", "warning"]
    agent = AgentProcess(command, port, env=env, inherit_output=True).start()
    task = call(
        agent.url,
        "task.request",
        {
            "conversation_id": "long-running",
            "skill_id": "long_task",
            "input": {"num_steps": args.num_steps, "crash_after": args.crash_after},
        },
        prefer="respond-async",
    )
    task_id = task["task_id"]
    state = _wait(agent, task_id)
    if state is None:  # the process crashed: start it again, it resumes the task
        agent.stop()
        agent = AgentProcess(command, port, env=env, inherit_output=True).start()
        state = _wait(agent, task_id)
    agent.stop()
    assert state is not None
    log.info(
        "asap.long_running.demo_complete",
        task_id=task_id,
        status=state["status"],
        result=state["result"],
        last_checkpoint=state["final_state"],
    )
    return 0 if state["status"] == "completed" else 1


def _wait(agent: AgentProcess, task_id: str) -> dict[str, Any] | None:
    """The task's final state, or None if the agent process died first."""
    while True:
        if agent.process is not None and agent.process.poll() is not None:
            return None
        try:
            state = call(agent.url, "state.query", {"task_id": task_id})
        except httpx.HTTPError:
            continue
        if state["status"] in ("completed", "failed", "cancelled"):
            return state
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Orchestrator benchmark: what fanning out through the orchestrator skill costs.

    python bench/orchestration.py [--runs 30]

Starts two worker agents (``asap.examples.flaky_worker``: skill ``work``, which can sleep) and
an orchestrator (``uvicorn asap.server:app`` with ``ASAP_PEERS`` naming them), all on
127.0.0.1, then times ``orchestrate`` calls from this process:

- parallel fan-out to 1, 4 and 16 sub-tasks spread over the two workers, with sub-tasks that
  return at once (pure overhead) and sub-tasks that sleep 100 ms;
- the same 16-step plans run sequentially, for comparison;
- the direct call to one worker, the floor an orchestrated sub-task is compared with;
- the sequential echo plan with and without a checkpoint after every step.

Every agent stores its state in SQLite (the default). Per-sub-task overhead = (median time of
a 16-step sequential echo plan without checkpoints - 16 x median direct call) / 16. Medians
over --runs calls after a warm-up. Writes bench/orchestration.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asap.models.envelope import Envelope  # noqa: E402
from asap.models.payloads import TaskRequest  # noqa: E402
from asap.process import AgentProcess  # noqa: E402
from asap.transport.client import ASAPClient  # noqa: E402


def start(storage: str) -> dict[str, AgentProcess]:
    agents = {}
    folder = tempfile.mkdtemp(prefix="asap-bench-")

    def url(name: str) -> str:
        return f"sqlite:///{folder}/{name}.db" if storage == "sqlite" else "memory://"

    for name in ("worker-a", "worker-b"):
        agents[name] = AgentProcess.uvicorn(
            "asap.examples.flaky_worker:app",
            quiet=True,
            env={
                "ASAP_AGENT_ID": f"urn:asap:agent:{name}",
                "ASAP_STORAGE_URL": url(name),
            },
        ).start(wait=False)
    peers = ",".join(f"{n}={a.url}" for n, a in agents.items())
    agents["orchestrator"] = AgentProcess.uvicorn(
        quiet=True,
        env={
            "ASAP_AGENT_ID": "urn:asap:agent:orchestrator",
            "ASAP_PEERS": peers,
            "ASAP_SKILLS": "skills.orchestrator",
            "ASAP_MAX_FAN_OUT": "16",
            "ASAP_STORAGE_URL": url("orchestrator"),
        },
    ).start(wait=False)
    for agent in agents.values():
        agent.wait_ready()
    return agents


def envelope(skill: str, data: dict[str, Any]) -> Envelope:
    return Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:bench",
        recipient="urn:asap:agent:x",
        payload_type="task.request",
        payload=TaskRequest(conversation_id="bench", skill_id=skill, input=data),
    )


def plan(mode: str, n: int, seconds: float, checkpoint: bool = True) -> dict[str, Any]:
    return {
        "mode": mode,
        "max_concurrency": 16,
        "checkpoint": checkpoint,
        "steps": [
            {
                "id": f"s{i}",
                "peer": ("worker-a", "worker-b")[i % 2],
                "skill": "work",
                "input": {"tag": "bench", "seconds": seconds},
            }
            for i in range(n)
        ],
    }


async def timed(client: ASAPClient, request: Envelope, runs: int) -> list[float]:
    for _ in range(3):  # warm-up
        await client.send(request)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        reply = await client.send(request)
        times.append((time.perf_counter() - started) * 1000)
        if reply.payload.status != "completed":
            raise RuntimeError(f"not completed: {reply.payload.result}")
    return times


async def measure(agents: dict[str, AgentProcess], runs: int) -> list[tuple[str, list[float]]]:
    rows = []
    async with ASAPClient(agents["worker-a"].url) as direct:
        rows.append(
            (
                "direct call to a worker (echo)",
                await timed(direct, envelope("work", {"tag": "direct"}), runs),
            )
        )
    async with ASAPClient(agents["orchestrator"].url) as client:
        for seconds, label in ((0.0, "echo"), (0.1, "100 ms")):
            slow_runs = runs if seconds == 0 else max(5, runs // 3)
            for n in (1, 4, 16):
                request = envelope("orchestrate", plan("parallel", n, seconds))
                rows.append(
                    (f"parallel x{n}, {label} sub-tasks", await timed(client, request, slow_runs))
                )
            # 16 sequential echo steps take tens of ms: as many runs as the rest (the
            # overhead figure subtracts two medians); 16 x 100 ms steps take 1.6 s each
            request = envelope("orchestrate", plan("sequential", 16, seconds))
            sequential_runs = runs if seconds == 0 else 3
            rows.append(
                (
                    f"sequential x16, {label} sub-tasks",
                    await timed(client, request, sequential_runs),
                )
            )
        request = envelope("orchestrate", plan("sequential", 16, 0, checkpoint=False))
        rows.append(
            (
                "sequential x16, echo sub-tasks, no checkpoints",
                await timed(client, request, runs),
            )
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--storage", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "orchestration.md")
    args = parser.parse_args()
    agents = start(args.storage)
    try:
        rows = asyncio.run(measure(agents, args.runs))
    finally:
        for agent in agents.values():
            agent.stop()
    median = {label: statistics.median(times) for label, times in rows}
    direct = median["direct call to a worker (echo)"]
    overhead = (median["sequential x16, echo sub-tasks, no checkpoints"] - 16 * direct) / 16
    checkpoint_cost = (
        median["sequential x16, echo sub-tasks"]
        - median["sequential x16, echo sub-tasks, no checkpoints"]
    ) / 16
    lines = [
        "# Orchestrator benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- nproc: {os.cpu_count()}; two workers and one orchestrator, one uvicorn process each",
        f"- command: `python bench/orchestration.py --runs {args.runs} --storage {args.storage}`",
        "",
        "| plan | calls | median ms | p90 ms |",
        "|---|---:|---:|---:|",
    ]
    for label, times in rows:
        p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else times[0]
        lines.append(f"| {label} | {len(times)} | {median[label]:.2f} | {p90:.2f} |")
    lines += [
        "",
        f"- orchestration overhead per sub-task (sequential x16 echo without checkpoints, minus "
        f"16 direct calls, /16): **{overhead:.2f} ms** (target < 2 ms)",
        f"- parallel x16 of 100 ms sub-tasks: **{median['parallel x16, 100 ms sub-tasks']:.1f} "
        f"ms** median (target <= 120 ms); sequential: "
        f"{median['sequential x16, 100 ms sub-tasks']:.0f} ms",
        f"- checkpointing ({args.storage}, after every step) costs "
        f"**{checkpoint_cost:.2f} ms per step** (sequential x16 echo with and without)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

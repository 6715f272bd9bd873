#!/usr/bin/env python3
"""Orchestrator benchmark: what fanning out through the orchestrator skill costs.

    python bench/orchestration.py [--runs 30]

Starts two worker agents (``asap.examples.flaky_worker``: skill ``work``, which can sleep) and
an orchestrator (``uvicorn asap.server:app`` with ``ASAP_PEERS`` naming them), all on
127.0.0.1, then times ``orchestrate`` calls from this process:

- parallel fan-out to 1, 4 and 16 sub-tasks spread over the two workers, with sub-tasks that
  return at once (pure overhead) and sub-tasks that sleep 100 ms;
- the same 16-step plans run sequentially, for comparison;
- the sequential echo plan with and without a checkpoint after every step, and the same 16
  echo calls made straight to a worker: the floor an orchestrated sub-task is compared with.

Every agent stores its state in SQLite (the default). Medians over --runs calls after a
warm-up. The two costs are differences, so their three plans are measured in rounds (one call
of each per round, in turn) and each cost is the median of its per-round differences: a slow
minute of a shared machine hits both sides of a difference alike.

- overhead per sub-task = (sequential x16 echo plan without checkpoints - 16 direct calls) / 16
- checkpoint per step = (sequential x16 echo plan - the same without checkpoints) / 16

Writes bench/orchestration.md.
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
from collections.abc import Awaitable, Callable
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


async def call(client: ASAPClient, request: Envelope) -> None:
    reply = await client.send(request)
    if reply.payload.status != "completed":
        raise RuntimeError(f"not completed: {reply.payload.result}")


async def rounds(
    plans: dict[str, Callable[[], Awaitable[None]]], runs: int
) -> dict[str, list[float]]:
    """Time ``runs`` rounds of one call of each plan in turn (after a warm-up round)."""
    times: dict[str, list[float]] = {label: [] for label in plans}
    for round_ in range(runs + 1):
        for label, plan_call in plans.items():
            started = time.perf_counter()
            await plan_call()
            if round_:
                times[label].append((time.perf_counter() - started) * 1000)
    return times


async def timed(client: ASAPClient, request: Envelope, runs: int) -> list[float]:
    """``runs`` calls of one plan (after a warm-up call)."""
    return (await rounds({"": lambda: call(client, request)}, runs))[""]


DIRECT = "16 echo calls straight to a worker, one after another"
SEQUENTIAL = "sequential x16, echo sub-tasks"
NO_CHECKPOINTS = "sequential x16, echo sub-tasks, no checkpoints"


async def measure(agents: dict[str, AgentProcess], runs: int) -> list[tuple[str, list[float]]]:
    rows = []
    async with (
        ASAPClient(agents["worker-a"].url) as direct,
        ASAPClient(agents["orchestrator"].url) as client,
    ):
        for seconds, label in ((0.0, "echo"), (0.1, "100 ms")):
            slow_runs = runs if seconds == 0 else max(5, runs // 3)
            for n in (1, 4, 16):
                request = envelope("orchestrate", plan("parallel", n, seconds))
                rows.append(
                    (f"parallel x{n}, {label} sub-tasks", await timed(client, request, slow_runs))
                )
        request = envelope("orchestrate", plan("sequential", 16, 0.1))  # 1.6 s per call
        rows.append(("sequential x16, 100 ms sub-tasks", await timed(client, request, 3)))

        echo = envelope("work", {"tag": "direct"})
        sequential = envelope("orchestrate", plan("sequential", 16, 0))
        no_checkpoints = envelope("orchestrate", plan("sequential", 16, 0, checkpoint=False))

        async def direct_calls() -> None:
            for _ in range(16):
                await call(direct, echo)

        paired = await rounds(
            {
                DIRECT: direct_calls,
                SEQUENTIAL: lambda: call(client, sequential),
                NO_CHECKPOINTS: lambda: call(client, no_checkpoints),
            },
            runs,
        )
    return rows + list(paired.items())


def per_step(rows: dict[str, list[float]], minuend: str, subtrahend: str) -> list[float]:
    """Per-round differences of two paired plans, per one of their 16 steps, in ms."""
    return [(a - b) / 16 for a, b in zip(rows[minuend], rows[subtrahend], strict=True)]


def spread(values: list[float]) -> str:
    """Median, with the middle half of the values."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"**{statistics.median(values):.2f} ms** (middle half of the rounds {q1:.2f}-{q3:.2f})"


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
    by_label = dict(rows)
    median = {label: statistics.median(times) for label, times in by_label.items()}
    overhead = per_step(by_label, NO_CHECKPOINTS, DIRECT)
    checkpoint_cost = per_step(by_label, SEQUENTIAL, NO_CHECKPOINTS)
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
        f"16 direct calls, /16, per round): {spread(overhead)} (target < 2 ms)",
        f"- parallel x16 of 100 ms sub-tasks: **{median['parallel x16, 100 ms sub-tasks']:.1f} "
        f"ms** median (target <= 120 ms); sequential: "
        f"{median['sequential x16, 100 ms sub-tasks']:.0f} ms",
        f"- checkpointing ({args.storage}, after every step) costs "
        f"{spread(checkpoint_cost)} per step (sequential x16 echo with and without, per round)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

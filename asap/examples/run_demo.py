"""The whole tutorial in one command: two echo workers and the orchestration.

``python -m asap.examples.run_demo`` (or ``asap demo``) starts worker A and worker B as real
agent processes on free loopback ports, waits until both answer, runs
:mod:`asap.examples.orchestration` against them, stops them, and exits with its status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from asap.examples.orchestration import run_orchestration
from asap.observability.logging import get_logger
from asap.process import AgentProcess, free_port

__all__ = ["main"]

log = get_logger("asap.examples.run_demo")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 when the orchestration completed."""
    parser = argparse.ArgumentParser(description="Run two echo workers and orchestrate them.")
    parser.add_argument("--port-a", type=int, default=0, help="worker A port (0: any free)")
    parser.add_argument("--port-b", type=int, default=0, help="worker B port (0: any free)")
    args = parser.parse_args(argv)
    workers = []
    try:
        for name, port in (("worker-a", args.port_a), ("worker-b", args.port_b)):
            port = port or free_port()
            worker = AgentProcess(
                [
                    "-m",
                    "asap.examples.echo_agent",
                    "--port",
                    str(port),
                    "--agent-id",
                    f"urn:asap:agent:{name}",
                ],
                port,
                env={"ASAP_LOG_LEVEL": "WARNING"},
            )
            workers.append(worker.start(wait=False))
        for name, worker in zip(("worker-a", "worker-b"), workers, strict=True):
            worker.wait_ready()
            log.info("asap.demo.worker_ready", worker=name, url=worker.url, pid=worker.pid)
        state = asyncio.run(run_orchestration(workers[0].url, workers[1].url))
    finally:
        for worker in workers:
            worker.stop()
    log.info(
        "asap.orchestration.demo_complete",
        completed=state.completed,
        result_a=state.result_a,
        result_b=state.result_b,
        error=state.error,
    )
    return 0 if state.completed else 1


if __name__ == "__main__":
    sys.exit(main())

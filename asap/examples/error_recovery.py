"""Retry, circuit breaker and fallback against a worker that fails on purpose.

``python -m asap.examples.error_recovery [--skip-retry] [--skip-circuit] [--skip-fallback]``
starts :mod:`asap.examples.flaky_worker` processes and shows:

1. **retry**: the worker answers HTTP 500 twice; the client retries with the same idempotency
   key and the skill runs once (``asap.error_recovery.retry_demo_complete``);
2. **circuit breaker**: calls to a worker that is down open the circuit, further calls fail at
   once with ``CircuitOpenError``; once the worker is up, a probe closes it again
   (``circuit_open``, ``circuit_half_open``, ``circuit_closed``);
3. **fallback**: an orchestrator's plan step whose peer is down falls back to another peer
   (``asap.error_recovery.fallback``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import httpx

from asap.errors import ASAPConnectionError, CircuitOpenError
from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest
from asap.observability.logging import get_logger
from asap.process import AgentProcess, free_port
from asap.transport.client import ASAPClient, RetryConfig

__all__ = ["main"]

log = get_logger("asap.examples.error_recovery")


def worker(port: int | None = None, name: str = "worker") -> AgentProcess:
    """A flaky worker process (not started)."""
    return AgentProcess.uvicorn(
        "asap.examples.flaky_worker:app",
        port=port,
        quiet=True,
        env={"ASAP_AGENT_ID": f"urn:asap:agent:{name}"},
    )


def set_faults(url: str, **faults: int) -> None:
    """Switch the flaky worker's faults on (and reset its counters)."""
    httpx.post(url + "/_faults", json=faults).raise_for_status()


def worker_stats(url: str) -> dict[str, Any]:
    """What the flaky worker counted."""
    return dict(httpx.get(url + "/_faults").json())


def work(tag: str, recipient: str = "urn:asap:agent:worker") -> Envelope:
    return Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:recovery-demo",
        recipient=recipient,
        payload_type="task.request",
        payload=TaskRequest(conversation_id="recovery", skill_id="work", input={"tag": tag}),
    )


async def retry_demo() -> None:
    with worker() as flaky:
        set_faults(flaky.url, http_500=2)
        config = RetryConfig(max_retries=3, base_delay=0.05, max_delay=0.5)
        async with ASAPClient(flaky.url, retry_config=config) as client:
            reply = await client.send(work("retry"))
        stats = worker_stats(flaky.url)
    log.info(
        "asap.error_recovery.retry",
        injected_failures=stats["injected"],
        requests_seen=stats["seen"],
        executions=stats["executions"]["retry"],
        status=reply.payload.status,
    )
    log.info("asap.error_recovery.retry_demo_complete", ran_once=stats["executions"]["retry"] == 1)


async def circuit_demo() -> None:
    port = free_port()
    config = RetryConfig(
        max_retries=1,
        circuit_breaker_enabled=True,
        circuit_breaker_threshold=2,
        circuit_breaker_timeout=0.5,
    )
    async with ASAPClient(f"http://127.0.0.1:{port}", retry_config=config) as client:
        for _ in range(2):
            try:
                await client.send(work("circuit"))
            except ASAPConnectionError as exc:
                log.info("asap.error_recovery.call_failed", error=str(exc))
        started = time.perf_counter()
        try:
            await client.send(work("circuit"))
        except CircuitOpenError as exc:
            log.info(
                "asap.error_recovery.circuit_open",
                error=str(exc),
                refused_in_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        with worker(port):
            await asyncio.sleep(config.circuit_breaker_timeout)  # the breaker's reset timeout
            log.info("asap.error_recovery.circuit_half_open", probe="next call")
            reply = await client.send(work("circuit"))
            log.info("asap.error_recovery.circuit_closed", status=reply.payload.status)


async def fallback_demo() -> None:
    backup = worker(name="backup").start(wait=False)
    peers = f"primary=http://127.0.0.1:{free_port()},backup={backup.url}"
    orchestrator = AgentProcess.uvicorn(
        quiet=True,
        env={
            "ASAP_AGENT_ID": "urn:asap:agent:orchestrator",
            "ASAP_PEERS": peers,
            "ASAP_SKILLS": "skills.orchestrator",
            "ASAP_CLIENT_BASE_DELAY": "0.05",
        },
    ).start(wait=False)
    try:
        backup.wait_ready()
        orchestrator.wait_ready()
        plan: dict[str, Any] = {
            "steps": [
                {
                    "id": "important",
                    "peer": "primary",
                    "skill": "work",
                    "input": {"tag": "fb"},
                    "on_error": "fallback",
                    "fallback": ["backup"],
                }
            ]
        }
        request = work("fallback", "urn:asap:agent:orchestrator")
        request = request.model_copy(
            update={
                "payload": TaskRequest(
                    conversation_id="recovery", skill_id="orchestrate", input=plan
                )
            }
        )
        async with ASAPClient(orchestrator.url) as client:
            reply = await client.send(request)
        step = reply.payload.result["steps"][0]
        log.info(
            "asap.error_recovery.fallback",
            primary="down",
            served_by=step["peer"],
            attempts=step["attempts"],
            status=reply.payload.status,
        )
    finally:
        orchestrator.stop()
        backup.stop()
    log.info("asap.error_recovery.fallback_demo_complete", served_by=step["peer"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demos that are not skipped."""
    parser = argparse.ArgumentParser(description="Retry, circuit breaker and fallback demos.")
    parser.add_argument("--skip-retry", action="store_true")
    parser.add_argument("--skip-circuit", action="store_true")
    parser.add_argument("--skip-fallback", action="store_true")
    args = parser.parse_args(argv)
    log.info("asap.error_recovery.client_retry_config", **asdict(RetryConfig()))
    if not args.skip_retry:
        asyncio.run(retry_demo())
    if not args.skip_circuit:
        asyncio.run(circuit_demo())
    if not args.skip_fallback:
        asyncio.run(fallback_demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())

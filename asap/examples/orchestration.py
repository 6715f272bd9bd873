"""The multi-agent orchestration of the tutorial: one orchestrator, two workers.

``python -m asap.examples.orchestration --worker-a-url URL --worker-b-url URL`` sends a
``task.request`` to worker A, then one to worker B, sharing one ``conversation_id`` and one
``trace_id``, and logs ``asap.orchestration.sent_to_a``, ``sent_to_b`` and ``complete``.
Exits with status 1 when a worker fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asap.errors import ASAPError
from asap.models.envelope import Envelope
from asap.models.ids import generate_id
from asap.models.payloads import TaskRequest
from asap.observability.logging import bind_context, clear_context, get_logger
from asap.transport.client import ASAPClient

__all__ = ["OrchestrationState", "build_task_envelope", "main", "run_orchestration"]

ORCHESTRATOR_ID = "urn:asap:agent:orchestrator"
WORKER_A_ID = "urn:asap:agent:worker-a"
WORKER_B_ID = "urn:asap:agent:worker-b"

log = get_logger("asap.examples.orchestration")


@dataclass
class OrchestrationState:
    """Progress of one orchestration across its workers."""

    conversation_id: str
    trace_id: str
    step: str = "init"
    result_a: dict[str, Any] | None = None
    result_b: dict[str, Any] | None = None
    error: str | None = None
    completed: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


def build_task_envelope(
    recipient_id: str,
    skill_id: str,
    input_payload: dict[str, Any],
    conversation_id: str,
    trace_id: str,
) -> Envelope:
    """A ``task.request`` from the orchestrator sharing the workflow's ids."""
    request = TaskRequest(conversation_id=conversation_id, skill_id=skill_id, input=input_payload)
    return Envelope(
        asap_version="0.1",
        sender=ORCHESTRATOR_ID,
        recipient=recipient_id,
        payload_type="task.request",
        payload=request.model_dump(),
        trace_id=trace_id,
    )


async def run_orchestration(
    worker_a_url: str = "http://127.0.0.1:8001",
    worker_b_url: str = "http://127.0.0.1:8002",
    *,
    allow_http: bool = False,
) -> OrchestrationState:
    """Send to worker A, then to worker B; return the final state (never raises ASAPError).

    Plain ``http://`` to a non-loopback host needs ``allow_http`` (e.g. inside a compose
    network); without it the orchestration fails at once with the client's reason."""
    state = OrchestrationState(conversation_id=generate_id(), trace_id=generate_id())
    bind_context(trace_id=state.trace_id, correlation_id=state.conversation_id)
    try:
        try:
            client_a = ASAPClient(worker_a_url, require_https=not allow_http)
            client_b = ASAPClient(worker_b_url, require_https=not allow_http)
        except ValueError as exc:
            state.error, state.step = str(exc), "failed_at_start"
            log.error("asap.orchestration.failed", error=str(exc))
            return state
        async with client_a, client_b:
            for name, client, recipient in (
                ("a", client_a, WORKER_A_ID),
                ("b", client_b, WORKER_B_ID),
            ):
                state.step = f"sending_to_{name}"
                envelope = build_task_envelope(
                    recipient_id=recipient,
                    skill_id="echo",
                    input_payload={"step": name, "message": f"task for worker {name.upper()}"},
                    conversation_id=state.conversation_id,
                    trace_id=state.trace_id,
                )
                try:
                    response = await client.send(envelope)
                except ASAPError as exc:
                    state.error = f"worker_{name}: {exc}"
                    state.step = f"failed_at_{name}"
                    log.error("asap.orchestration.failed", worker=name, error=str(exc))
                    return state
                setattr(state, f"result_{name}", response.payload_dict)
                log.info(
                    f"asap.orchestration.sent_to_{name}",
                    url=client.base_url,
                    envelope_id=envelope.id,
                    response_id=response.id,
                )
        state.step = "complete"
        state.completed = True
        log.info(
            "asap.orchestration.complete",
            conversation_id=state.conversation_id,
            result_a=state.result_a,
            result_b=state.result_b,
        )
        return state
    finally:
        clear_context()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the orchestration from the command line; return the exit status."""
    parser = argparse.ArgumentParser(description="Orchestrate two ASAP worker agents.")
    parser.add_argument("--worker-a-url", default="http://127.0.0.1:8001")
    parser.add_argument("--worker-b-url", default="http://127.0.0.1:8002")
    parser.add_argument(
        "--allow-http",
        action="store_true",
        help="allow plain http:// to non-loopback workers (e.g. http://worker:8000 in compose)",
    )
    args = parser.parse_args(argv)
    state = asyncio.run(
        run_orchestration(args.worker_a_url, args.worker_b_url, allow_http=args.allow_http)
    )
    log.info("asap.orchestration.demo_complete", completed=state.completed, error=state.error)
    return 0 if state.completed else 1


if __name__ == "__main__":
    sys.exit(main())

"""What a skill receives besides its input: :class:`Context`."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from asap.models.envelope import Envelope
from asap.models.ids import generate_id, generate_span_id
from asap.models.payloads import TaskRequest
from asap.observability.tracing import current_span_id

__all__ = ["Context", "current_deadline"]

current_deadline: ContextVar[float | None] = ContextVar("asap_deadline", default=None)
"""The ``time.monotonic()`` deadline of the task running in this context, if any.

Set while a skill runs; the client reads it so a call made inside a skill never outlives it.
"""


@dataclass
class Context:
    """The running task as a skill sees it.

    ``client`` is the agent's shared :class:`~asap.transport.pool.ClientPool` (one connection
    pool for every outgoing call); ``deadline`` is a ``time.monotonic()`` value or None.
    """

    task_id: str
    conversation_id: str
    trace_id: str | None
    skill_id: str
    envelope: Envelope
    agent_id: str
    logger: Any
    client: Any
    deadline: float | None = None
    peers: dict[str, str] = field(default_factory=dict)
    """Agents this one may call (``ASAP_PEERS``): name -> base URL."""
    settings: Any = None
    """The agent's :class:`~asap.settings.Settings`."""
    resumed: Any = None
    """The :class:`~asap.models.entities.StateSnapshot` this run resumes from (after a crash
    or a ``state.restore``), else None."""
    manager: Any = None
    """The agent's :class:`~asap.tasks.TaskManager` (used by :meth:`checkpoint`)."""
    extra: dict[str, Any] = field(default_factory=dict)

    async def checkpoint(self, data: dict[str, Any]) -> Any:
        """Save ``data`` as this task's next snapshot (``checkpoint=True``) and return it.

        A resumable skill that is restarted receives the latest one as :attr:`resumed`.
        """
        if self.manager is None or self.manager.storage is None:
            raise RuntimeError("checkpoint() needs a running agent with storage")
        await self.manager.persist(self.task_id)
        snapshot = await self.manager.storage.snapshots.append(self.task_id, data, checkpoint=True)
        self.logger.debug("asap.task.checkpoint", version=snapshot.version)
        return snapshot

    async def report_progress(
        self, percent: float | None = None, message: str | None = None, **details: Any
    ) -> None:
        """Record progress (``percent`` 0..100): visible to ``state.query`` and streamed to a
        caller following the task (``TaskStream`` chunks)."""
        if percent is not None and not 0 <= percent <= 100:
            raise ValueError(f"percent must be within 0..100, got {percent}")
        progress = {"percent": percent, "message": message, **details}
        if self.manager is not None and self.manager.storage is not None:
            await self.manager.persist(self.task_id)
            await self.manager.storage.tasks.update(self.task_id, progress=progress)
            self.manager.notify(self.task_id, {"final": False, "progress": progress})

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or None when there is none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def task_request(
        self,
        recipient: str,
        skill_id: str,
        input: dict[str, Any],
        **payload: Any,
    ) -> Envelope:
        """Build a sub-request that shares this task's conversation and trace.

        The sub-task names this task as its parent, so a trace can be followed across agents.
        """
        request = TaskRequest(
            conversation_id=self.conversation_id,
            parent_task_id=self.task_id,
            skill_id=skill_id,
            input=input,
            **payload,
        )
        extensions = None
        trace = (self.envelope.extensions or {}).get("trace_id")
        if isinstance(trace, str):  # the W3C trace this task joined: the sub-task's parent
            extensions = {"trace_id": trace, "span_id": current_span_id() or generate_span_id()}
        return Envelope(
            id=generate_id(),
            asap_version=self.envelope.asap_version,
            sender=self.agent_id,
            recipient=recipient,
            payload_type="task.request",
            payload=request,
            trace_id=self.trace_id,
            extensions=extensions,
        )

"""Enumerations of the protocol, and the task state machine of spec 2.3.

Invariants of the transition table:
- every status appears as a key;
- terminal statuses (completed, failed, cancelled) have no outgoing transition;
- ``submitted`` and ``working`` are the only statuses from which a task can be cancelled.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "MessageRole",
    "TaskStatus",
    "UpdateType",
    "AckStatus",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "can_transition",
]


class TaskStatus(StrEnum):
    """The six task statuses (spec 2.3)."""

    SUBMITTED = "submitted"
    WORKING = "working"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INPUT_REQUIRED = "input_required"

    def is_terminal(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in TERMINAL_STATUSES

    @classmethod
    def terminal_states(cls) -> frozenset[TaskStatus]:
        """The statuses a task never leaves."""
        return TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[TaskStatus] = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
)

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.SUBMITTED: frozenset({TaskStatus.WORKING, TaskStatus.CANCELLED}),
    TaskStatus.WORKING: frozenset(
        {
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.CANCELLED,
            TaskStatus.INPUT_REQUIRED,
        }
    ),
    TaskStatus.INPUT_REQUIRED: frozenset({TaskStatus.WORKING, TaskStatus.CANCELLED}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}
"""Legal transitions of spec 2.3: status -> statuses it may move to."""


def can_transition(current: TaskStatus, new: TaskStatus) -> bool:
    """Whether ``current -> new`` is a legal transition (spec 2.3)."""
    return new in TRANSITIONS[current]


class UpdateType(StrEnum):
    """Kinds of ``task.update`` (spec 2.1)."""

    PROGRESS = "progress"
    INPUT_REQUIRED = "input_required"
    STATUS_CHANGE = "status_change"


class MessageRole(StrEnum):
    """Roles of a ``message.send`` (spec 2.1)."""

    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class AckStatus(StrEnum):
    """Statuses of a ``MessageAck`` (spec 2.1)."""

    RECEIVED = "received"
    PROCESSED = "processed"
    REJECTED = "rejected"

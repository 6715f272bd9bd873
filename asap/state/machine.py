"""The task lifecycle of spec 2.3 applied to :class:`~asap.models.entities.Task` objects.

The table itself is :data:`asap.models.enums.TRANSITIONS`; this module applies it. No I/O,
and time comes from an injectable clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from asap.errors import InvalidTransitionError
from asap.models.base import utc_now
from asap.models.entities import Task
from asap.models.enums import TRANSITIONS, TaskStatus, can_transition

__all__ = ["TRANSITIONS", "can_transition", "transition"]


def transition(
    task: Task, new_status: TaskStatus, *, clock: Callable[[], datetime] = utc_now
) -> Task:
    """Return a copy of ``task`` in ``new_status`` with ``updated_at`` set to now.

    Raises :class:`InvalidTransitionError` (-32000) for a move the table does not allow; the
    original task is never changed.
    """
    if not can_transition(task.status, new_status):
        raise InvalidTransitionError(task.status.value, new_status.value, task.id)
    return task.model_copy(update={"status": new_status, "updated_at": clock()})

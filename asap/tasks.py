"""Tasks on the server: every ``task.request`` becomes a stored task (spec 2.3) that can be
queried, cancelled, checkpointed and resumed.

:class:`TaskManager` runs skills as asyncio tasks and keeps their records in the agent's
storage. Each running task is leased by this agent instance; a background loop renews the
leases, applies cancellations requested through other instances, and takes over tasks whose
owner stopped renewing (a crash): a resumable skill is run again from its latest checkpoint
under the same task id, any other is marked failed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool

from asap import memory
from asap.context import Context, current_deadline
from asap.errors import (
    ASAPError,
    ASAPTimeoutError,
    SkillNotFoundError,
    TaskAlreadyCompletedError,
    TaskFailedError,
    TaskNotFoundError,
    ThreadPoolExhaustedError,
)
from asap.models.base import format_timestamp
from asap.models.entities import StateSnapshot
from asap.models.enums import TaskStatus
from asap.models.envelope import Envelope, validate_envelope
from asap.models.ids import generate_id, generate_task_id
from asap.models.payloads import TaskRequest
from asap.observability import tracing
from asap.observability.logging import bind_context, get_logger
from asap.observability.metrics import Metrics
from asap.registry import SkillRegistry, SkillSpec
from asap.settings import Settings
from asap.state.store import Storage, TaskRecord
from asap.timers import Alarms
from asap.transport.idempotency import IdempotencyRecord

__all__ = ["TaskManager"]

_log = get_logger("asap.tasks")
_skill_log = get_logger("asap.skill")
ACTIVE = frozenset({TaskStatus.SUBMITTED, TaskStatus.WORKING})
PERSIST_DELAY = 1.0
"""Seconds a task waited on by its caller runs before its record is stored; a shorter task is
stored once, finished (one write instead of two). Checkpoints and progress store it at once."""
OUTBOX_WINDOW = 0.01
"""Seconds finished tasks wait in the outbox so that many are written in one transaction."""
STOP_WRITE_ATTEMPTS = 3
"""Failed writes of the outbox in a row after which a stopping agent gives up on them."""
UNPARSED: Any = object()
"""A task's input not parsed yet (:meth:`SkillSpec.parse_input`)."""


def instance_name() -> str:
    """A name for this agent process, unique across hosts and restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{generate_id()[-6:]}"


SHUTDOWN_MESSAGE = "The agent shut down before the task finished; it was not completed"


def stored_request(envelope: Envelope, source: dict[str, Any] | None) -> dict[str, Any]:
    """The request stored with a task, which re-validates to ``envelope``: a deep copy of
    ``source`` (what it was validated from) with the id and timestamp it was given."""
    if source is None:
        return envelope.model_dump(mode="json")
    request: dict[str, Any] = orjson.loads(orjson.dumps(source))
    request["id"] = envelope.id
    if not isinstance(request.get("timestamp"), str):  # else valid as it is
        request["timestamp"] = format_timestamp(envelope.timestamp)
    return request


class Deadlines:
    """Cancels each running task at its deadline (:class:`~asap.timers.Alarms`: one timer
    for all of them). The deadline of a task that ends first is just dropped."""

    def __init__(self) -> None:
        self._alarms = Alarms()
        self._passed: set[str] = set()

    def watch(self, task_id: str, seconds: float) -> None:
        """Cancel the current task ``seconds`` from now unless :meth:`forget` comes first."""
        task = asyncio.current_task()
        assert task is not None
        self._alarms.set(task_id, seconds, partial(self._expire, task_id, task))

    def _expire(self, task_id: str, task: asyncio.Task[Any]) -> None:
        if not task.done():
            self._passed.add(task_id)
            task.cancel()

    def passed(self, task_id: str) -> bool:
        """Whether the task was cancelled by its deadline."""
        return task_id in self._passed

    def forget(self, task_id: str) -> bool:
        """The task ended (called from it): stop watching it. Whether its deadline passed;
        if so the task takes that cancellation back, as ``asyncio.timeout`` does."""
        self._alarms.cancel(task_id)
        if task_id not in self._passed:
            return False
        self._passed.discard(task_id)
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


class TaskManager:
    """Creates, runs, tracks, cancels and resumes the tasks of one agent instance."""

    def __init__(
        self, settings: Settings, registry: SkillRegistry, agent_id: str, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.agent_id = agent_id
        self.metrics = metrics
        self.instance = settings.instance_id or instance_name()
        self.lease = float(settings.task_lease_seconds)
        """Seconds a lease on a running task lasts; renewed every third of it."""
        self.storage: Storage | None = None
        self.client: Any = None
        self.peers = settings.peer_urls()
        self.running: dict[str, asyncio.Task[IdempotencyRecord]] = {}
        metrics.track_in_flight(lambda: len(self.running))
        self.pending: dict[str, TaskRecord] = {}
        """Records of running tasks not stored yet (see :meth:`persist`)."""
        self._pending_since: dict[str, tuple[float, Envelope, dict[str, Any] | None]] = {}
        """When each pending record's task started (loop time, in that order), and what its
        request is made from if it is stored while it runs (envelope, source JSON)."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._deadlines = Deadlines()
        self.creating: dict[str, asyncio.Future[None]] = {}
        self.outbox: dict[str, TaskRecord] = {}
        """Finished tasks never stored yet, being written in batches by :meth:`flush`."""
        self._flusher: asyncio.Task[None] | None = None
        self.listeners: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.draining_since: float | None = None
        """When a graceful shutdown began (monotonic), or None."""
        self._grace_timer: asyncio.TimerHandle | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, storage: Storage, client: Any) -> None:
        """Attach storage and client, take over orphaned tasks, start the lease loop."""
        self.storage, self.client = storage, client
        await self.adopt_orphans()
        self._loop_task = asyncio.create_task(self._maintain(), name="asap-task-leases")

    def drain(self) -> None:
        """Begin a graceful shutdown: refuse new tasks (the caller retries elsewhere) and give
        running ones ``shutdown_grace_seconds`` to finish; then :meth:`interrupt` the rest."""
        if self.draining_since is not None:
            return
        self.draining_since = time.monotonic()
        grace = self.settings.shutdown_grace_seconds
        _log.info("asap.server.draining", running=len(self.running), grace_seconds=grace)
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(grace, self.interrupt)

    def interrupt(self) -> None:
        """Stop every running task now: a resumable one stays ``working`` with its lease
        released, so another instance (or this one, restarted) resumes it from its last
        checkpoint at once; any other is answered and stored as ``failed``."""
        if self.running:
            _log.warning("asap.server.grace_expired", interrupted=len(self.running))
        self._stopping = True
        for task in list(self.running.values()):
            task.cancel()

    async def stop(self) -> None:
        """Stop the lease loop and this instance's tasks. When draining, running tasks first
        get what is left of the grace period."""
        if self.draining_since is not None and self.running:
            left = self.settings.shutdown_grace_seconds - (time.monotonic() - self.draining_since)
            if left > 0:
                await asyncio.wait(list(self.running.values()), timeout=left)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.interrupt()
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=5)
        if self._flusher is not None and not self._flusher.done():
            # its write in flight ends before the storage closes (else it fails, logged)
            await asyncio.wait([self._flusher])
        await self.flush()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._tick()
            except Exception:
                _log.exception("asap.tasks.maintenance_failed")
            memory.trim()  # what large requests left free goes back to the system

    async def _tick(self) -> None:
        assert self.storage is not None
        ids = [task_id for task_id in self.running if task_id not in self.pending]
        if ids:
            await self.storage.tasks.renew(ids, self.instance, time.time() + self.lease)
            for task_id in await self.storage.tasks.cancel_requested(ids):
                task = self.running.get(task_id)
                if task is not None:
                    _log.info("asap.tasks.cancel_applied", task_id=task_id)
                    task.cancel()
        await self.adopt_orphans()
        retention = self.settings.task_retention_seconds
        if retention > 0:  # last: a failing purge (logged by _maintain) delays nothing else
            purged = await self.storage.purge_finished(time.time() - retention)
            if purged:
                _log.info("asap.tasks.purged", count=len(purged))

    async def adopt_orphans(self) -> None:
        """Take over tasks whose owner stopped renewing its lease."""
        assert self.storage is not None
        if self.draining_since is not None:
            return
        now = time.time()
        for record in await self.storage.tasks.expired(now):
            spec = self.registry.get(record.skill_id)
            if spec is None:  # another kind of agent's task (shared storage): theirs to adopt
                continue
            if not await self.storage.tasks.claim(record.id, self.instance, now + self.lease, now):
                continue
            if spec.resumable:
                _log.info("asap.tasks.resuming", task_id=record.id, skill_id=record.skill_id)
                snapshot = await self.storage.snapshots.get(record.id)
                self.launch(record, spec, snapshot)
            else:
                _log.warning("asap.tasks.lost", task_id=record.id, previous_owner=record.owner)
                error = {
                    "type": "TaskLostError",
                    "message": "the agent running this task stopped before it finished",
                }
                await self.storage.tasks.update(
                    record.id,
                    expect=ACTIVE,
                    status=TaskStatus.FAILED,
                    result={"error": error},
                    request={},
                )

    # -- running ---------------------------------------------------------------------------

    def find_skill(self, skill_id: str) -> SkillSpec:
        """The skill named by a request, or :class:`SkillNotFoundError` listing what exists."""
        spec = self.registry.get(skill_id)
        if spec is None:
            raise SkillNotFoundError(skill_id, self.registry.ids())
        return spec

    async def submit(
        self,
        spec: SkillSpec,
        envelope: Envelope,
        fingerprint: str = "",
        *,
        wait: bool = True,
        listener: Callable[[dict[str, Any]], None] | None = None,
        source: dict[str, Any] | None = None,
        task_input: Any = UNPARSED,
    ) -> IdempotencyRecord:
        """Create the task and run it; with ``wait`` return its outcome, else at once.
        ``source``: the JSON the envelope was validated from, stored with the task (cheaper
        than dumping the model); ``task_input``: the input the caller already parsed with
        :meth:`SkillSpec.parse_input`, if it did.

        Refused with :class:`ThreadPoolExhaustedError` when ``max_concurrent_tasks`` run
        already: a clear overload reply rather than an unbounded queue.
        """
        assert self.storage is not None
        if self.draining_since is not None:
            raise ThreadPoolExhaustedError(
                "Agent is shutting down; send the task to another instance",
                {"draining": True},
            )
        limit = self.settings.max_concurrent_tasks
        if len(self.running) >= limit:
            self.metrics.overloaded.inc()
            raise ThreadPoolExhaustedError(
                f"Too many concurrent tasks: {len(self.running)} running (max {limit})",
                {"max_tasks": limit, "active_tasks": len(self.running)},
            )
        request: TaskRequest = envelope.payload
        record = TaskRecord(
            id=generate_task_id(),
            conversation_id=request.conversation_id,
            skill_id=spec.id,
            sender=envelope.sender,
            status=TaskStatus.WORKING,
            request={},
            owner=self.instance,
            lease_until=time.time() + self.lease,
        )
        if listener is not None:
            self.listeners.setdefault(record.id, []).append(listener)
        if not wait:  # the caller will ask about it: store it before answering
            record.request = stored_request(envelope, source)
            await self.storage.tasks.create(record)
            self.launch(record, spec, None, envelope, task_input)
            return IdempotencyRecord(fingerprint, record.id, TaskStatus.WORKING.value, None)
        # A task that ends within PERSIST_DELAY is stored once, with its outcome, and without
        # its request (a finished task is never run again): the request is copied only if
        # the task is stored while it runs.
        loop = asyncio.get_running_loop()
        self.pending[record.id] = record
        self._pending_since[record.id] = (loop.time(), envelope, source)
        if self._sweeper is None:
            self._sweep_later()
        # Waited on through a future of our own rather than ``asyncio.shield``: the same
        # protection (cancelling the caller leaves the task running), one callback fewer.
        ended = loop.create_future()
        task = self.launch(record, spec, None, envelope, task_input, ended)
        await ended  # the caller's cancellation cancels only this future
        if task.cancelled():  # cancelled before it ran
            stored = await self.get(record.id)
            return IdempotencyRecord(fingerprint, stored.id, stored.status.value, stored.result)
        outcome: IdempotencyRecord = task.result()
        if not fingerprint:  # the task's own outcome has none either
            return outcome
        return IdempotencyRecord(fingerprint, outcome.task_id, outcome.status, outcome.result)

    def _sweep_later(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(PERSIST_DELAY / 4, self._sweep)

    def _sweep(self) -> None:
        """Store the records of tasks that have run for ``PERSIST_DELAY`` (one timer for all
        tasks: a timer per task costs more than many short tasks do otherwise)."""
        self._sweeper = None
        started_before = asyncio.get_running_loop().time() - PERSIST_DELAY
        for task_id, (since, _, _) in list(self._pending_since.items()):
            if since > started_before:
                break
            asyncio.ensure_future(self._persist_quietly(task_id))
        if self.pending and not self._stopping:
            self._sweep_later()

    def _unpend(self, task_id: str) -> TaskRecord | None:
        self._pending_since.pop(task_id, None)
        return self.pending.pop(task_id, None)

    async def persist(self, task_id: str) -> None:
        """Make sure a running task's record is stored (before its first checkpoint or
        progress report, and once it has run for ``PERSIST_DELAY``)."""
        assert self.storage is not None
        started = self._pending_since.get(task_id)
        record = self._unpend(task_id)
        if record is not None:
            if started is not None:
                record.request = stored_request(started[1], started[2])
            self.creating[task_id] = asyncio.ensure_future(self.storage.tasks.create(record))
        creating = self.creating.get(task_id)
        if creating is not None:
            await asyncio.shield(creating)

    async def _persist_quietly(self, task_id: str) -> None:
        try:
            await self.persist(task_id)
        except Exception:
            _log.exception("asap.tasks.persist_failed", task_id=task_id)

    def launch(
        self,
        record: TaskRecord,
        spec: SkillSpec,
        resume_from: StateSnapshot | None,
        envelope: Envelope | None = None,
        task_input: Any = UNPARSED,
        ended: asyncio.Future[None] | None = None,
    ) -> asyncio.Task[IdempotencyRecord]:
        """Run the task in the background and track it; ``ended`` gets a result when it
        ends (unless cancelled by then)."""
        envelope = envelope or validate_envelope(record.request)
        task = asyncio.get_running_loop().create_task(
            self._execute(record, spec, resume_from, envelope, task_input), name=record.id
        )
        self.running[record.id] = task
        if self.metrics.multiprocess_dir:
            self.metrics.tasks_in_flight.set(len(self.running))
        task.add_done_callback(partial(self._forget, record.id, ended))
        return task

    def _forget(self, task_id: str, ended: asyncio.Future[None] | None, _: object) -> None:
        if ended is not None and not ended.done():
            ended.set_result(None)
        self.running.pop(task_id, None)
        if self.metrics.multiprocess_dir:
            self.metrics.tasks_in_flight.set(len(self.running))
        self.listeners.pop(task_id, None)
        self.creating.pop(task_id, None)

    def notify(self, task_id: str, event: dict[str, Any]) -> None:
        """Pass a progress event to whoever streams this task."""
        for listener in self.listeners.get(task_id, []):
            listener(event)

    def task_timeout(self, request: TaskRequest) -> int | None:
        """Seconds a task may run: the request's ``timeout_seconds``, else the agent default."""
        requested = request.config.timeout_seconds if request.config else None
        return requested or self.settings.task_timeout_seconds

    def make_context(
        self,
        spec: SkillSpec,
        envelope: Envelope,
        task_id: str,
        resume_from: StateSnapshot | None,
        deadline: float | None,
    ) -> Context:
        """The :class:`Context` a skill receives for one task (``deadline``: monotonic)."""
        request: TaskRequest = envelope.payload
        return Context(
            task_id=task_id,
            conversation_id=request.conversation_id,
            trace_id=envelope.trace_id,
            skill_id=spec.id,
            envelope=envelope,
            agent_id=self.agent_id,
            logger=_skill_log,
            client=self.client,
            deadline=deadline,
            peers=self.peers,
            settings=self.settings,
            resumed=resume_from,
            manager=self,
        )

    async def _execute(
        self,
        record: TaskRecord,
        spec: SkillSpec,
        resume_from: StateSnapshot | None,
        envelope: Envelope,
        task_input: Any = UNPARSED,
    ) -> IdempotencyRecord:
        assert self.storage is not None
        status, result = await self.run_skill(spec, envelope, record.id, resume_from, task_input)
        if status is TaskStatus.CANCELLED and self._stopping:
            if spec.resumable:  # left to another instance: its lease ends now
                await self.persist(record.id)
                await self.storage.tasks.update(record.id, expect=ACTIVE, lease_until=0.0)
                return IdempotencyRecord("", record.id, TaskStatus.WORKING.value, None)
            status = TaskStatus.FAILED
            result = {"error": {"type": "ShutdownError", "message": SHUTDOWN_MESSAGE}}
        await self.finish(record.id, status, result)
        if record.id in self.listeners:
            self.notify(record.id, {"final": True, "status": status._value_, "result": result})
        return IdempotencyRecord("", record.id, status._value_, result)

    async def finish(self, task_id: str, status: TaskStatus, result: dict[str, Any] | None) -> None:
        """Store a task's outcome, without its request. A task that was never stored goes to
        the outbox, written in batches (one transaction for many short tasks) right after the
        reply."""
        assert self.storage is not None
        unsaved = self._unpend(task_id)
        if unsaved is not None:
            unsaved.status, unsaved.result, unsaved.updated_at = status, result, time.time()
            self.outbox[task_id] = unsaved
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self.flush(), name="asap-task-outbox")
            return
        await self.persist(task_id)
        await self.storage.tasks.update(
            task_id, expect=ACTIVE, status=status, result=result, request={}
        )

    async def flush(self) -> None:
        """Write the outbox until it is empty (while stopping, give up after
        ``STOP_WRITE_ATTEMPTS`` failed writes in a row, naming the tasks not stored)."""
        assert self.storage is not None
        failures = 0
        while self.outbox:
            if not self._stopping:
                await asyncio.sleep(OUTBOX_WINDOW)  # gather a batch: one transaction for many
            batch = list(self.outbox.values())
            if not batch:  # another flush (the one of stop()) wrote them meanwhile
                return
            try:
                await self.storage.tasks.create_many(batch)
            except Exception:
                _log.exception("asap.tasks.outbox_write_failed", tasks=len(batch))
                failures += 1
                if self._stopping and failures >= STOP_WRITE_ATTEMPTS:  # do not hang the stop
                    _log.error("asap.tasks.outbox_lost", task_ids=[r.id for r in batch])
                    self.outbox.clear()
                    return
                await asyncio.sleep(0.5)
                continue
            failures = 0
            for record in batch:
                if self.outbox.get(record.id) is record:
                    del self.outbox[record.id]

    async def run_skill(
        self,
        spec: SkillSpec,
        envelope: Envelope,
        task_id: str,
        resume_from: StateSnapshot | None = None,
        task_input: Any = UNPARSED,
    ) -> tuple[TaskStatus, dict[str, Any] | None]:
        """Run a skill; an exception becomes a ``failed`` task with a safe error, the deadline
        or a cancellation a ``failed`` or ``cancelled`` one."""
        request: TaskRequest = envelope.payload
        timeout = self.task_timeout(request)
        deadline = time.monotonic() + timeout if timeout else None
        if task_input is UNPARSED:
            task_input = spec.parse_input(request.input)
        if spec.takes_context:
            ctx = self.make_context(spec, envelope, task_id, resume_from, deadline)
            args: tuple[Any, ...] = (task_input, ctx)
        else:
            args = (task_input,)
        started = time.perf_counter()
        # the task runs in its own context: set and bound for its lifetime, no reset needed
        current_deadline.set(deadline)
        bind_context(
            trace_id=envelope.trace_id,
            correlation_id=envelope.id,
            skill_id=spec.id,
            task_id=task_id,
        )
        if timeout:
            self._deadlines.watch(task_id, timeout)
        try:
            if spec.is_async:
                call = spec.func(*args)
            else:
                # A thread cannot be stopped: past the deadline we answer and stop
                # waiting, and the thread finishes on its own.
                call = run_in_threadpool(partial(spec.func, *args))
            if tracing.enabled():  # the span's attributes only then
                attributes = {
                    "asap.payload_type": envelope.payload_type,
                    "asap.agent.urn": self.agent_id,
                    "asap.envelope.id": envelope.id,
                    "asap.skill.id": spec.id,
                    "asap.task.id": task_id,
                }
                with tracing.span("asap.handler.execute", envelope.extensions, attributes):
                    value = await call
            else:
                value = await call
            result = spec.dump_output(value)
            status = TaskStatus.COMPLETED
        except asyncio.CancelledError:
            if not self._deadlines.passed(task_id):
                _log.info("asap.handler.cancelled")
                status, result = TaskStatus.CANCELLED, None
            else:
                _log.warning("asap.handler.timeout", timeout_seconds=timeout)
                status, result = TaskStatus.FAILED, {"error": self.deadline_error(spec, timeout)}
        except TaskFailedError as exc:
            _log.warning("asap.handler.failed", error=exc.message)
            error = {"type": type(exc).__name__, "message": exc.message}
            status, result = TaskStatus.FAILED, {"error": error, **exc.result}
        except Exception as exc:  # a TimeoutError here is the skill's own, not our deadline
            _log.exception("asap.handler.error", error_type=type(exc).__name__)
            status, result = TaskStatus.FAILED, {"error": self.safe_error(exc)}
        finally:
            timed_out = self._deadlines.forget(task_id)
        elapsed = time.perf_counter() - started
        outcome = status._value_  # .value is a Python-level property on 3.11
        _log.info("asap.request.processed", status=outcome, duration_ms=round(elapsed * 1000, 3))
        timed_out = timed_out and status is TaskStatus.FAILED
        self.metrics.skill_finished(spec.id, "timeout" if timed_out else outcome, elapsed)
        return status, result

    def deadline_error(self, spec: SkillSpec, timeout: int | None) -> dict[str, Any]:
        """The error of a task cancelled at its deadline."""
        error = ASAPTimeoutError(
            f"Skill '{spec.id}' did not finish within {timeout} s and was cancelled",
            {"timeout_seconds": timeout},
        )
        return self.safe_error(error)

    def safe_error(self, exc: BaseException) -> dict[str, Any]:
        """What a caller learns about a skill's exception: type and message (traceback: debug)."""
        error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, ASAPError):
            error["code"] = exc.code
            error["rpc_code"] = exc.rpc_code
        if self.settings.debug:
            error["traceback"] = traceback.format_exception(exc)
        return error

    # -- state.query, task.cancel, state.restore ------------------------------------------

    async def lookup(self, task_id: str) -> TaskRecord | None:
        """The task as this instance knows it (outbox, not yet stored, or stored), or None."""
        assert self.storage is not None
        local = self.outbox.get(task_id) or self.pending.get(task_id)
        if local is not None:
            return local.copy()
        return await self.storage.tasks.get(task_id)

    async def get(self, task_id: str) -> TaskRecord:
        """The task, or :class:`TaskNotFoundError` (-32010)."""
        record = await self.lookup(task_id)
        if record is None:
            raise TaskNotFoundError(task_id)
        return record

    async def cancel(self, task_id: str, reason: str | None) -> TaskRecord:
        """Cancel a task wherever it runs; -32010 if unknown, -32030 if already finished."""
        assert self.storage is not None
        local = self.running.get(task_id)
        if local is not None:
            await self.persist(task_id)
        record = await self.get(task_id)
        if record.status.is_terminal():
            raise TaskAlreadyCompletedError(task_id, record.status.value)
        await self.storage.tasks.update(task_id, expect=ACTIVE, cancel_requested=True)
        _log.info("asap.tasks.cancel_requested", task_id=task_id, reason=reason)
        if local is not None:
            local.cancel()
            await asyncio.wait([local], timeout=5)
            # cancelled before it ever ran, the task had no chance to record it
            await self.storage.tasks.update(
                task_id, expect=ACTIVE, status=TaskStatus.CANCELLED, request={}
            )
        else:  # another instance runs it: its lease loop applies the request
            deadline = time.monotonic() + max(5.0, self.lease)
            while time.monotonic() < deadline:
                record = await self.get(task_id)
                if record.status.is_terminal():
                    break
                await asyncio.sleep(0.05)
        return await self.get(task_id)

    async def restore(
        self, task_id: str, snapshot_id: str, carried: dict[str, Any] | None
    ) -> tuple[TaskRecord | None, StateSnapshot]:
        """Make a snapshot the task's latest state and, for a resumable skill, resume from it.

        ``carried`` is a snapshot sent along in the envelope's ``extensions.snapshot`` (a move
        from another agent); it is stored first.
        """
        assert self.storage is not None
        snapshots = self.storage.snapshots
        if carried is not None:
            moved = StateSnapshot.model_validate(carried)
            if moved.id != snapshot_id:
                raise TaskNotFoundError(f"{task_id} (snapshot {snapshot_id})")
            snapshot = await snapshots.get_by_id(task_id, snapshot_id)
            if snapshot is None:
                snapshot = await snapshots.append(task_id, moved.data, checkpoint=True)
        else:
            found = await snapshots.get_by_id(task_id, snapshot_id)
            if found is None:
                raise TaskNotFoundError(f"{task_id} (snapshot {snapshot_id})")
            latest = await snapshots.get(task_id)
            snapshot = found
            if latest is None or latest.id != found.id:  # roll back: it becomes the latest
                snapshot = await snapshots.append(task_id, found.data, checkpoint=True)
        record = await self.storage.tasks.get(task_id)
        if record is None:
            return None, snapshot
        spec = self.registry.get(record.skill_id)
        running = record.status in ACTIVE and (record.lease_until or 0) >= time.time()
        if spec is not None and spec.resumable and not running and not record.status.is_terminal():
            resumed = await self.storage.tasks.update(
                task_id,
                status=TaskStatus.WORKING,
                owner=self.instance,
                lease_until=time.time() + self.lease,
                cancel_requested=False,
            )
            if resumed is not None:
                _log.info("asap.tasks.restored", task_id=task_id, version=snapshot.version)
                self.launch(resumed, spec, snapshot)
                record = resumed
        return record, snapshot

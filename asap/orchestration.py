"""Run a plan of steps on peer agents: sequential, parallel or as a dependency graph.

Sub-requests that start together for the same peer travel as one JSON-RPC batch (spec 3.7).
Every sub-request shares the caller's ``conversation_id`` and ``trace_id``, names the running
task as its parent, goes through the agent's one shared client (retries, circuit breakers,
deadline propagation) and carries an idempotency key derived from the orchestration task, the
step, the peer and the attempt, so a resend never runs a step twice on a worker.

After every finished step the orchestration saves its results as a checkpoint; the skill is
resumable, so if its agent stops mid-plan it runs again under the same task id, skips the
finished steps, and re-sends the unfinished ones with the same idempotency keys: a worker
that already ran one answers with the stored outcome instead of running it twice.

Per step an error policy decides what a failure means: ``fail`` the orchestration, ``retry``
the step, ``fallback`` to other peers in order, or ``skip`` it. A step still failing after
its retries or fallbacks fails the orchestration; only ``skip`` lets it go on. Only peers named
in the agent's configuration (``ASAP_PEERS``) can be called.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from asap.context import Context
from asap.errors import ASAPError, TaskFailedError
from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequestConfig, TaskResponse

__all__ = [
    "ErrorPolicy",
    "OrchestrationOutput",
    "OrchestrationState",
    "Orchestrator",
    "Plan",
    "PlanStep",
    "StepOutcome",
]


class ErrorPolicy(StrEnum):
    """What a failed step means for the orchestration."""

    FAIL = "fail"
    RETRY = "retry"
    FALLBACK = "fallback"
    SKIP = "skip"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanStep(_Strict):
    """One sub-task: call ``skill`` on ``peer`` with ``input``."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    peer: str = Field(description="a peer name from ASAP_PEERS")
    skill: str
    input: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list, description="graph mode only")
    on_error: ErrorPolicy = ErrorPolicy.FAIL
    retries: int = Field(default=2, ge=0, le=10, description="extra attempts with 'retry'")
    fallback: list[str] = Field(default_factory=list, description="peers tried with 'fallback'")
    timeout_seconds: float | None = Field(default=None, gt=0)


PLAN_STEPS_CEILING = 1000
"""Most steps any plan may have, whatever ``ASAP_MAX_PLAN_STEPS`` says: validating a plan
(duplicates, cycles) must stay cheap for what a request can carry."""


class Plan(_Strict):
    """Steps and how to order them.

    ``sequential``: in order, each step's input gets ``previous_result`` (the result of the
    step before, or null when it was skipped). ``parallel``: all at once, bounded. ``graph``:
    a step starts when every step in its ``depends_on`` has completed, and its input gets
    ``dependencies`` (id -> result); a step whose dependency failed or was skipped is skipped.
    """

    mode: Literal["sequential", "parallel", "graph"] = "sequential"
    steps: list[PlanStep] = Field(min_length=1, max_length=PLAN_STEPS_CEILING)
    max_concurrency: int | None = Field(default=None, ge=1)
    checkpoint: bool = Field(
        default=True, description="save the state after every finished step (resumable)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        ids = [step.id for step in self.steps]
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        if duplicates:
            raise ValueError(f"step ids must be unique, repeated: {duplicates}")
        known = set(ids)
        for step in self.steps:
            if step.depends_on and self.mode != "graph":
                raise ValueError(f"step {step.id!r}: depends_on needs mode 'graph'")
            unknown = [d for d in step.depends_on if d not in known]
            if unknown:
                raise ValueError(f"step {step.id!r} depends on unknown steps {unknown}")
        if self.mode == "graph":
            _check_acyclic(self.steps)
        return self


def _check_acyclic(steps: list[PlanStep]) -> None:
    pending = {step.id: set(step.depends_on) for step in steps}
    while pending:
        ready = [sid for sid, deps in pending.items() if not deps]
        if not ready:
            raise ValueError(f"dependency cycle among steps {sorted(pending)}")
        for sid in ready:
            del pending[sid]
        for deps in pending.values():
            deps.difference_update(ready)


class StepOutcome(_Strict):
    """What happened to one step."""

    id: str
    status: Literal["completed", "failed", "skipped"]
    peer: str | None = None
    task_id: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    duration_ms: float = 0.0


class OrchestrationState(_Strict):
    """Progress of an orchestration (the tutorial's ``OrchestrationState``, for any plan)."""

    conversation_id: str
    trace_id: str | None
    step: str = "init"
    results: dict[str, StepOutcome] = Field(default_factory=dict)
    error: str | None = None
    completed: bool = False


class OrchestrationOutput(_Strict):
    """The orchestrator's result: every step's outcome, in plan order, and the state."""

    steps: list[StepOutcome]
    state: OrchestrationState


class _Abort(Exception):
    """A step with policy 'fail' failed: stop the orchestration."""


MAX_BATCH = 50
"""Most sub-requests in one JSON-RPC batch (the server's default limit, spec 3.7)."""


class _Batcher:
    """Sends the sub-requests that steps start in the same loop iteration to the same peer
    (and with the same timeout) as one JSON-RPC batch: one HTTP exchange instead of many.

    Each step still awaits its own reply or error, so retries, fallbacks and concurrency
    limits work per step; the peer runs the items of a batch concurrently.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.queues: dict[tuple[str, float | None], list[tuple[Envelope, asyncio.Future[Any]]]]
        self.queues = {}

    async def send(self, peer: str, envelope: Envelope, timeout: float | None) -> Envelope:
        key = (peer, timeout)
        queue = self.queues.setdefault(key, [])
        if not queue:
            asyncio.get_running_loop().call_soon(self._flush, key)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue.append((envelope, future))
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]

    def _flush(self, key: tuple[str, float | None]) -> None:
        queue = self.queues.pop(key, [])
        for start in range(0, len(queue), MAX_BATCH):
            asyncio.ensure_future(self._send(key, queue[start : start + MAX_BATCH]))

    async def _send(
        self, key: tuple[str, float | None], items: list[tuple[Envelope, asyncio.Future[Any]]]
    ) -> None:
        peer, timeout = key
        client = self.ctx.client.get(self.ctx.peers[peer])
        envelopes = [envelope for envelope, _ in items]
        try:
            if len(items) == 1:
                results: list[Any] = [await client.send(envelopes[0], timeout=timeout)]
            else:
                results = await client.batch(envelopes, timeout=timeout, return_exceptions=True)
        except Exception as exc:  # the whole exchange failed: every step sees it
            results = [exc] * len(items)
        for (_, future), result in zip(items, results, strict=True):
            if not future.done():
                future.set_result(result)


class Orchestrator:
    """Runs one :class:`Plan` for the task in ``ctx``."""

    def __init__(self, plan: Plan, ctx: Context, *, max_fan_out: int = 16) -> None:
        self.plan = plan
        self.ctx = ctx
        self.state = OrchestrationState(conversation_id=ctx.conversation_id, trace_id=ctx.trace_id)
        limit = min(plan.max_concurrency or max_fan_out, max_fan_out)
        self.slots = asyncio.Semaphore(limit)
        self.log = ctx.logger
        self.unsaved = False
        self._dumps: dict[str, tuple[StepOutcome, dict[str, Any]]] = {}
        self.closing = False
        self._saver: asyncio.Task[None] | None = None
        self.batcher = _Batcher(ctx)
        if ctx.resumed is not None:  # restarted: keep what finished before
            done = ctx.resumed.data.get("results", {})
            self.state.results = {k: StepOutcome.model_validate(v) for k, v in done.items()}
            self.log.info("asap.orchestration.resumed", finished=sorted(self.state.results))

    def finished(self, step: PlanStep) -> StepOutcome | None:
        """The outcome of a step that finished before a restart, if any."""
        return self.state.results.get(step.id)

    def checkpoint(self) -> None:
        """Save every finished step in the background, so a restart resumes after them.

        One save at a time, each holding every result so far: steps that finish while a save
        is under way are covered by the next one, so a burst of finishes costs two writes.
        Steps do not wait for their save; a step finished but not yet saved when the agent
        dies is sent again on resume with the same idempotency key, and the worker answers
        with its stored outcome.
        """
        if not self.plan.checkpoint or self.ctx.manager is None:
            return
        self.unsaved = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.create_task(self._save())

    async def _save(self) -> None:
        while self.unsaved and not self.closing:
            self.unsaved = False
            results = {k: self._dumped(k, v) for k, v in self.state.results.items()}
            try:
                await self.ctx.checkpoint({"results": results})
            except Exception:  # the next save, or the final result, covers it
                self.log.exception("asap.orchestration.checkpoint_failed")

    def _dumped(self, step_id: str, outcome: StepOutcome) -> dict[str, Any]:
        """``outcome`` as JSON, dumped once: each save holds every result so far."""
        cached = self._dumps.get(step_id)
        if cached is None or cached[0] is not outcome:
            cached = self._dumps[step_id] = (outcome, outcome.model_dump(mode="json"))
        return cached[1]

    async def _finish_saving(self) -> None:
        """No new saves once the outcome is known (the task record holds it); let the one
        under way finish."""
        self.closing = True
        if self._saver is not None:
            await self._saver

    def refuse(self) -> str | None:
        """Why this plan cannot run here (unknown peers), or None. Checked before any call."""
        configured = self.ctx.peers
        named = {p for step in self.plan.steps for p in (step.peer, *step.fallback)}
        unknown = sorted(named - set(configured))
        if unknown:
            return (
                f"unknown peers {unknown}: this agent may call only its configured peers "
                f"{sorted(configured)} (ASAP_PEERS)"
            )
        return None

    async def run(self) -> OrchestrationOutput:
        """Run the plan; raise :class:`TaskFailedError` with the output if it did not complete."""
        reason = self.refuse()
        if reason is not None:
            self.state.error = reason
            self.state.step = "refused"
            raise TaskFailedError(reason, self.output().model_dump(mode="json"))
        if self.ctx.manager is not None:  # the steps to send (not those done before a restart)
            fan_out = sum(1 for step in self.plan.steps if self.finished(step) is None)
            self.ctx.manager.metrics.orchestration_fan_out.labels(self.plan.mode).observe(fan_out)
        try:
            if self.plan.mode == "sequential":
                await self._sequential()
            else:
                await self._concurrent()
        except* _Abort:
            pass
        finally:
            await self._finish_saving()
        if self.state.error is None:
            self.state.step = "complete"
            self.state.completed = True
            self.log.info("asap.orchestration.complete", steps=len(self.plan.steps))
            return self.output()
        self.log.warning("asap.orchestration.failed", error=self.state.error)
        raise TaskFailedError(self.state.error, self.output().model_dump(mode="json"))

    def output(self) -> OrchestrationOutput:
        """Outcomes in plan order (steps never started are reported skipped)."""
        steps = [
            self.state.results.get(step.id)
            or StepOutcome(id=step.id, status="skipped", error="not started")
            for step in self.plan.steps
        ]
        return OrchestrationOutput(steps=steps, state=self.state)

    async def _sequential(self) -> None:
        previous: StepOutcome | None = None
        for step in self.plan.steps:
            done = self.finished(step)
            if done is not None:
                previous = done
                continue
            data = dict(step.input)
            if previous is not None:
                data["previous_result"] = previous.result
            previous = await self._run_step(step, data)

    async def _concurrent(self) -> None:
        done = {step.id: asyncio.Event() for step in self.plan.steps}

        async def run(step: PlanStep) -> None:
            if self.finished(step) is not None:
                done[step.id].set()
                return
            try:
                data = dict(step.input)
                if step.depends_on:
                    for dep in step.depends_on:
                        await done[dep].wait()
                    blocked = [
                        d for d in step.depends_on if self.state.results[d].status != "completed"
                    ]
                    if blocked:
                        self.state.results[step.id] = StepOutcome(
                            id=step.id,
                            status="skipped",
                            error=f"dependencies not completed: {blocked}",
                        )
                        return
                    data["dependencies"] = {
                        d: self.state.results[d].result for d in step.depends_on
                    }
                await self._run_step(step, data)
            finally:
                done[step.id].set()

        async with asyncio.TaskGroup() as group:
            for step in self.plan.steps:
                group.create_task(run(step))

    async def _run_step(self, step: PlanStep, data: dict[str, Any]) -> StepOutcome:
        async with self.slots:
            self.state.step = step.id
            outcome = await self._attempt_all(step, data)
        self.state.results[step.id] = outcome
        if outcome.status != "failed":
            self.checkpoint()
        if outcome.status == "failed":  # 'retry' and 'fallback' fail too once exhausted
            self.state.error = f"step {step.id!r} failed: {outcome.error}"
            self.state.step = f"failed_at_{step.id}"
            raise _Abort(step.id)
        return outcome

    async def _attempt_all(self, step: PlanStep, data: dict[str, Any]) -> StepOutcome:
        peers = (
            [step.peer, *step.fallback] if step.on_error is ErrorPolicy.FALLBACK else [step.peer]
        )
        tries = 1 + step.retries if step.on_error is ErrorPolicy.RETRY else 1
        started = time.perf_counter()
        attempts, error = 0, ""
        for peer in peers:
            for attempt in range(tries):
                attempts += 1
                # Stable per attempt: a transport resend reuses it, a new attempt does not.
                key = f"{self.ctx.task_id}/{step.id}/{peer}/{attempt}"
                envelope = self.ctx.task_request(
                    f"urn:asap:agent:{peer}",
                    step.skill,
                    data,
                    config=TaskRequestConfig(idempotency_key=key),
                )
                try:
                    reply = await self.batcher.send(peer, envelope, step.timeout_seconds)
                except ASAPError as exc:
                    error = f"{peer}: {exc}"
                else:
                    response = reply.payload
                    if isinstance(response, TaskResponse) and response.status == "completed":
                        self.log.info(
                            "asap.orchestration.step_completed",
                            step=step.id,
                            peer=peer,
                            attempts=attempts,
                        )
                        return StepOutcome(
                            id=step.id,
                            status="completed",
                            peer=peer,
                            task_id=response.task_id,
                            result=response.result,
                            attempts=attempts,
                            duration_ms=round((time.perf_counter() - started) * 1000, 3),
                        )
                    error = f"{peer}: {_task_error(reply.payload_dict)}"
                self.log.warning(
                    "asap.orchestration.step_attempt_failed",
                    step=step.id,
                    peer=peer,
                    attempt=attempts,
                    error=error,
                )
        status: Literal["failed", "skipped"] = (
            "skipped" if step.on_error is ErrorPolicy.SKIP else "failed"
        )
        return StepOutcome(
            id=step.id,
            status=status,
            error=error,
            attempts=attempts,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )


def _task_error(payload: dict[str, Any]) -> str:
    result = payload.get("result") or {}
    error = result.get("error") if isinstance(result, dict) else None
    if isinstance(error, dict):
        return f"task {payload.get('status')}: {error.get('type')}: {error.get('message')}"
    return f"task {payload.get('status')}"

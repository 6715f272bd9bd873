"""The orchestrator skill: run a plan of steps on the agent's configured peers.

Input is a :class:`asap.orchestration.Plan`; output every step's outcome and the orchestration
state. Peers come from ``ASAP_PEERS`` (``name=url,...``); nothing else can be called. A plan
that does not complete fails the task, and its result still carries the outcomes and state.
"""

from __future__ import annotations

from asap import Context, skill
from asap.errors import TaskFailedError
from asap.orchestration import OrchestrationOutput, Orchestrator, Plan


@skill("orchestrate", description="Run a plan of steps on peer agents", resumable=True)
async def orchestrate(plan: Plan, ctx: Context) -> OrchestrationOutput:
    """Run ``plan``: sequential, parallel or dependency-graph, with per-step error policies."""
    max_steps = ctx.settings.max_plan_steps if ctx.settings else 100
    if len(plan.steps) > max_steps:
        raise TaskFailedError(f"plan has {len(plan.steps)} steps; this agent accepts {max_steps}")
    fan_out = ctx.settings.max_fan_out if ctx.settings else 16
    return await Orchestrator(plan, ctx, max_fan_out=fan_out).run()

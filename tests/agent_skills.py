"""Skills the tests serve from real agent processes (``ASAP_SKILLS=tests.agent_skills``)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pydantic import BaseModel, Field

from asap import Context, skill


class Greeting(BaseModel):
    name: str = Field(min_length=1)
    times: int = Field(default=1, ge=1, le=5)


class Greeted(BaseModel):
    text: str


@skill("greet", description="Greet someone, validated by pydantic models")
async def greet(data: Greeting) -> Greeted:
    return Greeted(text=" ".join(f"hello {data.name}" for _ in range(data.times)))


@skill("whoami")
def whoami(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Report the context and the thread a sync skill runs in."""
    return {
        "thread": threading.current_thread().name,
        "task_id": ctx.task_id,
        "conversation_id": ctx.conversation_id,
        "trace_id": ctx.trace_id,
        "envelope_id": ctx.envelope.id,
        "skill_id": ctx.skill_id,
        "agent_id": ctx.agent_id,
        "time_left": ctx.time_left(),
        "has_client": ctx.client is not None,
    }


@skill("sleep")
async def sleep(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Sleep ``seconds`` then answer."""
    ctx.logger.info("test.sleeping", seconds=data.get("seconds", 0))
    await asyncio.sleep(float(data.get("seconds", 0)))
    return {"slept": data.get("seconds", 0)}


@skill("own-timeout")
async def own_timeout(data: dict[str, Any]) -> dict[str, Any]:
    """Hit a timeout of its own (``asyncio.timeout``), not the task's deadline."""
    async with asyncio.timeout(float(data.get("seconds", 0.01))):
        await asyncio.sleep(30)
    return {}


@skill("not-json")
async def not_json(data: dict[str, Any]) -> dict[str, Any]:
    """Return a dict JSON cannot carry (a set inside)."""
    return {"tags": {"a", "b"}}


@skill("fail")
async def fail(data: dict[str, Any]) -> dict[str, Any]:
    """Raise the error described by the input."""
    raise ValueError(data.get("message", "boom"))


@skill("bad-return")
def bad_return(data: dict[str, Any]) -> Any:
    return ["not", "a", "dict"]


@skill("progress", resumable=True)
async def progress(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Checkpoint and report progress for ``steps`` steps of ``seconds`` each; on resume,
    continue after the last checkpointed step."""
    steps = int(data.get("steps", 3))
    first = ctx.resumed.data["done"] if ctx.resumed is not None else 0
    for step in range(first, steps):
        await asyncio.sleep(float(data.get("seconds", 0)))
        await ctx.checkpoint({"done": step + 1})
        await ctx.report_progress(100 * (step + 1) / steps, f"step {step + 1} of {steps}")
    return {"done": steps, "resumed_from": first}


@skill("note")
async def note(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Log ``input["note"]`` (whatever a caller put there) and answer."""
    ctx.logger.info("test.note", note=data.get("note"), data=data)
    return {"noted": True}

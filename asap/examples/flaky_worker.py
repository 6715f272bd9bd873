"""A worker agent that fails on demand: ``uvicorn asap.examples.flaky_worker:app``.

Used by the ``error_recovery`` example and by the fault-injection tests. Its skill ``work``
counts executions per ``input["tag"]``, sleeps ``input["seconds"]`` (cancellable) and fails
when ``input["fail"]`` is true.

``POST /_faults`` sets faults (JSON, every key optional) and resets the counters:
  ``http_500``: answer the next N ``POST /asap`` with HTTP 500 before processing them;
  ``lose_reply``: process the next N, then answer 500 (the reply is lost on the way back);
  ``flap``: alternate N failing (500) and N served requests, indefinitely.
``GET /_faults`` returns the counters: executions per tag, requests seen, cancellations, the
highest number of skills running at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asap import Context, SkillRegistry, skill
from asap.transport.app import create_app

__all__ = ["app", "build", "work"]

STATE: dict[str, Any] = {}


def reset(faults: dict[str, int] | None = None) -> None:
    """Clear the counters and set the faults."""
    STATE.clear()
    STATE.update(
        http_500=0,
        injected=0,
        lose_reply=0,
        flap=0,
        seen=0,
        executions={},
        cancelled=0,
        running=0,
        max_running=0,
        contexts=[],
    )
    STATE.update(faults or {})


reset()


@skill("work", description="Count an execution under input['tag'], sleep input['seconds']")
async def work(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
    tag = str(data.get("tag", "default"))
    STATE["executions"][tag] = STATE["executions"].get(tag, 0) + 1
    STATE["contexts"].append(
        {
            "conversation_id": ctx.conversation_id,
            "trace_id": ctx.trace_id,
            "parent": ctx.envelope.payload.parent_task_id,
            "time_left": ctx.time_left(),
        }
    )
    STATE["running"] += 1
    STATE["max_running"] = max(STATE["max_running"], STATE["running"])
    try:
        await asyncio.sleep(float(data.get("seconds", 0)))
    except asyncio.CancelledError:
        STATE["cancelled"] += 1
        raise
    finally:
        STATE["running"] -= 1
    if data.get("fail"):
        raise RuntimeError(f"work {tag} failed on purpose")
    return {"tag": tag, "echo": data, "agent": ctx.agent_id}


class FaultMiddleware:
    """Injects the configured HTTP-level faults into ``POST /asap``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/asap":
            await self.app(scope, receive, send)
            return
        STATE["seen"] += 1
        if STATE["http_500"] > 0:
            STATE["injected"] += 1
            STATE["http_500"] -= 1
            await Response("injected failure", 500)(scope, receive, send)
            return
        if STATE["flap"]:
            period = STATE["flap"]
            if ((STATE["seen"] - 1) // period) % 2 == 0:
                STATE["injected"] += 1
                await Response("injected flap", 500)(scope, receive, send)
                return
        if STATE["lose_reply"] > 0:
            STATE["lose_reply"] -= 1

            async def drop(message: Message) -> None:
                pass

            await self.app(scope, receive, drop)  # processed; its reply goes nowhere
            await Response("reply lost", 500)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def faults(request: Request) -> Response:
    if request.method == "POST":
        reset(json.loads(await request.body() or b"{}"))
    return JSONResponse({k: v for k, v in STATE.items()})


def build() -> Any:
    """The worker app: ``work`` served by :func:`create_app`, plus ``/_faults``."""
    app = create_app(registry=SkillRegistry([work]))
    app.router.routes.append(Route("/_faults", faults, methods=["GET", "POST"]))
    app.add_middleware(FaultMiddleware)
    return app


app = build()

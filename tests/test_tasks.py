"""Tasks on the server (issue 4.2): lifecycle, state.query, task.cancel, state.restore,
progress, checkpoints, respond-async and streaming — in-process, on the memory backend."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from asap.transport.app import create_app
from tests.conftest import echo_settings, serve_in_process

pytestmark = pytest.mark.anyio


def frame(payload_type: str, payload: dict[str, Any], **envelope: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "asap.send",
        "params": {
            "envelope": {
                "asap_version": "0.1",
                "sender": "urn:asap:agent:tester",
                "recipient": "urn:asap:agent:echo-agent",
                "payload_type": payload_type,
                "payload": payload,
                **envelope,
            }
        },
        "id": "t",
    }


def task(skill: str, data: dict[str, Any], **config: Any) -> dict[str, Any]:
    payload = {"conversation_id": "c", "skill_id": skill, "input": data}
    if config:
        payload["config"] = config
    return frame("task.request", payload)


APPS: dict[int, Any] = {}


@pytest.fixture
async def agent() -> Any:
    settings = echo_settings(skills=("skills.echo", "tests.agent_skills"), task_lease_seconds=3)
    app = create_app(settings)
    async with serve_in_process(app) as client:
        APPS[id(client)] = app
        yield client
        del APPS[id(client)]


def manager_of(agent: httpx.AsyncClient) -> Any:
    """The agent's TaskManager (white-box access for the takeover test)."""
    return APPS[id(agent)].state.dispatcher.tasks


async def call(agent: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> Any:
    response = await agent.post("/asap", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def payload(reply: dict[str, Any]) -> dict[str, Any]:
    assert "result" in reply, reply
    return reply["result"]["envelope"]["payload"]  # type: ignore[no-any-return]


async def query(agent: httpx.AsyncClient, task_id: str, **extra: Any) -> dict[str, Any]:
    return payload(await call(agent, frame("state.query", {"task_id": task_id, **extra})))


async def wait_for(agent: httpx.AsyncClient, task_id: str, status: str) -> dict[str, Any]:
    for _ in range(400):
        state = await query(agent, task_id)
        if state["status"] == status:
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"{task_id} never reached {status}: {state}")


async def test_a_finished_task_can_be_queried(agent: httpx.AsyncClient) -> None:
    done = payload(await call(agent, task("echo", {"x": 1})))
    state = await query(agent, done["task_id"])
    assert state["status"] == "completed"
    assert state["result"] == {"echoed": {"x": 1}}
    assert state["final_state"] is None


async def test_respond_async_then_poll_progress_and_checkpoints(agent: httpx.AsyncClient) -> None:
    body = task("progress", {"steps": 3, "seconds": 0.05})
    started = payload(await call(agent, body, prefer="respond-async"))
    assert started["status"] == "working" and started["result"] is None
    state = await wait_for(agent, started["task_id"], "completed")
    assert state["result"] == {"done": 3, "resumed_from": 0}
    assert state["final_state"]["version"] == 3 and state["final_state"]["data"] == {"done": 3}
    assert state["final_state"]["checkpoint"] is True
    assert state["metrics"]["progress"]["percent"] == 100
    first = await query(agent, started["task_id"], version=1)
    assert first["final_state"]["data"] == {"done": 1}


async def test_cancel_stops_a_running_task(agent: httpx.AsyncClient) -> None:
    started = payload(await call(agent, task("sleep", {"seconds": 30}), prefer="respond-async"))
    cancel = frame("task.cancel", {"task_id": started["task_id"], "reason": "changed my mind"})
    cancelled = payload(await call(agent, cancel))
    assert cancelled["status"] == "cancelled"
    assert (await query(agent, started["task_id"]))["status"] == "cancelled"
    again = await call(agent, cancel)
    assert again["error"]["code"] == -32030
    assert (
        again["error"]["message"]
        == f"Task already completed: {started['task_id']} (status: cancelled)"
    )


async def test_a_waiting_caller_sees_the_cancellation(agent: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(call(agent, task("progress", {"steps": 50, "seconds": 0.1})))
    for _ in range(200):
        await asyncio.sleep(0.02)
        records = manager_of(agent).running
        if records:
            break
    (task_id,) = list(records)
    await call(agent, frame("task.cancel", {"task_id": task_id}))
    assert payload(await waiting)["status"] == "cancelled"


async def test_unknown_tasks_are_32010(agent: httpx.AsyncClient) -> None:
    for body in (
        frame("task.cancel", {"task_id": "task_nope"}),
        frame("state.query", {"task_id": "task_nope"}),
        frame("state.restore", {"task_id": "task_nope", "snapshot_id": "s"}),
    ):
        error = (await call(agent, body))["error"]
        assert error["code"] == -32010 and error["data"]["code"] == "asap:task/not_found"


async def test_restore_rolls_back_and_resumes(agent: httpx.AsyncClient) -> None:
    started = payload(
        await call(agent, task("progress", {"steps": 4, "seconds": 0.05}), prefer="respond-async")
    )
    task_id = started["task_id"]
    await wait_for(agent, task_id, "completed")
    second = (await query(agent, task_id, version=2))["final_state"]
    restored = payload(
        await call(agent, frame("state.restore", {"task_id": task_id, "snapshot_id": second["id"]}))
    )
    # a finished task is not run again (spec 2.3: terminal), but its state rolls back
    assert restored["status"] == "completed"
    assert restored["final_state"]["data"] == {"done": 2}
    assert restored["final_state"]["version"] == 5


async def test_stream_follows_progress_to_the_end(agent: httpx.AsyncClient) -> None:
    response = await agent.post("/asap/stream", json=task("progress", {"steps": 2}))
    events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line]
    payloads = [e["payload"] for e in events]
    assert [p["final"] for p in payloads] == [False, False, False, True]
    assert [p["progress"] for p in payloads] == [0.0, 0.5, 1.0, 1.0]
    assert json.loads(payloads[-1]["chunk"])["result"] == {"done": 2, "resumed_from": 0}
    assert {e["correlation_id"] for e in events} == {events[0]["correlation_id"]}


async def test_a_task_whose_owner_vanished_is_taken_over(agent: httpx.AsyncClient) -> None:
    """A record left 'working' by a dead instance: resumable skills resume from the latest
    checkpoint under the same id; others are marked failed."""
    manager = manager_of(agent)
    from asap.models.enums import TaskStatus
    from asap.state.store import TaskRecord

    def orphan(task_id: str, skill: str, data: dict[str, Any]) -> TaskRecord:
        envelope = task(skill, data)["params"]["envelope"]
        from asap.models.envelope import Envelope

        return TaskRecord(
            id=task_id,
            conversation_id="c",
            skill_id=skill,
            sender="urn:asap:agent:x",
            status=TaskStatus.WORKING,
            request=Envelope.model_validate(envelope).model_dump(mode="json"),
            owner="dead-instance",
            lease_until=0.0,
        )

    await manager.storage.tasks.create(orphan("task_resumable", "progress", {"steps": 3}))
    await manager.storage.snapshots.append("task_resumable", {"done": 2}, checkpoint=True)
    await manager.storage.tasks.create(orphan("task_plain", "sleep", {"seconds": 0}))
    # another kind of agent's task in the same storage: left for an agent that serves it
    await manager.storage.tasks.create(orphan("task_foreign", "orchestrate", {"steps": []}))
    await manager.adopt_orphans()
    foreign = await manager.storage.tasks.get("task_foreign")
    assert (foreign.status, foreign.owner) == (TaskStatus.WORKING, "dead-instance")
    resumed = await wait_for(agent, "task_resumable", "completed")
    assert resumed["result"] == {"done": 3, "resumed_from": 2}
    lost = await query(agent, "task_plain")
    assert lost["status"] == "failed" and lost["result"]["error"]["type"] == "TaskLostError"

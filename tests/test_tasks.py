"""Tasks on the server (issue 4.2): lifecycle, state.query, task.cancel, state.restore,
progress, checkpoints, respond-async and streaming — in-process, on the memory backend."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asap import tasks as tasks_module
from asap.errors import ConfigurationError
from asap.models.enums import TaskStatus
from asap.settings import Settings
from asap.state.sqlite import SCHEMA
from asap.state.store import StorageError, TaskRecord
from asap.transport.app import create_app
from tests.conftest import echo_settings, serve_in_process
from tests.state.test_contract import REDIS_URL, delete_redis_keys, require_redis

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


async def test_a_task_keeps_its_request_only_while_it_can_run_again(
    agent: httpx.AsyncClient,
) -> None:
    # A stored running task keeps the request it would be resumed from: stored before the
    # reply (respond-async), or at its first progress report while its caller waits.
    manager = manager_of(agent)
    background = task("sleep", {"seconds": 30})
    started = payload(await call(agent, background, prefer="respond-async"))
    assert started["status"] == "working"
    waited = task("progress", {"steps": 50, "seconds": 0.1})
    waiting = asyncio.create_task(call(agent, waited))
    for _ in range(200):
        stored = [await manager.storage.tasks.get(task_id) for task_id in manager.running]
        if len(stored) == 2 and all(stored):
            break
        await asyncio.sleep(0.02)
    by_skill = {record.skill_id: record for record in stored}
    for body in (background, waited):
        envelope = body["params"]["envelope"]
        request = by_skill[envelope["payload"]["skill_id"]].request
        assert request["payload"] == envelope["payload"]
        assert request["sender"] == envelope["sender"] and request["id"]
    # Once finished, a task is never run again: its record drops the request.
    for record in stored:
        await call(agent, frame("task.cancel", {"task_id": record.id}))
        finished = await manager.storage.tasks.get(record.id)
        assert finished.status is TaskStatus.CANCELLED and finished.request == {}
    assert payload(await waiting)["status"] == "cancelled"
    short = payload(await call(agent, task("echo", {"x": 1})))
    await manager.flush()
    finished = await manager.storage.tasks.get(short["task_id"])
    assert finished.status is TaskStatus.COMPLETED and finished.request == {}
    assert finished.result == {"echoed": {"x": 1}}


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


async def test_each_task_is_cancelled_at_its_own_deadline(agent: httpx.AsyncClient) -> None:
    # One timer serves every deadline: a later, shorter deadline must still come first, a
    # task that ends early must not disturb the others, and a skill's own timeout is its own
    # error, not the deadline.
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def run(body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        done = payload(await call(agent, body))
        return done, loop.time() - started

    longer = asyncio.create_task(run(task("sleep", {"seconds": 30}, timeout_seconds=3)))
    quick = asyncio.create_task(run(task("sleep", {"seconds": 0.1}, timeout_seconds=1)))
    shorter = asyncio.create_task(run(task("sleep", {"seconds": 30}, timeout_seconds=1)))
    own = asyncio.create_task(run(task("own-timeout", {"seconds": 0.05}, timeout_seconds=5)))
    (
        (long_reply, long_at),
        (quick_reply, _),
        (short_reply, short_at),
        (own_reply, _),
    ) = await asyncio.gather(longer, quick, shorter, own)
    assert quick_reply["status"] == "completed"
    for reply in (long_reply, short_reply):
        assert reply["status"] == "failed"
        assert reply["result"]["error"]["type"] == "ASAPTimeoutError"
    assert 1 <= short_at < long_at and long_at >= 3
    assert own_reply["status"] == "failed"
    assert own_reply["result"]["error"]["type"] == "TimeoutError"
    assert not manager_of(agent)._deadlines._alarms  # nothing left watched


async def test_a_result_without_a_json_form_fails_its_task_and_no_other(
    agent: httpx.AsyncClient,
) -> None:
    # A set in a skill's result once made the reply -32603 and every later write of the
    # task outbox fail (no finished task stored again, and the agent hung when stopping).
    bad = payload(await call(agent, task("not-json", {})))
    assert bad["status"] == "failed"
    assert bad["result"]["error"]["type"] == "TypeError"
    assert "JSON cannot carry" in bad["result"]["error"]["message"]
    good = payload(await call(agent, task("echo", {"x": 1})))
    manager = manager_of(agent)
    for _ in range(400):  # the outbox is written every few ms
        if not manager.outbox:
            break
        await asyncio.sleep(0.01)
    for task_id, status in ((bad["task_id"], "failed"), (good["task_id"], "completed")):
        stored = await manager.storage.tasks.get(task_id)
        assert stored is not None and stored.status.value == status


async def test_a_stopping_agent_gives_up_on_an_outbox_it_cannot_write(
    agent: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    manager = manager_of(agent)

    async def broken(records: list[TaskRecord]) -> None:
        raise StorageError("the disk is gone")

    manager.storage.tasks.create_many = broken  # the storage fails from now on
    done = payload(await call(agent, task("echo", {"x": 1})))
    assert done["status"] == "completed"
    await asyncio.wait_for(manager.stop(), 10)  # three attempts, 0.5 s apart
    assert not manager.outbox
    assert "asap.tasks.outbox_lost" in capsys.readouterr().out


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


# Retention: finished tasks are deleted after ASAP_TASK_RETENTION_SECONDS


class Events:
    """Stands in for ``asap.tasks._log`` (the real one is cached at the level of its first
    use): records (event, fields) per level."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))


@pytest.fixture(params=["memory", "sqlite", "redis"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state.db"
    else:
        require_redis()
        prefix = f"asap-test:{uuid.uuid4().hex}:"
        yield f"{REDIS_URL}?prefix={prefix}"
        delete_redis_keys(prefix)


async def test_finished_tasks_are_purged_after_the_retention(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished task (and its snapshots) is gone once the retention has passed: state.query
    answers -32010; a running task as old is untouched."""
    settings = echo_settings(
        skills=("skills.echo", "tests.agent_skills"),
        storage_url=storage_url,
        task_lease_seconds=60,  # the lease loop stays asleep: the test ticks itself
        task_retention_seconds=2,
    )
    app = create_app(settings)
    async with serve_in_process(app) as client:
        manager = app.state.dispatcher.tasks
        echoed = payload(await call(client, task("echo", {"x": 1})))["task_id"]
        body = task("progress", {"steps": 2, "seconds": 0.01})
        checkpointed = payload(await call(client, body, prefer="respond-async"))["task_id"]
        await wait_for(client, checkpointed, "completed")
        body = task("sleep", {"seconds": 30})
        running = payload(await call(client, body, prefer="respond-async"))["task_id"]
        await manager.flush()  # the echo task's record leaves the outbox
        assert await manager.storage.snapshots.list_versions(checkpointed) == [1, 2]
        events = Events()
        monkeypatch.setattr(tasks_module, "_log", events)
        await manager._tick()
        assert (await query(client, echoed))["status"] == "completed"  # not 2 s old
        await asyncio.sleep(2.2)
        await manager._tick()
        assert ("info", "asap.tasks.purged", {"count": 2}) in events.lines
        for task_id in (echoed, checkpointed):
            error = (await call(client, frame("state.query", {"task_id": task_id})))["error"]
            assert error["code"] == -32010 and error["data"]["code"] == "asap:task/not_found"
        assert await manager.storage.snapshots.list_versions(checkpointed) == []
        assert (await query(client, running))["status"] == "working"
        cancelled = payload(await call(client, frame("task.cancel", {"task_id": running})))
        assert cancelled["status"] == "cancelled"


def finished_long_ago(task_id: str) -> TaskRecord:
    """An echo task that completed in 1970: past any retention."""
    return TaskRecord(
        id=task_id,
        conversation_id="c",
        skill_id="echo",
        sender="urn:asap:agent:x",
        status=TaskStatus.COMPLETED,
        request=task("echo", {})["params"]["envelope"],
        result={"echoed": {}},
        created_at=1.0,
        updated_at=1.0,
    )


async def test_retention_zero_keeps_finished_tasks_forever(agent: httpx.AsyncClient) -> None:
    manager = manager_of(agent)
    old = finished_long_ago("task_finished_long_ago")
    await manager.storage.tasks.create(old)
    manager.settings = manager.settings.with_overrides(task_retention_seconds=0)
    await manager._tick()
    assert (await query(agent, old.id))["status"] == "completed"
    manager.settings = manager.settings.with_overrides(task_retention_seconds=86400)
    await manager._tick()
    error = (await call(agent, frame("state.query", {"task_id": old.id})))["error"]
    assert error["code"] == -32010


async def test_a_failing_purge_does_not_stop_the_lease_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite index the purge names is dropped under the agent: every purge fails (and is
    logged) while the loop goes on; recreated, the next tick purges."""
    path = tmp_path / "state.db"
    settings = echo_settings(storage_url=f"sqlite:///{path}", task_lease_seconds=1)
    app = create_app(settings)
    events = Events()
    monkeypatch.setattr(tasks_module, "_log", events)
    async with serve_in_process(app) as client:
        manager = app.state.dispatcher.tasks
        old = finished_long_ago("task_old")
        conn = sqlite3.connect(path)
        try:
            conn.execute("DROP INDEX tasks_finished")
            await manager.storage.tasks.create(old)
            for _ in range(100):
                await asyncio.sleep(0.05)
                failures = [e for _, e, _ in events.lines if e == "asap.tasks.maintenance_failed"]
                if len(failures) >= 2:
                    break
            assert len(failures) >= 2, events.lines
            assert await manager.storage.tasks.get("task_old") is not None
            conn.executescript(SCHEMA)
        finally:
            conn.close()
        for _ in range(100):
            if await manager.storage.tasks.get("task_old") is None:
                break
            await asyncio.sleep(0.05)
        assert await manager.storage.tasks.get("task_old") is None
        assert ("info", "asap.tasks.purged", {"count": 1}) in events.lines
        assert (await call(client, task("echo", {"x": 1})))["result"]


def test_task_retention_setting() -> None:
    assert Settings().task_retention_seconds == 86400
    assert Settings.from_env({"ASAP_TASK_RETENTION_SECONDS": "0"}).task_retention_seconds == 0
    assert Settings.from_env({"ASAP_TASK_RETENTION_SECONDS": "600"}).task_retention_seconds == 600
    with pytest.raises(ConfigurationError, match="ASAP_TASK_RETENTION_SECONDS must be 0"):
        Settings.from_env({"ASAP_TASK_RETENTION_SECONDS": "-1"})
    with pytest.raises(ConfigurationError, match="ASAP_TASK_RETENTION_SECONDS must be an integer"):
        Settings.from_env({"ASAP_TASK_RETENTION_SECONDS": "1d"})


async def test_stop_waits_for_the_outbox_write_in_flight(
    storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent stopped while its outbox is being written lets that write end before the
    storage closes: the task is stored and nothing fails at shutdown."""
    settings = echo_settings(skills=("skills.echo",), storage_url=storage_url)
    app = create_app(settings)
    in_flight: list[int] = []
    async with serve_in_process(app) as client:
        manager = app.state.dispatcher.tasks
        write = manager.storage.tasks.create_many
        entered = asyncio.Event()

        async def slow_first_write(records: list[TaskRecord]) -> None:
            first = not entered.is_set()
            entered.set()
            in_flight.append(1)
            try:
                if first:  # the outbox flusher's write is still running when stop() starts
                    await asyncio.sleep(0.2)
                await write(records)
            finally:
                in_flight.pop()

        manager.storage.tasks.create_many = slow_first_write
        done = payload(await call(client, task("echo", {"x": 1})))
        await asyncio.wait_for(entered.wait(), 5)
        await manager.stop()
        assert not in_flight
        stored = await manager.storage.tasks.get(done["task_id"])
        assert stored is not None and stored.status is TaskStatus.COMPLETED
    assert "outbox_write_failed" not in capsys.readouterr().out

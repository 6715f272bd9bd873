"""Graceful shutdown: SIGTERM drains the agent without losing accepted work, and ``/ready``
says when an agent should not get traffic."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from asap.process import AgentProcess, free_port
from tests.conftest import asap_send
from tests.security.common import frame, start_uvicorn
from tests.test_metrics import parse, value


def task_frame(skill: str, data: dict[str, Any]) -> dict[str, Any]:
    return frame("urn:asap:agent:tester", skill, data)


def query_frame(task_id: str) -> dict[str, Any]:
    return asap_send("state.query", {"task_id": task_id})


def payload(reply: dict[str, Any]) -> dict[str, Any]:
    assert "result" in reply, reply
    return reply["result"]["envelope"]["payload"]  # type: ignore[no-any-return]


def wait_until(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def running(client: httpx.AsyncClient, base: str, tasks: int) -> None:
    """Wait until the agent runs at least ``tasks`` tasks (``asap_tasks_in_flight``), so a
    signal sent next finds every request inside it."""
    deadline = time.monotonic() + 30
    while True:
        samples = parse((await client.get(base + "/asap/metrics")).text)
        in_flight = value(samples, "asap_tasks_in_flight")
        if in_flight >= tasks:
            return
        assert time.monotonic() < deadline, f"never {tasks} tasks in flight: {in_flight}"
        await asyncio.sleep(0.05)


def test_sigterm_during_20_in_flight_tasks_loses_none(tmp_path: Path) -> None:
    """12 callers wait on 3 s tasks and 8 resumable tasks run in the background when SIGTERM
    arrives. The waiting callers all get their completed replies (no reset); /ready says
    draining and new tasks are refused with 503 meanwhile; the background tasks, still
    running when the 6 s grace ends, are left resumable, and a restarted agent finishes them
    from their checkpoints."""
    env = {
        "ASAP_SKILLS": "skills.echo,tests.agent_skills",
        "ASAP_STORAGE_URL": f"sqlite:///{tmp_path}/state.db",
        "ASAP_SHUTDOWN_GRACE_SECONDS": "6",
        "ASAP_SHUTDOWN_DELAY_SECONDS": "1",
        "ASAP_TASK_LEASE_SECONDS": "2",
        "ASAP_RATE_LIMIT": "off",
    }
    agent = start_uvicorn(tmp_path, "first", env)
    agent.wait_ready()
    url = agent.url + "/asap"
    background = []
    for _ in range(8):
        reply = httpx.post(
            url,
            json=task_frame("progress", {"steps": 40, "seconds": 0.25}),
            headers={"prefer": "respond-async"},
        ).json()
        background.append(payload(reply)["task_id"])

    async def callers_and_sigterm() -> tuple[list[httpx.Response], list[int], int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=20)) as c:
            waiting = [
                asyncio.create_task(c.post(url, json=task_frame("sleep", {"seconds": 3})))
                for _ in range(12)
            ]
            await running(c, agent.url, 20)  # every request inside the agent before the signal
            assert agent.process is not None
            agent.process.send_signal(signal.SIGTERM)
            ready_codes, refused = [], 0
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the port stays open for the 1 s delay
                try:
                    ready = await c.get(agent.url + "/ready")
                except httpx.TransportError:
                    break
                ready_codes.append(ready.status_code)
                if ready.status_code == 503 and not refused:
                    late = await c.post(url, json=task_frame("echo", {"late": True}))
                    refused = late.status_code
                await asyncio.sleep(0.05)
            return await asyncio.gather(*waiting), ready_codes, refused

    replies, ready_codes, refused = asyncio.run(callers_and_sigterm())
    assert [r.status_code for r in replies] == [200] * 12
    assert [payload(r.json())["status"] for r in replies] == ["completed"] * 12
    assert 503 in ready_codes, ready_codes
    assert refused == 503
    assert agent.process is not None
    agent.process.wait(timeout=30)
    log = agent.log_path.read_text()
    assert "asap.server.draining" in log and "asap.server.grace_expired" in log

    second = start_uvicorn(tmp_path, "second", env)
    try:
        second.wait_ready()

        def finished() -> list[dict[str, Any]] | None:
            states = [
                payload(httpx.post(second.url + "/asap", json=query_frame(t)).json())
                for t in background
            ]
            return states if all(s["status"] == "completed" for s in states) else None

        states = wait_until(finished, "the resumed tasks to complete", timeout=60)
    finally:
        second.stop()
    for state in states:
        assert state["result"]["done"] == 40
        assert state["result"]["resumed_from"] > 0  # continued from a checkpoint


def test_a_task_still_running_when_the_grace_ends_fails_cleanly(tmp_path: Path) -> None:
    """A non-resumable task cannot be left to another instance: its caller gets a ``failed``
    reply that says why, not a dropped connection."""
    env = {
        "ASAP_SKILLS": "tests.agent_skills",
        "ASAP_STORAGE_URL": f"sqlite:///{tmp_path}/state.db",
        "ASAP_SHUTDOWN_GRACE_SECONDS": "1",
    }
    agent = start_uvicorn(tmp_path, "agent", env)
    agent.wait_ready()

    async def call_and_stop() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as client:
            call = asyncio.create_task(
                client.post(agent.url + "/asap", json=task_frame("sleep", {"seconds": 60}))
            )
            await running(client, agent.url, 1)
            assert agent.process is not None
            agent.process.send_signal(signal.SIGTERM)
            return await call

    reply = asyncio.run(call_and_stop())
    assert agent.process is not None
    agent.process.wait(timeout=30)
    result = payload(reply.json())
    assert result["status"] == "failed"
    assert result["result"]["error"]["type"] == "ShutdownError"


class Proxy:
    """A TCP relay to Redis that the test can cut: the agent's storage becomes unreachable
    while the agent keeps running."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.open = True
        self.pairs: list[tuple[socket.socket, socket.socket]] = []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        while True:
            client, _ = await loop.sock_accept(self.listener)
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setblocking(False)
            self.pairs.append((client, upstream))
            loop.create_task(self.pump(client, upstream))
            loop.create_task(self.pump(upstream, client))

    async def pump(self, source: socket.socket, sink: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(source, 65536):
                await loop.sock_sendall(sink, data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()

    def cut(self) -> None:
        self.open = False
        for pair in self.pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_ready_fails_while_the_storage_is_unreachable(tmp_path: Path) -> None:
    from tests.security.common import redis_url

    url = redis_url()

    async def scenario() -> tuple[int, int, int]:
        proxy = Proxy(("127.0.0.1", 6379))
        server = asyncio.create_task(proxy.serve())
        proxied = url.replace("127.0.0.1:6379", f"127.0.0.1:{proxy.port}")
        agent = AgentProcess.uvicorn(
            env={"ASAP_STORAGE_URL": proxied + "&socket_timeout=1"},
            log_path=tmp_path / "agent.log",
        ).start(wait=False)
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        before = (await client.get(agent.url + "/ready")).status_code
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
                proxy.cut()
                during = (await client.get(agent.url + "/ready")).status_code
                alive = (await client.get(agent.url + "/health")).status_code
        finally:
            agent.stop()
            server.cancel()
            proxy.cut()
            proxy.listener.close()
        return before, during, alive

    before, during, alive = asyncio.run(scenario())
    assert (before, during, alive) == (200, 503, 200)


@pytest.mark.anyio
async def test_ready_is_ok_in_process() -> None:
    from asap.transport.app import create_app
    from tests.conftest import echo_settings, serve_in_process

    async with serve_in_process(create_app(echo_settings())) as http:
        assert (await http.get("/ready")).json() == {"status": "ok"}

"""Shared fixtures: in-process apps (with lifespan) and real agent processes on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from asap.models.ids import generate_id
from asap.process import AgentProcess, free_port
from asap.settings import Settings
from asap.transport.app import create_app

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ECHO_ID = "urn:asap:agent:echo-agent"


def echo_settings(**overrides: object) -> Settings:
    """Settings of an echo agent that describes itself as the reference's does."""
    base = Settings(
        agent_id=ECHO_ID,
        agent_name="Echo Agent",
        agent_version="0.3.0",
        agent_description="Echoes task input as output",
        skills=("skills.echo",),
        public_url="http://127.0.0.1:8003",
        log_level="WARNING",
        storage_url="memory://",
    )
    return base.with_overrides(**overrides)


def asap_send(
    payload_type: str,
    payload: dict[str, Any],
    *,
    sender: str = "urn:asap:agent:tester",
    recipient: str = "urn:asap:agent:target",
    extensions: dict[str, Any] | None = None,
    request_id: Any = None,
) -> dict[str, Any]:
    """One ``asap.send`` JSON-RPC request: the envelope as a caller writes it on the wire."""
    envelope: dict[str, Any] = {
        "asap_version": "0.1",
        "sender": sender,
        "recipient": recipient,
        "payload_type": payload_type,
        "payload": payload,
    }
    if extensions is not None:
        envelope["extensions"] = extensions
    return {
        "jsonrpc": "2.0",
        "method": "asap.send",
        "params": {"envelope": envelope},
        "id": request_id or generate_id(),
    }


@asynccontextmanager
async def serve_in_process(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``app`` in-process, with its lifespan running."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8003") as c:
            yield c


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def isolated_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Agents started by tests keep their state in memory unless a test says otherwise, so
    no run leaves (or inherits) an ``asap-state.db`` in the repository."""
    previous = os.environ.get("ASAP_STORAGE_URL")
    os.environ["ASAP_STORAGE_URL"] = "memory://"
    yield
    if previous is None:
        del os.environ["ASAP_STORAGE_URL"]
    else:
        os.environ["ASAP_STORAGE_URL"] = previous


def delete_redis_keys(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> None:
    """Delete every key under ``prefix`` (what a test wrote to Redis)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


REDIS_PREFIXES: list[str] = []
"""Key prefixes handed to agents under test (``tests.security.common.redis_url``), deleted
when the session ends."""


@pytest.fixture(scope="session", autouse=True)
def forget_redis_prefixes() -> Iterator[None]:
    yield
    for prefix in REDIS_PREFIXES:
        delete_redis_keys(prefix)


STARTED_AGENTS: list[AgentProcess] = []
"""Agents started by ``tests.security.common.start_uvicorn``; any still running when its test
ends (a test that failed before stopping it) is killed then."""


@pytest.fixture(autouse=True)
def kill_leftover_agents() -> Iterator[None]:
    yield
    while STARTED_AGENTS:
        STARTED_AGENTS.pop().kill()


@pytest.fixture
async def echo_http() -> AsyncIterator[httpx.AsyncClient]:
    """Raw HTTP access to an in-process echo agent."""
    async with serve_in_process(create_app(echo_settings())) as client:
        yield client


def start_agent(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, name: str = "agent"
) -> AgentProcess:
    """Start ``python -m asap.examples.echo_agent``-style module args on a free port."""
    port = free_port()
    argv = [arg.replace("{port}", str(port)) for arg in args]
    return AgentProcess(
        argv,
        port,
        env={"ASAP_LOG_LEVEL": "INFO", **(env or {})},
        log_path=tmp_path / f"{name}-{port}.log",
    ).start()


@pytest.fixture(scope="session")
def echo_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    """Two real echo agents (``worker-a``, ``worker-b``) served by uvicorn processes."""
    logs = tmp_path_factory.mktemp("echo-agents")
    agents = []
    try:
        for name in ("worker-a", "worker-b"):
            port = free_port()
            agents.append(
                AgentProcess(
                    [
                        "-m",
                        "asap.examples.echo_agent",
                        "--port",
                        str(port),
                        "--agent-id",
                        f"urn:asap:agent:{name}",
                    ],
                    port,
                    log_path=logs / f"{name}.log",
                ).start(wait=False)
            )
        for agent in agents:
            agent.wait_ready()
        yield agents
    finally:
        for agent in agents:
            agent.stop()


REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"


def require_reference() -> Path:
    """The reference venv's interpreter; skip (outside CI) when it is missing."""
    if REF_PYTHON.exists():
        return REF_PYTHON
    reason = "reference venv .venv-ref missing: run `make ref` (needs Python 3.13)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
    raise AssertionError  # unreachable


TEST_AGENT_ID = "urn:asap:agent:test-agent"


@pytest.fixture(scope="session")
def test_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """``uvicorn asap.server:app`` exactly as a user runs it, serving the test skills.

    JSON logs go to ``agent.log_path`` so tests can read what the agent logged.
    """
    port = free_port()
    agent = AgentProcess(
        ["-m", "uvicorn", "asap.server:app", "--host", "127.0.0.1", "--port", str(port)],
        port,
        env={
            "ASAP_SKILLS": "skills.echo,tests.agent_skills",
            "ASAP_AGENT_ID": TEST_AGENT_ID,
            "ASAP_LOG_FORMAT": "json",
            "ASAP_LOG_LEVEL": "INFO",
        },
        log_path=tmp_path_factory.mktemp("test-agent") / "agent.log",
    )
    with agent:
        yield agent

"""Helpers of the security tests: raw frames, real processes, Redis availability."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from asap.models.ids import generate_id
from asap.process import AgentProcess
from tests.conftest import REDIS_PREFIXES, STARTED_AGENTS, asap_send

ALICE, BOB = "urn:asap:agent:alice", "urn:asap:agent:bob"
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"
TOKENS = f"{ALICE}={ALICE_TOKEN},{BOB}={BOB_TOKEN}"


def frame(
    sender: str = ALICE,
    skill: str = "echo",
    data: Any = None,
    *,
    nonce: str | None = None,
    request_id: Any = None,
) -> dict[str, Any]:
    """One ``asap.send`` JSON-RPC request carrying a ``task.request``."""
    return asap_send(
        "task.request",
        {"conversation_id": "c", "skill_id": skill, "input": data or {"n": 1}},
        sender=sender,
        extensions=None if nonce is None else {"nonce": nonce},
        request_id=request_id,
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def error_of(reply: dict[str, Any]) -> tuple[int, Any]:
    """(code, data) of a JSON-RPC error reply."""
    assert "error" in reply, reply
    return reply["error"]["code"], reply["error"]["data"]


def status_of(reply: dict[str, Any]) -> str:
    assert "result" in reply, reply
    return str(reply["result"]["envelope"]["payload"]["status"])


def redis_url() -> str:
    """A Redis URL with a fresh key prefix; skips (outside CI) when Redis is absent."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        reason = "Redis is not reachable on 127.0.0.1:6379 (start it to run this test)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    prefix = f"asap-test-{generate_id()}:"
    REDIS_PREFIXES.append(prefix)  # deleted when the session ends
    return f"redis://127.0.0.1:6379/0?prefix={prefix}"


def start_uvicorn(
    tmp_path: Path, name: str, env: dict[str, str], app: str = "asap.server:app"
) -> AgentProcess:
    """``uvicorn <app>`` on a free loopback port with JSON logs, not yet ready (call
    ``wait_ready``); killed when the test ends if it still runs."""
    agent = AgentProcess.uvicorn(
        app,
        env={"ASAP_LOG_FORMAT": "json", "ASAP_LOG_LEVEL": "INFO", **env},
        log_path=tmp_path / f"{name}.log",
    )
    STARTED_AGENTS.append(agent)
    return agent.start(wait=False)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")

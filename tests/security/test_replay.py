"""Replay protection (spec 3.13): the timestamp window always, nonces when required, kept in
the storage so that a replay to another worker is caught too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from asap.errors import ConfigurationError
from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest
from asap.settings import Settings
from asap.transport.app import create_app
from asap.transport.client import ASAPClient
from asap.transport.resilience import RetryConfig
from tests.conftest import echo_settings, serve_in_process
from tests.security.common import ALICE, BOB, error_of, frame, redis_url, start_uvicorn, status_of

pytestmark = pytest.mark.anyio


async def test_nonces_are_required_and_used_once() -> None:
    async with serve_in_process(create_app(echo_settings(require_nonce=True))) as http:

        async def send(body: dict) -> dict:
            return (await http.post("/asap", json=body)).json()

        code, data = error_of(await send(frame(ALICE)))
        assert code == -32003 and "got NoneType" in data["message"]
        for bad in ("", 5, "x" * 129):
            body = frame(ALICE)
            body["params"]["envelope"]["extensions"] = {"nonce": bad}
            assert error_of(await send(body))[0] == -32003
        assert status_of(await send(frame(ALICE, nonce="n-1"))) == "completed"
        code, data = error_of(await send(frame(ALICE, nonce="n-1")))
        assert code == -32003
        assert data["message"] == "Duplicate nonce detected: n-1"
        assert data["details"]["nonce"] == "n-1"
        assert status_of(await send(frame(BOB, nonce="n-1"))) == "completed"  # per sender
        metrics = (await http.get("/asap/metrics")).text
        assert "asap_invalid_nonce_total 5.0" in metrics


async def test_without_require_nonce_a_nonce_is_not_checked() -> None:
    """The default, as the reference: nonces cost nothing unless the operator asks."""
    async with serve_in_process(create_app(echo_settings())) as http:
        for _ in range(2):
            reply = (await http.post("/asap", json=frame(ALICE, nonce="same"))).json()
            assert status_of(reply) == "completed"


def test_a_nonce_ttl_shorter_than_the_timestamp_window_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must cover the timestamp window"):
        Settings(require_nonce=True, nonce_ttl_seconds=60)


@pytest.mark.parametrize("shared", ["redis", "sqlite"])
def test_a_replay_to_a_second_worker_is_caught(tmp_path: Path, shared: str) -> None:
    url = redis_url() if shared == "redis" else f"sqlite:///{tmp_path}/shared.db"
    env = {"ASAP_STORAGE_URL": url, "ASAP_REQUIRE_NONCE": "true"}
    agents = [start_uvicorn(tmp_path, name, env) for name in ("a", "b")]
    try:
        for agent in agents:
            agent.wait_ready()
        first, second = agents
        body = frame(ALICE, nonce="captured-once")
        accepted = httpx.post(first.url + "/asap", json=body).json()
        replayed = httpx.post(second.url + "/asap", json=body).json()
        again = httpx.post(first.url + "/asap", json=body).json()
    finally:
        for agent in agents:
            agent.stop()
    assert status_of(accepted) == "completed"
    assert error_of(replayed)[0] == -32003
    assert error_of(again)[0] == -32003


def test_a_retry_of_our_client_is_not_a_replay(tmp_path: Path) -> None:
    """The worker processes the first attempt and its reply is lost. Resending the same bytes
    would be refused as a replay; our client gives every attempt a fresh nonce and keeps the
    idempotency key, so the retry gets the stored outcome and the skill runs once."""
    worker = start_uvicorn(
        tmp_path,
        "worker",
        {"ASAP_REQUIRE_NONCE": "true", "ASAP_AGENT_ID": "urn:asap:agent:worker"},
        app="asap.examples.flaky_worker:app",
    )
    try:
        worker.wait_ready()
        raw = frame(ALICE, "work", {"tag": "raw"}, nonce="fixed")
        httpx.post(worker.url + "/asap", json=raw)
        resent = httpx.post(worker.url + "/asap", json=raw).json()
        httpx.post(worker.url + "/_faults", json={"lose_reply": 1}).raise_for_status()

        async def send() -> str:
            envelope = Envelope(
                asap_version="0.1",
                sender=ALICE,
                recipient="urn:asap:agent:worker",
                payload_type="task.request",
                payload=TaskRequest(conversation_id="c", skill_id="work", input={"tag": "once"}),
            )
            retry = RetryConfig(max_retries=3, base_delay=0.01, jitter=False)
            async with ASAPClient(worker.url, nonces=True, retry_config=retry) as client:
                return (await client.send(envelope)).payload.status

        status = asyncio.run(send())
        stats = httpx.get(worker.url + "/_faults").json()
    finally:
        worker.stop()
    assert error_of(resent)[0] == -32003
    assert status == "completed"
    assert stats["executions"] == {"once": 1}
    assert stats["seen"] == 2  # the lost reply, then the retry

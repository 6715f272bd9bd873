"""Retries, circuit breakers, deadlines and idempotency, against real worker processes.

The worker (``asap/examples/flaky_worker.py``) injects HTTP 500s, lost replies and flapping on
demand and counts how often its skill really ran, so "no sub-task ran twice" is measured there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asap.errors import ASAPConnectionError, ASAPTimeoutError, CircuitOpenError, RemoteRPCError
from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest, TaskRequestConfig
from asap.process import AgentProcess, free_port
from asap.transport.circuit_breaker import CircuitBreaker, CircuitState
from asap.transport.client import ASAPClient, RetryConfig
from asap.transport.resilience import CircuitBreakerTransport, RetryTransport

pytestmark = pytest.mark.anyio

FAST = RetryConfig(max_retries=3, base_delay=0.01, max_delay=0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the breaker as a state machine ------------------------------------------------------


def test_breaker_transition_table() -> None:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(3, 10.0, clock=clock, on_change=lambda a, b: changes.append((a, b)))
    for _ in range(2):
        assert breaker.can_attempt()
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.record_success()  # a success resets the count
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state is CircuitState.OPEN and not breaker.can_attempt()
    assert breaker.retry_after() == 10.0
    clock.now += 9.9
    assert not breaker.can_attempt()
    clock.now += 0.1
    assert breaker.can_attempt()  # the one probe
    assert breaker.state is CircuitState.HALF_OPEN
    assert not breaker.can_attempt()  # a second caller waits for the probe
    breaker.record_failure()  # probe failed: open again, timer restarted
    assert breaker.state is CircuitState.OPEN and not breaker.can_attempt()
    clock.now += 10
    assert breaker.can_attempt()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED and breaker.consecutive_failures == 0
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    with pytest.raises(ValueError):
        CircuitBreaker(0)


def test_cancelled_probe_releases_half_open() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1
    assert breaker.can_attempt() and not breaker.can_attempt()
    breaker.release()
    assert breaker.can_attempt()


def test_retry_delays_grow_and_are_capped() -> None:
    config = RetryConfig(base_delay=1.0, max_delay=5.0, jitter=False)
    assert [config.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = RetryConfig(base_delay=1.0, max_delay=5.0)
    assert all(2.0 <= jittered.delay(2) <= 4.0 for _ in range(50))
    with pytest.raises(ValueError, match="max_retries"):
        RetryConfig(max_retries=0)


# -- retry decisions over an in-memory network ---------------------------------------------


def scripted(*answers: Any) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A network that answers with ``answers`` in order (an exception is raised)."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), seen


def rpc_error(code: int, recoverable: bool) -> httpx.Response:
    data = {
        "code": "asap:x",
        "rpc_code": code,
        "message": "m",
        "details": {},
        "recoverable": recoverable,
    }
    return httpx.Response(
        200, json={"jsonrpc": "2.0", "error": {"code": code, "message": "m", "data": data}, "id": 1}
    )


@pytest.mark.parametrize(
    ("answers", "attempts", "final"),
    [
        ([httpx.ConnectError("down"), httpx.Response(200, text="ok")], 2, 200),
        ([httpx.ReadTimeout("slow"), httpx.Response(503), httpx.Response(200)], 3, 200),
        ([httpx.Response(500)] * 3, 3, 500),
        ([httpx.Response(404)], 1, 404),
        ([httpx.Response(413)], 1, 413),
        ([rpc_error(-32031, True), httpx.Response(200)], 2, 200),
        ([rpc_error(-32002, True)], 1, 200),  # stale timestamp: the same body fails again
        ([rpc_error(-32602, False)], 1, 200),
    ],
)
async def test_what_is_retried(answers: list[Any], attempts: int, final: int) -> None:
    network, seen = scripted(*answers)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = RetryTransport(network, FAST, sleep=sleep)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post("http://agent/asap", content=b"{}")
    assert response.status_code == final
    assert len(seen) == attempts and len(sleeps) == attempts - 1
    assert {r.content for r in seen} == {b"{}"}  # the same body every time


async def test_retry_after_is_honoured_and_capped() -> None:
    network, seen = scripted(
        httpx.Response(429, headers={"retry-after": "2"}),
        httpx.Response(429, headers={"retry-after": "3600"}),
        httpx.Response(200),
    )
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    config = RetryConfig(max_retries=3, max_retry_after=5.0)
    async with httpx.AsyncClient(transport=RetryTransport(network, config, sleep=sleep)) as c:
        assert (await c.post("http://agent/asap")).status_code == 200
    assert sleeps == [2.0, 5.0]


async def test_breaker_opens_without_touching_the_network() -> None:
    network, seen = scripted(*[httpx.ConnectError("down")] * 4)
    clock = Clock()
    transport = CircuitBreakerTransport(network, threshold=3, reset_timeout=30, clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await client.post("http://agent:1/asap")
        with pytest.raises(CircuitOpenError) as opened:
            await client.post("http://agent:1/asap")
        assert len(seen) == 3  # the fourth call never reached the network
        assert opened.value.retry_after_ms == 30_000
        assert transport.breaker("http://agent:1").state is CircuitState.OPEN
        # another target has its own breaker
        with pytest.raises(httpx.ConnectError):
            await client.post("http://agent:2/asap")


# -- real worker processes --------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    port = free_port()
    with AgentProcess(
        ["-m", "uvicorn", "asap.examples.flaky_worker:app", "--port", str(port)],
        port,
        env={"ASAP_AGENT_ID": "urn:asap:agent:worker", "ASAP_LOG_LEVEL": "WARNING"},
        log_path=tmp_path_factory.mktemp("worker") / "worker.log",
    ) as agent:
        yield agent


def faults(worker: AgentProcess, **config: int) -> None:
    httpx.post(worker.url + "/_faults", json=config).raise_for_status()


def stats(worker: AgentProcess) -> dict[str, Any]:
    return httpx.get(worker.url + "/_faults").json()  # type: ignore[no-any-return]


def work(tag: str, seconds: float = 0, key: str | None = None, **config: Any) -> Envelope:
    return Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:tester",
        recipient="urn:asap:agent:worker",
        payload_type="task.request",
        payload=TaskRequest(
            conversation_id="conv",
            skill_id="work",
            input={"tag": tag, "seconds": seconds},
            config=TaskRequestConfig(idempotency_key=key, **config) if key or config else None,
        ),
    )


class Recorder(httpx.AsyncBaseTransport):
    """The real network, remembering what was sent."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_500_twice_then_success_runs_once(worker: AgentProcess) -> None:
    faults(worker, http_500=2)
    recorder = Recorder()
    async with ASAPClient(worker.url, transport=recorder, retry_config=FAST) as client:
        reply = await client.send(work("five-hundred"))
    assert reply.payload.status == "completed"
    assert len(recorder.sent) == 3
    keys = {r.headers["x-idempotency-key"] for r in recorder.sent}
    assert len(keys) == 1  # the same key on every attempt
    assert stats(worker)["executions"] == {"five-hundred": 1}


async def test_lost_reply_is_replayed_not_rerun(worker: AgentProcess) -> None:
    faults(worker, lose_reply=1)
    async with ASAPClient(worker.url, retry_config=FAST) as client:
        reply = await client.send(work("lost"))
        again = await client.send(work("lost"), idempotency_key="other-key")
    assert reply.payload.status == "completed"
    seen = stats(worker)
    assert seen["executions"] == {
        "lost": 2
    }  # once for the lost-reply request, once for "other-key"
    assert seen["seen"] == 3
    assert again.payload.task_id != reply.payload.task_id


async def test_duplicates_in_flight_wait_for_the_first(worker: AgentProcess) -> None:
    faults(worker)
    async with ASAPClient(worker.url) as client:
        first, second = await asyncio.gather(
            client.send(work("dup", 0.3, key="same")), client.send(work("dup", 0.3, key="same"))
        )
        later = await client.send(work("dup", 0.3, key="same"))
    assert stats(worker)["executions"] == {"dup": 1}
    assert first.payload.task_id == second.payload.task_id == later.payload.task_id
    assert later.correlation_id != first.correlation_id  # each reply bound to its own request


async def test_key_reused_for_another_request_is_refused(worker: AgentProcess) -> None:
    faults(worker)
    async with ASAPClient(worker.url) as client:
        await client.send(work("a", key="k-reused"))
        with pytest.raises(RemoteRPCError) as refused:
            await client.send(work("b", key="k-reused"))
    assert refused.value.json_rpc_code == -32602
    assert refused.value.data["error"] == "Idempotency key reused for a different request"
    assert stats(worker)["executions"] == {"a": 1}


async def test_skill_past_its_deadline_is_cancelled(worker: AgentProcess) -> None:
    faults(worker)
    async with ASAPClient(worker.url) as client:
        reply = await client.send(work("slow", 30, timeout_seconds=1))
    payload = reply.payload
    assert payload.status == "failed"
    assert payload.result["error"]["type"] == "ASAPTimeoutError"
    assert payload.result["error"]["rpc_code"] == -32033
    assert "did not finish within 1 s" in payload.result["error"]["message"]
    assert stats(worker)["cancelled"] == 1


async def test_call_timeout_is_sent_as_the_remote_deadline(worker: AgentProcess) -> None:
    faults(worker)
    async with ASAPClient(worker.url) as client:
        reply = await client.send(work("deadline", 30), timeout=1.9)
    # the worker was told 1 s (whole seconds, never more than we wait), so it cancelled its
    # skill and answered before our own timeout (0.9 s later)
    assert reply.payload.status == "failed"
    assert reply.payload.result["error"]["type"] == "ASAPTimeoutError"
    seen = stats(worker)
    assert seen["cancelled"] == 1 and seen["contexts"][0]["time_left"] <= 1.0


async def test_timeout_shorter_than_a_second_still_ends_the_call(worker: AgentProcess) -> None:
    faults(worker)
    async with ASAPClient(worker.url) as client:
        with pytest.raises(ASAPTimeoutError):
            await client.send(work("short", 30), timeout=0.3)


async def test_worker_down_then_breaker_then_recovery(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    recorder = Recorder()
    config = RetryConfig(
        max_retries=2,
        base_delay=0.01,
        circuit_breaker_enabled=True,
        circuit_breaker_threshold=2,
        circuit_breaker_timeout=2.0,
    )
    async with ASAPClient(url, transport=recorder, retry_config=config) as client:
        for _ in range(2):
            with pytest.raises(ASAPConnectionError):
                await client.send(work("down"))
        assert len(recorder.sent) == 4  # 2 calls x 2 attempts
        with pytest.raises(CircuitOpenError):
            await client.send(work("down"))
        assert len(recorder.sent) == 4  # refused without touching the network
        with AgentProcess(
            ["-m", "uvicorn", "asap.examples.flaky_worker:app", "--port", str(port)],
            port,
            log_path=tmp_path / "late.log",
        ):
            await asyncio.sleep(2.0)  # the breaker's reset timeout (not a readiness wait)
            reply = await client.send(work("down"))  # the half-open probe
            assert reply.payload.status == "completed"
            reply = await client.send(work("down"))  # closed again
            assert reply.payload.status == "completed"


async def test_flapping_worker_is_ridden_out(worker: AgentProcess) -> None:
    faults(worker, flap=1)  # every other request fails
    async with ASAPClient(worker.url, retry_config=FAST) as client:
        replies = [await client.send(work(f"flap-{n}")) for n in range(6)]
    assert all(r.payload.status == "completed" for r in replies)
    assert stats(worker)["executions"] == {f"flap-{n}": 1 for n in range(6)}

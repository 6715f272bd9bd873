"""Limits: per-sender rate limits (also across workers through Redis), concurrent tasks,
decompression bombs, batch size, plan size and fan-out width."""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from asap.errors import ConfigurationError
from asap.process import AgentProcess
from asap.settings import Settings
from asap.transport.app import create_app
from tests.conftest import echo_settings, serve_in_process
from tests.security.common import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    TOKENS,
    bearer,
    error_of,
    frame,
    redis_url,
    rss_kib,
    start_uvicorn,
    status_of,
)

pytestmark = pytest.mark.anyio


# -- rate limits per sender (spec 3.10) -----------------------------------------------------


async def test_each_sender_has_its_own_budget_and_overrides_apply() -> None:
    """Hourly windows: one of a minute could end between the requests."""
    settings = echo_settings(
        auth_tokens=TOKENS, rate_limit="3/hour", rate_limit_senders=f"{BOB}=5/hour"
    )
    async with serve_in_process(create_app(settings)) as http:

        async def send(sender: str, token: str) -> httpx.Response:
            return await http.post("/asap", json=frame(sender), headers=bearer(token))

        assert [(await send(ALICE, ALICE_TOKEN)).status_code for _ in range(4)] == [200] * 3 + [429]
        # Alice's budget is spent; Bob, from the same address, has his own (and a larger one)
        assert [(await send(BOB, BOB_TOKEN)).status_code for _ in range(6)] == [200] * 5 + [429]
        refused = await send(ALICE, ALICE_TOKEN)
        assert refused.json()["error"]["data"]["limit"] == "3 per 1 hour"
        assert int(refused.headers["retry-after"]) >= 1
        metrics = (await http.get("/asap/metrics")).text
        assert "asap_rate_limit_exceeded_total 3.0" in metrics


async def test_the_default_limit_lets_an_orchestrator_fan_out() -> None:
    """A burst of 400 sub-requests in one second from one sender passes under the defaults
    (the reference's 10/second would refuse all but 10)."""
    async with serve_in_process(create_app(echo_settings(rate_limit=Settings().rate_limit))) as h:
        batches = [[frame(ALICE) for _ in range(50)] for _ in range(8)]
        replies = await asyncio.gather(*(h.post("/asap", json=batch) for batch in batches))
        assert {r.status_code for r in replies} == {200}
        assert all(status_of(item) == "completed" for r in replies for item in r.json())


def test_rate_limit_configuration_is_checked_at_start_up() -> None:
    with pytest.raises(ConfigurationError, match="cannot parse"):
        Settings(rate_limit="lots")
    with pytest.raises(ConfigurationError, match="ASAP_RATE_LIMIT_SENDERS"):
        Settings(rate_limit_senders="not-a-urn=5/second")
    assert Settings(rate_limit="off").rate_limits() == ([], {})


@contextmanager
def two_workers_on_redis(tmp_path: Path, rate_limit: str) -> Iterator[list[AgentProcess]]:
    """Two uvicorn processes sharing one Redis prefix, with authentication and
    ``ASAP_RATE_LIMIT=rate_limit``, ready; stopped afterwards."""
    env = {
        "ASAP_STORAGE_URL": redis_url(),
        "ASAP_AUTH_TOKENS": TOKENS,
        "ASAP_RATE_LIMIT": rate_limit,
    }
    agents = [start_uvicorn(tmp_path, name, env) for name in ("a", "b")]
    try:
        for agent in agents:
            agent.wait_ready()
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def test_the_limit_is_shared_by_workers_on_redis(tmp_path: Path) -> None:
    """Two processes sharing Redis count one budget per sender: 3 + 3 requests against a
    limit of 5 per day give exactly one 429, whichever worker takes it (a day: a window of a
    minute can end between the requests, and then the next one has room again)."""
    with two_workers_on_redis(tmp_path, "5/day") as agents:
        codes: Counter[int] = Counter()
        for agent in agents:
            for _ in range(3):
                response = httpx.post(
                    agent.url + "/asap", json=frame(ALICE), headers=bearer(ALICE_TOKEN)
                )
                codes[response.status_code] += 1
        # Bob's budget is his own, on either worker
        bob = httpx.post(agents[1].url + "/asap", json=frame(BOB), headers=bearer(BOB_TOKEN))
    assert codes == {200: 5, 429: 1}
    assert bob.status_code == 200


def test_workers_reserving_blocks_never_admit_more_than_the_limit(tmp_path: Path) -> None:
    """400 a day: each worker reserves 4 at a time from Redis. 300 + 150 requests over two
    processes: at most 400 pass, at most a block per worker fewer, the rest get 429."""
    codes: Counter[int] = Counter()
    with (
        two_workers_on_redis(tmp_path, "400/day") as agents,
        httpx.Client(headers=bearer(ALICE_TOKEN)) as client,
    ):
        for n in range(450):
            agent = agents[0] if n % 3 else agents[1]
            codes[client.post(agent.url + "/asap", json=frame(ALICE)).status_code] += 1
    assert set(codes) == {200, 429}
    assert 400 - 2 * 4 <= codes[200] <= 400


# -- concurrent tasks -------------------------------------------------------------------------


def test_100_concurrent_slow_tasks_against_a_limit_of_10(tmp_path: Path) -> None:
    """Ten run; the other ninety are refused at once with HTTP 503 and Retry-After (spec 3.6)
    instead of queueing; none runs twice; the agent serves again afterwards."""
    agent = start_uvicorn(
        tmp_path,
        "worker",
        {"ASAP_MAX_CONCURRENT_TASKS": "10", "ASAP_RATE_LIMIT": "off"},
        app="asap.examples.flaky_worker:app",
    )
    try:
        agent.wait_ready()

        async def flood() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                slow = frame(skill="work", data={"tag": "slow", "seconds": 5})
                return await asyncio.gather(
                    *(client.post(agent.url + "/asap", json=slow) for _ in range(100))
                )

        responses = asyncio.run(flood())
        stats = httpx.get(agent.url + "/_faults").json()
        after = httpx.post(agent.url + "/asap", json=frame(skill="work", data={"tag": "after"}))
        metrics = httpx.get(agent.url + "/asap/metrics").text
    finally:
        agent.stop()
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: 10, 503: 90}
    assert all(status_of(r.json()) == "completed" for r in responses if r.status_code == 200)
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    body = refused.json()
    assert body["rpc_code"] == -32031 and body["recoverable"] is True
    assert body["details"] == {"max_tasks": 10, "active_tasks": 10}
    assert stats["executions"] == {"slow": 10} and stats["max_running"] == 10
    assert status_of(after.json()) == "completed"
    assert "asap_thread_pool_exhausted_total 90.0" in metrics


# -- bodies ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """1 GiB of zeros, gzipped: about 1 MiB on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(1024)]
    parts.append(packer.flush())
    return b"".join(parts)


def test_a_1_gib_decompression_bomb_in_a_1_mib_body_is_refused_without_inflating(
    tmp_path: Path, gzip_bomb: bytes
) -> None:
    assert len(gzip_bomb) < 1.1 * (1 << 20)
    agent = start_uvicorn(tmp_path, "agent", {"ASAP_SKILLS": "skills.echo"})
    try:
        agent.wait_ready()
        assert agent.pid is not None
        httpx.post(agent.url + "/asap", json=frame()).raise_for_status()  # warm
        before = rss_kib(agent.pid)
        for _ in range(3):
            response = httpx.post(
                agent.url + "/asap",
                content=gzip_bomb,
                headers={"content-type": "application/json", "content-encoding": "gzip"},
                timeout=60,
            )
            assert response.status_code == 413, response.text
            assert response.json()["detail"].startswith("Decompressed request size")
        grown = rss_kib(agent.pid) - before
        healthy = httpx.post(agent.url + "/asap", json=frame())
    finally:
        agent.stop()
    assert grown < 40 * 1024, f"resident memory grew {grown} KiB"  # a 1 GiB inflate would show
    assert status_of(healthy.json()) == "completed"


async def test_a_batch_of_51_is_refused_whole(echo_http: httpx.AsyncClient) -> None:
    reply = (await echo_http.post("/asap", json=[frame() for _ in range(51)])).json()
    code, data = error_of(reply)
    assert code == -32600 and data == {"reason": "batch size 51 exceeds max 50"}


async def test_json_nested_past_the_limit_is_a_parse_error(echo_http: httpx.AsyncClient) -> None:
    deep = b"[" * 200 + b"]" * 200
    assert error_of((await echo_http.post("/asap", content=deep)).json())[0] == -32700

"""Interoperability with the reference implementation (PyPI ``asap-protocol`` 2.5.10).

Both directions, with real processes on loopback ports: the reference client (run in its own
Python 3.13 venv by ``ref_client_driver.py``) against our server, and our client against the
reference's echo agent. Outside CI these skip when ``.venv-ref`` is missing (``make ref``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asap.errors import RemoteRPCError
from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest, TaskResponse
from asap.process import AgentProcess
from asap.transport.client import ASAPClient
from tests.conftest import require_reference
from tests.interop import run_ref_echo

pytestmark = [pytest.mark.interop, pytest.mark.anyio]


@pytest.fixture(scope="module")
def reference_results(echo_agents: list[AgentProcess]) -> dict[str, dict[str, Any]]:
    """Every driver case, run once by the reference client against our echo agent."""
    require_reference()
    done = run_ref_echo.run_driver(echo_agents[0].url, None)
    results = run_ref_echo.parse_results(done.stdout)
    assert results, f"driver printed no results: {done.stdout}\n{done.stderr}"
    return results


@pytest.mark.parametrize(
    "case", ["send", "batch", "send_batch", "manifest", "health", "large_brotli"]
)
def test_reference_client_accepts_our_server(
    reference_results: dict[str, dict[str, Any]], case: str
) -> None:
    result = reference_results[case]
    assert result["ok"], result


def test_reference_client_sees_our_replies_bound_and_echoed(
    reference_results: dict[str, dict[str, Any]], echo_agents: list[AgentProcess]
) -> None:
    send = reference_results["send"]
    assert send["correlation_ok"] and send["echo_ok"]
    assert send["response"]["sender"] == "urn:asap:agent:worker-a"
    assert send["response"]["payload"]["result"] == {"echoed": {"message": "hi", "n": 1}}
    assert reference_results["batch"]["correlation_ok"]
    manifest = reference_results["manifest"]
    assert manifest["get_manifest"]["manifest"]["endpoints"]["asap"] == echo_agents[0].url + "/asap"
    assert manifest["same"]
    large = reference_results["large_brotli"]
    assert large["equal"] and large["input_len"] == 204800
    assert any(h.get("request_content_encoding") == "br" for h in large["http"]), large["http"]


def test_reference_client_gets_our_unknown_skill_error(
    reference_results: dict[str, dict[str, Any]],
) -> None:
    result = reference_results["unknown_skill"]
    assert result["raised"] is True, result
    assert result["error_type"] == "RemoteRPCError"
    assert result["rpc_code"] == -32013
    assert result["code"] == "asap:routing/skill_not_found"


@pytest.fixture(scope="module")
def reference_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The reference's own echo agent, as its docs start it."""
    require_reference()
    port = run_ref_echo.free_port()
    log: Path = tmp_path_factory.mktemp("reference") / "echo.log"
    process = run_ref_echo.start_ref_echo_agent(port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        run_ref_echo.wait_ready(url, process)
        yield url
    finally:
        run_ref_echo.stop(process)


def envelope(skill_id: str = "echo", data: dict[str, Any] | None = None, **kw: Any) -> Envelope:
    return Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:our-client",
        recipient="urn:asap:agent:echo-agent",
        payload_type=kw.pop("payload_type", "task.request"),
        payload=kw.pop("payload", None)
        or TaskRequest(conversation_id="interop", skill_id=skill_id, input=data or {}),
        trace_id="interop-trace",
    )


async def test_our_client_against_the_reference_echo_agent(reference_agent: str) -> None:
    big = {"text": "interop " * 30_000}
    async with ASAPClient(reference_agent) as client:
        reply = await client.send(envelope(data={"message": "hi"}))
        large = await client.send(envelope(data=big))
        batched = await client.batch([envelope(data={"n": n}) for n in range(3)])
        concurrent = await client.send_batch([envelope(data={"n": n}) for n in range(3)])
        manifest = await client.get_manifest()
        health = await client.health_check()
        assert client.last_response_asap_version == "2.2"
    assert isinstance(reply.payload, TaskResponse)
    assert reply.payload.result == {"echoed": {"message": "hi"}}
    assert reply.sender == "urn:asap:agent:echo-agent" and reply.trace_id == "interop-trace"
    assert large.payload.result == {"echoed": big}
    assert [r.payload.result for r in batched] == [{"echoed": {"n": n}} for n in range(3)]
    assert [r.payload.result for r in concurrent] == [{"echoed": {"n": n}} for n in range(3)]  # type: ignore[union-attr]
    assert manifest.id == "urn:asap:agent:echo-agent" and manifest.version == "0.3.0"
    assert [s.id for s in manifest.capabilities.skills] == ["echo"]
    assert health.status == "healthy"


async def test_reference_errors_reach_our_client_typed(reference_agent: str) -> None:
    async with ASAPClient(reference_agent) as client:
        with pytest.raises(RemoteRPCError) as unknown_type:
            await client.send(envelope(payload_type="foo.bar", payload={"a": 1}))
    error = unknown_type.value
    assert error.rpc_code == -32012
    assert error.code == "asap:transport/handler_not_found"
    assert error.details == {"payload_type": "foo.bar"}
    assert error.recoverable is False


def test_reference_client_authenticates_with_our_server(tmp_path: Path) -> None:
    """spec 3.12 both ways: the reference client's bearer token opens our agent, its sender
    (``urn:asap:agent:ref-client``) must be the token's, and a wrong token is refused in the
    reference's own error shape."""
    require_reference()
    token = "reference-token-0123456789abcdef"
    agent = AgentProcess.uvicorn(
        env={
            "ASAP_SKILLS": "skills.echo",
            "ASAP_AUTH_TOKENS": f"urn:asap:agent:ref-client={token}",
        },
        log_path=tmp_path / "agent.log",
    ).start()
    try:
        good = run_ref_echo.parse_results(
            run_ref_echo.run_driver(agent.url, ["send"], 300.0, "--auth-token", token).stdout
        )["send"]
        bad = run_ref_echo.parse_results(
            run_ref_echo.run_driver(
                agent.url, ["send"], 300.0, "--auth-token", "wrong-token-0123456789abcdef"
            ).stdout
        )["send"]
    finally:
        agent.stop()
    assert good["ok"] and good["echo_ok"], good
    assert not bad["ok"]
    assert bad["error_type"] == "RemoteRPCError", bad  # -32600 arrives as its -32034 slot
    assert bad["data"] == {"error": "Invalid authentication token", "status_code": 401}

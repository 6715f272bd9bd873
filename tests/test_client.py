"""The client against real agents on loopback ports (spec 4): replies, batches, errors."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asap.errors import (
    ASAPConnectionError,
    ASAPTimeoutError,
    MalformedEnvelopeError,
    ProtocolCorrelationError,
    RemoteRPCError,
)
from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest, TaskResponse
from asap.process import AgentProcess, free_port
from asap.transport.client import ASAPClient
from tests.conftest import TEST_AGENT_ID

pytestmark = pytest.mark.anyio


def request(skill_id: str = "echo", data: dict[str, Any] | None = None, **kw: Any) -> Envelope:
    return Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:client",
        recipient=TEST_AGENT_ID,
        payload_type="task.request",
        payload=TaskRequest(conversation_id="c-1", skill_id=skill_id, input=data or {}, **kw),
        trace_id="trace-client",
    )


class RecordingTransport(httpx.AsyncBaseTransport):
    """Sends through the real network transport and keeps each request's headers."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        return await self.inner.handle_async_request(req)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_send_returns_the_bound_typed_reply(test_agent: AgentProcess) -> None:
    sent = request(data={"message": "hi"})
    async with ASAPClient(test_agent.url) as client:
        reply = await client.send(sent)
        assert client.last_response_asap_version == "2.2"
    assert isinstance(reply.payload, TaskResponse)
    assert reply.payload.result == {"echoed": {"message": "hi"}}
    assert reply.correlation_id == sent.id
    assert reply.trace_id == "trace-client"
    assert reply.sender == TEST_AGENT_ID and reply.recipient == "urn:asap:agent:client"
    assert reply.payload_dict["status"] == "completed"


async def test_send_headers_idempotency_key_and_compression(test_agent: AgentProcess) -> None:
    transport = RecordingTransport()
    big = {"text": "lorem ipsum " * 20_000}
    async with ASAPClient(test_agent.url, transport=transport) as client:
        small_reply = await client.send(request(data={"m": 1}))
        big_reply = await client.send(request(data=big))
    assert small_reply.payload.result == {"echoed": {"m": 1}}
    assert big_reply.payload.result == {"echoed": big}
    small, large = transport.requests
    assert small.headers["asap-version"] == "2.2, 2.1"
    assert "content-encoding" not in small.headers
    assert large.headers["content-encoding"] == "br"
    assert len(large.content) < 10_000  # 240 kB of input went over the wire compressed
    assert small.headers["x-idempotency-key"] != large.headers["x-idempotency-key"]
    assert len(small.headers["x-idempotency-key"]) == 26


async def test_batch_and_send_batch(test_agent: AgentProcess) -> None:
    envelopes = [request(data={"n": n}) for n in range(5)]
    async with ASAPClient(test_agent.url) as client:
        batched = await client.batch(envelopes)
        concurrent = await client.send_batch(envelopes)
    for replies in (batched, concurrent):
        assert [r.correlation_id for r in replies] == [e.id for e in envelopes]  # type: ignore[union-attr]
        assert [r.payload.result for r in replies] == [{"echoed": {"n": n}} for n in range(5)]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="at least one"):
        async with ASAPClient(test_agent.url) as client:
            await client.batch([])


async def test_batch_can_return_errors_in_place(test_agent: AgentProcess) -> None:
    envelopes = [request(data={"n": 1}), request("no-such-skill"), request(data={"n": 3})]
    async with ASAPClient(test_agent.url) as client:
        first, error, third = await client.batch(envelopes, return_exceptions=True)
        with pytest.raises(RemoteRPCError):
            await client.batch(envelopes)
    assert first.payload.result == {"echoed": {"n": 1}}
    assert isinstance(error, RemoteRPCError) and error.rpc_code == -32013
    assert third.payload.result == {"echoed": {"n": 3}}


async def test_manifest_discover_and_health(test_agent: AgentProcess) -> None:
    async with ASAPClient(test_agent.url) as client:
        manifest = await client.get_manifest()
        discovered = await client.discover()
        health = await client.health_check()
    assert manifest == discovered
    assert manifest.id == TEST_AGENT_ID
    assert manifest.endpoints.asap == test_agent.url + "/asap"
    assert "greet" in [s.id for s in manifest.capabilities.skills]
    assert health.status == "healthy" and health.agent_id == TEST_AGENT_ID


async def test_remote_errors_are_typed(test_agent: AgentProcess) -> None:
    async with ASAPClient(test_agent.url) as client:
        with pytest.raises(RemoteRPCError) as unknown:
            await client.send(request("no-such-skill"))
        with pytest.raises(RemoteRPCError) as invalid:
            await client.send(request("greet", {"name": ""}))
    assert unknown.value.rpc_code == -32013
    assert unknown.value.code == "asap:routing/skill_not_found"
    assert unknown.value.details["available_skills"][0] == "bad-return"
    assert unknown.value.recoverable is False
    assert str(unknown.value) == "Remote error -32013: Unknown skill: no-such-skill"
    assert invalid.value.json_rpc_code == -32602 and invalid.value.rpc_code == -32034
    assert invalid.value.data["skill_id"] == "greet"


async def test_timeout_and_connection_errors_are_translated(test_agent: AgentProcess) -> None:
    async with ASAPClient(test_agent.url, timeout=0.2) as client:
        with pytest.raises(ASAPTimeoutError) as timeout:
            await client.send(request("sleep", {"seconds": 2}))
    assert timeout.value.rpc_code == -32033 and timeout.value.recoverable
    assert isinstance(timeout.value.__cause__, httpx.TimeoutException)
    async with ASAPClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(ASAPConnectionError) as refused:
            await client.send(request())
    assert refused.value.rpc_code == -32032 and not isinstance(refused.value, ASAPTimeoutError)


async def test_http_errors_carry_the_status(test_agent: AgentProcess) -> None:
    async with ASAPClient(test_agent.url) as client:
        client.base_url = test_agent.url + "/missing"
        with pytest.raises(ASAPConnectionError) as error:
            await client.send(request())
    assert error.value.details["status_code"] == 404
    assert error.value.recoverable is False


def fake_agent(reply: dict[str, Any] | bytes) -> httpx.ASGITransport:
    """A misbehaving agent: answers every POST /asap with ``reply``."""

    async def endpoint(req: Request) -> Response:
        if isinstance(reply, bytes):
            return Response(reply, media_type="application/json")
        return JSONResponse(reply)

    return httpx.ASGITransport(app=Starlette(routes=[Route("/asap", endpoint, methods=["POST"])]))


def reply_envelope(**changes: Any) -> dict[str, Any]:
    envelope = Envelope(
        asap_version="0.1",
        sender=TEST_AGENT_ID,
        recipient="urn:asap:agent:client",
        payload_type="task.response",
        payload={"task_id": "task_1", "status": "completed"},
        correlation_id="someone-else",
    ).model_dump(mode="json")
    return {"jsonrpc": "2.0", "result": {"envelope": {**envelope, **changes}}, "id": "req-1"}


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (reply_envelope(), ProtocolCorrelationError, "correlation_id mismatch"),
        (reply_envelope(surprise=1), MalformedEnvelopeError, "Malformed envelope"),
        ({"jsonrpc": "2.0", "result": {}, "id": "req-1"}, RemoteRPCError, "Missing envelope"),
        (b"<html>", RemoteRPCError, "Invalid response"),
    ],
)
async def test_replies_that_break_the_protocol_are_rejected(
    reply: Any, error: type[Exception], match: str
) -> None:
    async with ASAPClient("http://127.0.0.1:9", transport=fake_agent(reply)) as client:
        with pytest.raises(error, match=match):
            await client.send(request())


def test_https_is_required_for_remote_hosts() -> None:
    with pytest.raises(ValueError, match="HTTPS is required"):
        ASAPClient("http://agents.example.com")
    ASAPClient("http://agents.example.com", require_https=False)
    ASAPClient("https://agents.example.com")
    for local in ("http://localhost:1", "http://127.0.0.1:1", "http://[::1]:1"):
        ASAPClient(local)
    with pytest.raises(ValueError, match="http"):
        ASAPClient("ftp://x")


async def test_using_a_client_outside_its_context_is_an_error() -> None:
    client = ASAPClient("http://127.0.0.1:9")
    with pytest.raises(ASAPConnectionError, match="not connected"):
        await client.send(request())

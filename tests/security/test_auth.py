"""Bearer authentication (spec 3.12): tokens mapped to the agent each may speak as."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from asap.errors import ConfigurationError, RemoteRPCError
from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest
from asap.security import Authenticator, parse_tokens
from asap.transport.app import create_app
from asap.transport.client import ASAPClient
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
    start_uvicorn,
    status_of,
)

pytestmark = pytest.mark.anyio

AUTH_REQUIRED = (-32600, {"error": "Authentication required", "status_code": 401})
INVALID_TOKEN = (-32600, {"error": "Invalid authentication token", "status_code": 401})
MISMATCH = (-32602, {"error": "Sender does not match authenticated identity", "status_code": 403})


@pytest.fixture
async def http() -> httpx.AsyncClient:
    async with serve_in_process(create_app(echo_settings(auth_tokens=TOKENS))) as client:
        yield client


async def post(http: httpx.AsyncClient, body: object, **headers: str) -> dict:
    response = await http.post("/asap", json=body, headers=headers)
    assert response.status_code == 200, response.text  # spec 3.12: errors ride on HTTP 200
    assert "www-authenticate" not in response.headers
    return response.json()


def short(reply: dict) -> tuple[int, dict]:
    code, data = error_of(reply)
    return code, {k: data[k] for k in ("error", "status_code")}


async def test_the_right_token_for_the_sender_is_served(http: httpx.AsyncClient) -> None:
    assert status_of(await post(http, frame(ALICE), **bearer(ALICE_TOKEN))) == "completed"
    assert status_of(await post(http, frame(BOB), **bearer(BOB_TOKEN))) == "completed"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": f"Basic {ALICE_TOKEN}"}, {"authorization": "Bearer "}],
    ids=["missing", "basic", "empty"],
)
async def test_no_bearer_token_is_authentication_required(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    assert short(await post(http, frame(ALICE), **headers)) == AUTH_REQUIRED


async def test_a_wrong_token_is_refused(http: httpx.AsyncClient) -> None:
    for token in ("not-a-token", ALICE_TOKEN + "x", ALICE_TOKEN[:-1], ALICE_TOKEN.upper()):
        assert short(await post(http, frame(ALICE), **bearer(token))) == INVALID_TOKEN


async def test_a_right_token_with_another_sender_is_refused(http: httpx.AsyncClient) -> None:
    assert short(await post(http, frame(BOB), **bearer(ALICE_TOKEN))) == MISMATCH


async def test_authentication_comes_before_the_envelope(http: httpx.AsyncClient) -> None:
    """spec 3.3: an unauthenticated caller learns nothing about what its envelope lacks."""
    body = frame(ALICE)
    del body["params"]["envelope"]
    assert short(await post(http, body)) == AUTH_REQUIRED
    # ... but the JSON-RPC frame checks come first
    body["method"] = "other"
    assert error_of(await post(http, body))[0] == -32601


async def test_a_batch_is_checked_item_by_item(http: httpx.AsyncClient) -> None:
    replies = await post(http, [frame(ALICE), frame(BOB), frame(ALICE)], **bearer(ALICE_TOKEN))
    assert status_of(replies[0]) == "completed"
    assert short(replies[1]) == MISMATCH
    assert status_of(replies[2]) == "completed"


async def test_the_stream_endpoint_is_authenticated_too(http: httpx.AsyncClient) -> None:
    response = await http.post("/asap/stream", json=frame(ALICE))
    assert short(response.json()) == AUTH_REQUIRED
    response = await http.post("/asap/stream", json=frame(ALICE), headers=bearer(ALICE_TOKEN))
    assert response.headers["content-type"].startswith("text/event-stream")


async def test_discovery_and_health_stay_open_and_the_manifest_says_bearer(
    http: httpx.AsyncClient,
) -> None:
    manifest = (await http.get("/.well-known/asap/manifest.json")).json()
    assert manifest["auth"] == {"schemes": ["bearer"], "oauth2": None}
    for path in ("/.well-known/asap/health", "/health", "/ready", "/asap/metrics"):
        assert (await http.get(path)).status_code == 200, path
    failures = (await http.get("/asap/metrics")).text
    assert "asap_auth_failures_total 0.0" in failures


async def test_without_tokens_the_manifest_has_no_auth() -> None:
    async with serve_in_process(create_app(echo_settings())) as http:
        assert (await http.get("/.well-known/asap/manifest.json")).json()["auth"] is None
        assert status_of((await http.post("/asap", json=frame(BOB))).json()) == "completed"


async def test_several_tokens_per_agent_allow_rotation(tmp_path: Path) -> None:
    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    file = tmp_path / "tokens.json"
    file.write_text(json.dumps({ALICE: [old, new]}))
    settings = echo_settings(auth_tokens_file=str(file), auth_tokens=f"{BOB}={BOB_TOKEN}")
    async with serve_in_process(create_app(settings)) as http:
        for token in (old, new):
            assert status_of(await post(http, frame(ALICE), **bearer(token))) == "completed"
        assert status_of(await post(http, frame(BOB), **bearer(BOB_TOKEN))) == "completed"


async def test_our_client_sends_its_token() -> None:
    async with serve_in_process(create_app(echo_settings(auth_tokens=TOKENS))) as http:
        transport = http._transport  # the in-process app, reached by our client
        envelope = Envelope(
            asap_version="0.1",
            sender=ALICE,
            recipient="urn:asap:agent:echo-agent",
            payload_type="task.request",
            payload=TaskRequest(conversation_id="c", skill_id="echo", input={"x": 1}),
        )
        async with ASAPClient(
            "http://127.0.0.1:8003", transport=transport, auth_token=ALICE_TOKEN
        ) as client:
            assert (await client.send(envelope)).payload.status == "completed"
        async with ASAPClient(
            "http://127.0.0.1:8003", transport=transport, auth_token=BOB_TOKEN
        ) as client:
            with pytest.raises(RemoteRPCError) as refused:
                await client.send(envelope)
            assert refused.value.json_rpc_code == -32602


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{ALICE}=short", "at least 16 characters"),
        (f"{ALICE}=has space in the token here", "at least 16 characters"),
        ("urn:bad=0123456789abcdef0123", "urn"),
        (f"{ALICE}={ALICE_TOKEN},{BOB}={ALICE_TOKEN}", "two agents"),
        ("just-a-token-0123456789", "not urn=token"),
        ('{"urn:asap:agent:a": 5}', "must be strings"),
    ],
)
def test_bad_token_configuration_fails_at_start_up_without_echoing_it(
    text: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as bad:
        parse_tokens(text)
    assert message in str(bad.value)
    assert ALICE_TOKEN not in str(bad.value)
    with pytest.raises(ConfigurationError):
        create_app(echo_settings(auth_tokens=text))


def test_an_unreadable_token_file_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        Authenticator.from_settings(None, str(tmp_path / "missing"))


def test_tokens_never_reach_the_logs(tmp_path: Path) -> None:
    """A real agent with debug JSON logs: wrong tokens, right tokens, and a skill that logs a
    token it was sent; none of them appears in what the process wrote."""
    client_token = "outgoing-token-0123456789abcdef"
    # Not bare digits: those can turn up by chance inside a timestamp or an id in the log.
    pin = "pin-4321-zq"
    agent = start_uvicorn(
        tmp_path,
        "agent",
        {
            "ASAP_SKILLS": "skills.echo,tests.agent_skills",
            "ASAP_AUTH_TOKENS": TOKENS,
            "ASAP_CLIENT_TOKEN": client_token,
            "ASAP_LOG_LEVEL": "DEBUG",
            "ASAP_LOG_REDACT_KEYS": "customer_pin",
        },
    )
    try:
        agent.wait_ready()
        url = agent.url + "/asap"
        for token in (ALICE_TOKEN, BOB_TOKEN, "guess-0123456789abcdef"):
            httpx.post(url, json=frame(ALICE), headers=bearer(token)).raise_for_status()
        leaky = frame(ALICE, "note", {"note": f"my token is {BOB_TOKEN}", "customer_pin": pin})
        reply = httpx.post(url, json=leaky, headers=bearer(ALICE_TOKEN)).json()
        assert status_of(reply) == "completed"
    finally:
        agent.stop()
    log = agent.log_path.read_text()
    assert "test.note" in log and "asap.request.sender_mismatch" in log
    for secret in (ALICE_TOKEN, BOB_TOKEN, client_token, pin):
        assert secret not in log
    assert "my token is ***" in log

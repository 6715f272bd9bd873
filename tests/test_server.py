"""The HTTP server as a caller sees it: in-process ASGI, user-visible behaviour only.

Each test talks to an in-process echo agent through httpx (``echo_http`` or
``serve_in_process``); nothing sleeps and nothing opens a socket.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any

import brotli
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from asap.errors import ConfigurationError
from asap.transport.app import create_app
from asap.transport.ratelimit import RateLimiter, parse_rate_limit
from tests.conftest import ECHO_ID, echo_settings, serve_in_process

pytestmark = pytest.mark.anyio

SMALL = 2048  # a small max_request_size keeps the size tests fast
DEFAULT_LIMIT = 10 * 1024 * 1024


def envelope(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "asap_version": "0.1",
        "sender": "urn:asap:agent:client",
        "recipient": ECHO_ID,
        "payload_type": "task.request",
        "payload": {"conversation_id": "c1", "skill_id": "echo", "input": {"m": "hi"}},
    }
    data.update(overrides)
    return data


def frame(env: dict[str, Any] | None = None, request_id: Any = "r1") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "asap.send",
        "params": {"envelope": envelope() if env is None else env},
        "id": request_id,
    }


def echo_frame(message: Any, request_id: Any = "r1", **envelope_fields: Any) -> dict[str, Any]:
    payload = {"conversation_id": "c1", "skill_id": "echo", "input": {"m": message}}
    return frame(envelope(payload=payload, **envelope_fields), request_id)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def assert_echoed(reply: dict[str, Any], message: Any, request_id: Any = "r1") -> None:
    assert reply["id"] == request_id, reply
    assert "error" not in reply, reply
    env = reply["result"]["envelope"]
    assert env["payload_type"] == "task.response"
    assert env["payload"]["status"] == "completed"
    assert env["payload"]["result"] == {"echoed": {"m": message}}


def rpc_error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"jsonrpc", "error", "id"}, body
    assert set(body["error"]) == {"code", "message", "data"}, body
    return body


@asynccontextmanager
async def serve_lenient(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """Like ``serve_in_process`` but an app crash shows up as the 500 the client would see."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8003") as c:
            yield c


# -- JSON-RPC batch (spec 3.7) -------------------------------------------------------------------


async def test_batch_replies_in_request_order_with_ids_preserved(
    echo_http: httpx.AsyncClient,
) -> None:
    """spec 3.7: one reply per item, same order, ids echoed verbatim (strings and integers)."""
    ids: list[Any] = ["b", 7, "a", 0, "zz-01M8H2EZA2QWV1SE4SPBXF8XWQ", -3, "7"]
    batch = [echo_frame(f"msg-{i}", request_id) for i, request_id in enumerate(ids)]
    response = await echo_http.post("/asap", content=dumps(batch))
    assert response.status_code == 200
    replies = response.json()
    assert isinstance(replies, list)
    assert [reply["id"] for reply in replies] == ids
    for i, (reply, request_id) in enumerate(zip(replies, ids, strict=True)):
        assert_echoed(reply, f"msg-{i}", request_id)
        assert type(reply["id"]) is type(request_id)


async def test_batch_mixes_results_and_errors(echo_http: httpx.AsyncClient) -> None:
    """spec 3.7: each item is answered independently, including non-object items."""
    batch = [
        echo_frame("ok", "a"),
        {"jsonrpc": "2.0", "method": "x", "params": {}, "id": "b"},
        5,
        echo_frame("ok2", 3),
    ]
    replies = (await echo_http.post("/asap", content=dumps(batch))).json()
    assert len(replies) == 4
    assert_echoed(replies[0], "ok", "a")
    assert replies[1] == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found", "data": {"method": "x"}},
        "id": "b",
    }
    assert replies[2] == {
        "jsonrpc": "2.0",
        "error": {"code": -32600, "message": "Invalid request", "data": None},
        "id": None,
    }
    assert_echoed(replies[3], "ok2", 3)


async def test_batch_of_50_is_served(echo_http: httpx.AsyncClient) -> None:
    """spec 3.7: max_batch_size defaults to 50; exactly 50 is fine."""
    batch = [echo_frame(i, i) for i in range(50)]
    replies = (await echo_http.post("/asap", content=dumps(batch))).json()
    assert [reply["id"] for reply in replies] == list(range(50))
    for i, reply in enumerate(replies):
        assert_echoed(reply, i, i)


async def test_batch_of_51_is_one_error_object(echo_http: httpx.AsyncClient) -> None:
    """spec 3.7: over the limit, one error object (not an array) for the whole batch."""
    batch = [echo_frame(i, i) for i in range(51)]
    response = await echo_http.post("/asap", content=dumps(batch))
    assert response.json() == {
        "jsonrpc": "2.0",
        "error": {
            "code": -32600,
            "message": "Invalid request",
            "data": {"reason": "batch size 51 exceeds max 50"},
        },
        "id": None,
    }


async def test_empty_batch_is_one_error_object(echo_http: httpx.AsyncClient) -> None:
    """spec 3.7: an empty array gets a single error object."""
    response = await echo_http.post("/asap", content=b"[]")
    assert response.json() == {
        "jsonrpc": "2.0",
        "error": {"code": -32600, "message": "Invalid request", "data": {"reason": "empty batch"}},
        "id": None,
    }


@pytest.mark.parametrize("item", [None, 1, "x", [], [frame()], True])
async def test_non_object_batch_item(echo_http: httpx.AsyncClient, item: Any) -> None:
    """spec 3.7: a non-object item gets -32600 with data null and id null."""
    response = await echo_http.post("/asap", content=dumps([item]))
    assert response.json() == [
        {
            "jsonrpc": "2.0",
            "error": {"code": -32600, "message": "Invalid request", "data": None},
            "id": None,
        }
    ]


async def test_max_batch_size_setting_is_respected() -> None:
    """spec 3.7: the limit comes from settings (max_batch_size)."""
    async with serve_in_process(create_app(echo_settings(max_batch_size=2))) as client:
        two = await client.post("/asap", content=dumps([echo_frame(1, 1), echo_frame(2, 2)]))
        assert [reply["id"] for reply in two.json()] == [1, 2]
        three = await client.post("/asap", content=dumps([echo_frame(i, i) for i in range(3)]))
        assert three.json()["error"]["data"] == {"reason": "batch size 3 exceeds max 2"}


# -- size limits (spec 3.3 step 3, 3.11) ---------------------------------------------------------


def padded_frame(size: int) -> bytes:
    """A valid echo request of exactly ``size`` bytes."""
    base = dumps(echo_frame(""))
    body = dumps(echo_frame("x" * (size - len(base))))
    assert len(body) == size
    return body


async def metrics_text(client: httpx.AsyncClient) -> str:
    response = await client.get("/asap/metrics")
    assert response.status_code == 200
    return response.text


def sample_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    return None


async def test_content_length_over_limit_is_413_and_not_processed() -> None:
    """spec 3.3 step 3: a declared size over the limit is refused before anything runs."""
    async with serve_in_process(create_app(echo_settings(max_request_size=SMALL))) as client:
        body = padded_frame(SMALL + 1)
        response = await client.post("/asap", content=body)
        assert response.status_code == 413
        assert response.json() == {
            "detail": f"Request size ({SMALL + 1} bytes) exceeds maximum ({SMALL} bytes)"
        }
        assert response.headers["content-type"] == "application/json"
        text = await metrics_text(client)
        assert sample_value(text, "asap_requests_total") is None
        assert sample_value(text, "asap_handler_executions_total") is None


async def test_declared_size_is_checked_before_reading_the_body() -> None:
    """spec 3.3 step 3: Content-Length alone decides; the (short) body is never read."""
    async with serve_in_process(create_app(echo_settings(max_request_size=SMALL))) as client:
        request = client.build_request("POST", "/asap", content=dumps(echo_frame("hi")))
        request.headers["content-length"] = str(10**12)
        response = await client.send(request)
        assert response.status_code == 413
        assert response.json() == {
            "detail": f"Request size ({10**12} bytes) exceeds maximum ({SMALL} bytes)"
        }


async def chunks(body: bytes, size: int = 500) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_streamed_body_over_limit_is_413() -> None:
    """spec 3.11: without Content-Length the limit is enforced while reading."""
    async with serve_in_process(create_app(echo_settings(max_request_size=SMALL))) as client:
        request = client.build_request("POST", "/asap", content=chunks(padded_frame(SMALL + 600)))
        assert "content-length" not in request.headers
        response = await client.send(request)
        assert response.status_code == 413
        detail = response.json()["detail"]
        match = re.fullmatch(
            rf"Request size \((\d+) bytes\) exceeds maximum \({SMALL} bytes\)", detail
        )
        assert match and int(match[1]) > SMALL, detail
        assert sample_value(await metrics_text(client), "asap_requests_total") is None


@pytest.mark.parametrize("streamed", [False, True])
async def test_body_exactly_at_limit_is_accepted(streamed: bool) -> None:
    """spec 3.11: the limit is inclusive."""
    async with serve_in_process(create_app(echo_settings(max_request_size=SMALL))) as client:
        body = padded_frame(SMALL)
        response = await client.post("/asap", content=chunks(body) if streamed else body)
        assert response.status_code == 200
        assert_echoed(
            response.json(), json.loads(body)["params"]["envelope"]["payload"]["input"]["m"]
        )


async def test_oversized_body_with_bad_version_gets_version_error() -> None:
    """spec 3.3: the version check runs first, so an oversized body gets -32000, not 413."""
    async with serve_in_process(create_app(echo_settings(max_request_size=SMALL))) as client:
        response = await client.post(
            "/asap", content=padded_frame(SMALL * 3), headers={"asap-version": "99.0"}
        )
        body = rpc_error(response)
        assert body["error"]["code"] == -32000
        assert body["id"] is None


# -- compression (spec 3.11) ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "br", "GZIP", " br "])
async def test_compressed_request_is_decoded(echo_http: httpx.AsyncClient, encoding: str) -> None:
    """spec 3.11: gzip and br request bodies are decompressed."""
    body = dumps(echo_frame("compressed " * 200))
    packed = gzip.compress(body) if "gz" in encoding.lower() else brotli.compress(body)
    assert len(packed) < len(body)
    response = await echo_http.post("/asap", content=packed, headers={"content-encoding": encoding})
    assert response.status_code == 200
    assert_echoed(response.json(), "compressed " * 200)


async def test_identity_encoding_is_accepted(echo_http: httpx.AsyncClient) -> None:
    """spec 3.3 step 5: identity is the same as no encoding."""
    response = await echo_http.post(
        "/asap", content=dumps(echo_frame("id")), headers={"content-encoding": "identity"}
    )
    assert_echoed(response.json(), "id")


@cache
def zeros_bomb(encoding: str) -> bytes:
    """100 MB of zeros, compressed (a few hundred KB for gzip, less for brotli)."""
    zeros = bytes(100 * 1024 * 1024)
    if encoding == "gzip":
        packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return packer.compress(zeros) + packer.flush()
    return brotli.compress(zeros, quality=1)


@pytest.mark.parametrize("encoding", ["gzip", "br"])
async def test_compression_bomb_is_413(echo_http: httpx.AsyncClient, encoding: str) -> None:
    """spec 3.11: the decompressed size is bounded by the same 10 MiB limit."""
    bomb = zeros_bomb(encoding)
    assert len(bomb) < 1024 * 1024
    response = await echo_http.post("/asap", content=bomb, headers={"content-encoding": encoding})
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert detail.startswith("Decompressed request size (")
    assert detail.endswith(f") exceeds maximum ({DEFAULT_LIMIT} bytes)")


async def test_deflate_is_415(echo_http: httpx.AsyncClient) -> None:
    """spec 3.3 step 5: unsupported encodings get 415 with the exact detail."""
    response = await echo_http.post(
        "/asap", content=zlib.compress(dumps(frame())), headers={"content-encoding": "deflate"}
    )
    assert response.status_code == 415
    assert response.json() == {
        "detail": "Unsupported Content-Encoding: deflate. Supported: br, gzip"
    }


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"this is not gzip at all"),
        ("br", b"\xff\xff\xff\xff garbage"),
        ("gzip", gzip.compress(b'{"jsonrpc":"2.0"}')[:-10]),  # truncated
    ],
)
async def test_bad_compressed_data_is_400(
    echo_http: httpx.AsyncClient, encoding: str, body: bytes
) -> None:
    """spec 3.3 step 5: bad compressed data is HTTP 400 with a detail."""
    response = await echo_http.post("/asap", content=body, headers={"content-encoding": encoding})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("Invalid compressed data: ")


# -- version negotiation (spec 3.9) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "negotiated"),
    [
        (None, "2.2"),
        ("", "2.2"),
        ("   ", "2.2"),
        ("2.1", "2.1"),
        ("2.2", "2.2"),
        ("9.9, 2.1", "2.1"),
        ("2.2, 2.1", "2.2"),
        ("2.1, 2.2", "2.1"),
        ("  2.1  ", "2.1"),
    ],
)
async def test_version_negotiation(
    echo_http: httpx.AsyncClient, header: str | None, negotiated: str
) -> None:
    """spec 3.9: the first supported token in the caller's order; absent or blank means 2.2."""
    headers = {} if header is None else {"asap-version": header}
    response = await echo_http.post("/asap", content=dumps(echo_frame("v")), headers=headers)
    assert response.status_code == 200
    assert response.headers["asap-version"] == negotiated
    assert_echoed(response.json(), "v")


@pytest.mark.parametrize("header", ["99.0", "9.9", "2.0, 3.0", "banana"])
async def test_unsupported_version(echo_http: httpx.AsyncClient, header: str) -> None:
    """spec 3.9: HTTP 200, -32000 with requested/supported, id null, header 2.2."""
    response = await echo_http.post(
        "/asap", content=dumps(echo_frame("v")), headers={"asap-version": header}
    )
    assert response.json() == {
        "jsonrpc": "2.0",
        "error": {
            "code": -32000,
            "message": "ASAP protocol version incompatible",
            "data": {"requested": header, "supported": ["2.1", "2.2"]},
        },
        "id": None,
    }
    assert response.headers["asap-version"] == "2.2"


async def test_unsupported_version_is_checked_before_parsing(echo_http: httpx.AsyncClient) -> None:
    """spec 3.9: Harness v2 sends an empty body with 99.0 and expects -32000."""
    response = await echo_http.post("/asap", content=b"", headers={"asap-version": "99.0"})
    assert rpc_error(response)["error"]["code"] == -32000
    stream = await echo_http.post("/asap/stream", content=b"{", headers={"asap-version": "99.0"})
    assert rpc_error(stream)["error"]["code"] == -32000


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/.well-known/asap/health", 200),
        ("GET", "/.well-known/asap/manifest.json", 200),
        ("GET", "/asap/metrics", 200),
        ("GET", "/health", 200),
        ("GET", "/ready", 200),
        ("GET", "/nope", 404),
        ("GET", "/asap", 405),
        ("PUT", "/.well-known/asap/health", 405),
        ("POST", "/asap", 200),
    ],
)
async def test_every_response_carries_asap_version(
    echo_http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    """spec 3.1/3.9: every response has the asap-version header."""
    response = await echo_http.request(method, path, content=b"{}" if method == "POST" else None)
    assert response.status_code == status
    assert response.headers["asap-version"] == "2.2"


# -- manifest (spec 3.14) ------------------------------------------------------------------------

MANIFEST = "/.well-known/asap/manifest.json"


def expected_etag(body: Any) -> str:
    return '"' + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() + '"'


async def test_manifest_etag_and_cache_control(echo_http: httpx.AsyncClient) -> None:
    """spec 3.14: ETag is the sha256 of the sorted-keys JSON; max-age 300."""
    response = await echo_http.get(MANIFEST)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["etag"] == expected_etag(response.json())
    again = await echo_http.get(MANIFEST)
    assert again.headers["etag"] == response.headers["etag"]
    assert again.content == response.content


async def test_manifest_content(echo_http: httpx.AsyncClient) -> None:
    """spec 2.4/3.14: our echo agent describes itself; endpoint is <public_url>/asap."""
    manifest = (await echo_http.get(MANIFEST)).json()
    assert manifest["id"] == ECHO_ID
    assert manifest["name"] == "Echo Agent"
    assert manifest["version"] == "0.3.0"
    assert manifest["endpoints"] == {"asap": "http://127.0.0.1:8003/asap", "events": None}
    assert [skill["id"] for skill in manifest["capabilities"]["skills"]] == ["echo"]
    assert manifest["supported_versions"] == ["2.2"]
    assert manifest["ttl_seconds"] == 300
    assert list(manifest)[:4] == ["id", "name", "version", "description"]


@pytest.mark.parametrize(
    "if_none_match",
    ["{etag}", '"nope", {etag}', '{etag},"other"', "W/{etag}", '"a", W/{etag}', "*"],
)
async def test_manifest_if_none_match_gives_304(
    echo_http: httpx.AsyncClient, if_none_match: str
) -> None:
    """spec 3.14: a matching If-None-Match (list, weak, *) gets 304, empty, same headers."""
    etag = (await echo_http.get(MANIFEST)).headers["etag"]
    response = await echo_http.get(
        MANIFEST, headers={"if-none-match": if_none_match.format(etag=etag)}
    )
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["asap-version"] == "2.2"


@pytest.mark.parametrize("if_none_match", ['"deadbeef"', "", 'W/"x", "y"'])
async def test_manifest_non_matching_tag_gives_200(
    echo_http: httpx.AsyncClient, if_none_match: str
) -> None:
    """spec 3.14: a tag that does not match gets the full manifest."""
    response = await echo_http.get(MANIFEST, headers={"if-none-match": if_none_match})
    assert response.status_code == 200
    assert response.json()["id"] == ECHO_ID


# -- health and unknown routes (spec 3.1, 3.14) --------------------------------------------------


async def test_well_known_health(echo_http: httpx.AsyncClient) -> None:
    """spec 3.14: exact keys, order and values of the health body."""
    response = await echo_http.get("/.well-known/asap/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["status", "agent_id", "version", "asap_version", "uptime_seconds", "load"]
    uptime = body.pop("uptime_seconds")
    assert isinstance(uptime, int | float) and 0 <= uptime < 60
    assert round(uptime, 2) == uptime
    assert body == {
        "status": "healthy",
        "agent_id": ECHO_ID,
        "version": "0.3.0",
        "asap_version": "0.1",
        "load": None,
    }


@pytest.mark.parametrize("path", ["/health", "/ready"])
async def test_probes(echo_http: httpx.AsyncClient, path: str) -> None:
    """spec 3.1: liveness and readiness probes."""
    response = await echo_http.get(path)
    assert response.status_code == 200
    assert response.content == b'{"status":"ok"}'


async def test_unknown_path_is_404(echo_http: httpx.AsyncClient) -> None:
    """spec 3.1: unknown paths get 404 {"detail":"Not Found"}."""
    response = await echo_http.get("/does/not/exist")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


async def test_wrong_method_is_405_with_allow(echo_http: httpx.AsyncClient) -> None:
    """spec 3.1: a wrong method gets 405 with an allow header."""
    response = await echo_http.get("/asap")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {"detail": "Method Not Allowed"}


# -- timestamp window (spec 3.13) ----------------------------------------------------------------


async def test_stale_timestamp_is_32002(echo_http: httpx.AsyncClient) -> None:
    """spec 3.13: older than 300 s gets the recoverable -32002 with its hints."""
    sent = datetime.now(UTC) - timedelta(seconds=301)
    request = echo_frame("old", timestamp=iso(sent), id="E-old")
    body = rpc_error(await echo_http.post("/asap", content=dumps(request)))
    error = body["error"]
    assert body["id"] == "r1"
    assert error["code"] == -32002
    assert re.fullmatch(
        r"Envelope timestamp is too old: 30\d\.\d seconds \(max: 300 seconds\)", error["message"]
    ), error["message"]
    data = error["data"]
    assert list(data) == [
        "code",
        "rpc_code",
        "message",
        "details",
        "retry_after_ms",
        "fallback_action",
        "recoverable",
        "asap_taxonomy_code",
        "error",
    ]
    assert data["code"] == data["asap_taxonomy_code"] == "asap:protocol/invalid_timestamp"
    assert data["rpc_code"] == -32002
    assert data["message"] == error["message"]
    assert data["recoverable"] is True
    assert data["retry_after_ms"] == 5000
    assert data["fallback_action"] == "resend_with_fresh_timestamp"
    assert data["error"] == "Invalid envelope timestamp"
    details = data["details"]
    assert list(details) == ["timestamp", "age_seconds", "envelope_id", "max_age_seconds"]
    assert details["envelope_id"] == "E-old"
    assert details["max_age_seconds"] == 300
    assert 301 <= details["age_seconds"] < 310
    assert datetime.fromisoformat(details["timestamp"]) == sent


async def test_future_timestamp_is_32002(echo_http: httpx.AsyncClient) -> None:
    """spec 3.13: more than 30 s ahead gets -32002 with the future message."""
    sent = datetime.now(UTC) + timedelta(seconds=31)
    request = echo_frame("future", timestamp=iso(sent), id="E-future")
    error = rpc_error(await echo_http.post("/asap", content=dumps(request)))["error"]
    assert error["code"] == -32002
    assert re.fullmatch(
        r"Envelope timestamp is too far in the future: (30|31)\.\d seconds "
        r"\(max tolerance: 30 seconds\)",
        error["message"],
    ), error["message"]
    details = error["data"]["details"]
    assert list(details) == [
        "timestamp",
        "future_offset_seconds",
        "envelope_id",
        "max_future_tolerance_seconds",
    ]
    assert details["max_future_tolerance_seconds"] == 30
    assert details["envelope_id"] == "E-future"
    assert 30 < details["future_offset_seconds"] <= 31
    assert error["data"]["recoverable"] is True


@pytest.mark.parametrize("offset", [-299, 29, 0])
async def test_timestamps_inside_the_window_pass(echo_http: httpx.AsyncClient, offset: int) -> None:
    """spec 3.13: 299 s old and 29 s ahead are accepted."""
    sent = datetime.now(UTC) + timedelta(seconds=offset)
    response = await echo_http.post("/asap", content=dumps(echo_frame("ok", timestamp=iso(sent))))
    assert_echoed(response.json(), "ok")


async def test_naive_and_offset_timestamps_are_judged_in_utc(echo_http: httpx.AsyncClient) -> None:
    """spec 3.13: a naive timestamp counts as UTC; an offset is honoured."""
    now = datetime.now(UTC)
    naive = now.replace(tzinfo=None).isoformat()
    offset = now.astimezone(timezone(timedelta(hours=-7))).isoformat()
    plus_five = (now + timedelta(hours=5)).replace(tzinfo=None).isoformat() + "+05:00"
    for stamp in (naive, offset, plus_five):
        response = await echo_http.post("/asap", content=dumps(echo_frame(stamp, timestamp=stamp)))
        assert_echoed(response.json(), stamp)
    stale = (now - timedelta(hours=5)).replace(tzinfo=None).isoformat() + "+00:00"
    response = await echo_http.post("/asap", content=dumps(echo_frame("x", timestamp=stale)))
    assert rpc_error(response)["error"]["code"] == -32002


# -- payload types (spec 1.4) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload_type", ["task.request", "TaskRequest", "task_request", "Task-Request"]
)
async def test_payload_type_spellings_reach_the_echo_skill(
    echo_http: httpx.AsyncClient, payload_type: str
) -> None:
    """spec 1.4/12.1: we dispatch on the normalized key, so every spelling works."""
    request = echo_frame(payload_type, payload_type=payload_type)
    assert_echoed((await echo_http.post("/asap", content=dumps(request))).json(), payload_type)


@pytest.mark.parametrize(
    ("payload_type", "payload"),
    [
        ("foo.bar", {"anything": 1}),
        ("mcp.tool_call", {"request_id": "r", "tool_name": "t", "arguments": {}}),
        (
            "message.send",
            {"task_id": "t", "message_id": "m", "sender": "s", "role": "user", "parts": []},
        ),
    ],
)
async def test_unhandled_payload_type_is_32012(
    echo_http: httpx.AsyncClient, payload_type: str, payload: dict[str, Any]
) -> None:
    """spec 3.3 step 15/3.6: no handler gives -32012 with details.payload_type."""
    request = frame(envelope(payload_type=payload_type, payload=payload), "r9")
    body = rpc_error(await echo_http.post("/asap", content=dumps(request)))
    assert body["id"] == "r9"
    error = body["error"]
    message = f"No handler registered for payload type: {payload_type}"
    assert error["code"] == -32012
    assert error["message"] == message
    data = error["data"]
    assert data["code"] == "asap:transport/handler_not_found"
    assert data["details"] == {"payload_type": payload_type}
    assert data["error"] == message
    assert data["recoverable"] is False


async def test_unknown_skill_is_32013(echo_http: httpx.AsyncClient) -> None:
    """Our addition to spec 3.6: an unknown skill_id is refused, listing what exists."""
    payload = {"conversation_id": "c", "skill_id": "nope", "input": {}}
    body = rpc_error(await echo_http.post("/asap", content=dumps(frame(envelope(payload=payload)))))
    assert body["error"]["code"] == -32013
    assert body["error"]["data"]["details"] == {"skill_id": "nope", "available_skills": ["echo"]}


# -- rate limit (spec 3.10) ----------------------------------------------------------------------

FROZEN = 1000.0  # a frozen monotonic clock: window 16 of 60 s, which resets at 1020 s


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every RateLimiter the app builds use a frozen clock (no window edge mid-test)."""
    monkeypatch.setitem(RateLimiter.__init__.__kwdefaults__, "clock", lambda: FROZEN)


@pytest.fixture
async def limited_http(frozen_clock: None) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_in_process(create_app(echo_settings(rate_limit="3/minute"))) as client:
        yield client


RATE_LIMITED = (
    b'{"jsonrpc":"2.0","id":null,"error":{"code":429,"message":"Rate limit exceeded",'
    b'"data":{"retry_after":20,"limit":"3 per 1 minute"}}}'
)


def assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429
    assert response.headers["retry-after"] == "20"
    assert response.headers["asap-version"] == "2.2"
    assert response.content == RATE_LIMITED


async def test_fourth_request_is_429(limited_http: httpx.AsyncClient) -> None:
    """spec 3.10: three pass, the fourth gets 429 with Retry-After and the exact body."""
    for i in range(3):
        assert_echoed((await limited_http.post("/asap", content=dumps(echo_frame(i)))).json(), i)
    assert_rate_limited(await limited_http.post("/asap", content=dumps(echo_frame(3))))
    # refused requests are not charged, and stay refused in the same window
    assert_rate_limited(await limited_http.post("/asap", content=b"not json"))


async def test_errors_count_too(limited_http: httpx.AsyncClient) -> None:
    """spec 3.3 step 4: the limiter runs before parsing, so bad bodies use hits."""
    for body in (b"not json", b"{}", dumps(echo_frame("x"))):
        assert (await limited_http.post("/asap", content=body)).status_code == 200
    assert_rate_limited(await limited_http.post("/asap", content=dumps(echo_frame("y"))))


async def test_get_endpoints_are_never_limited(limited_http: httpx.AsyncClient) -> None:
    """spec 3.10: only POST /asap and /asap/stream are limited."""
    for i in range(3):
        await limited_http.post("/asap", content=dumps(echo_frame(i)))
    assert_rate_limited(await limited_http.post("/asap", content=dumps(echo_frame(3))))
    for _ in range(5):
        for path in ("/.well-known/asap/health", MANIFEST, "/asap/metrics", "/health", "/ready"):
            assert (await limited_http.get(path)).status_code == 200, path


async def test_stream_endpoint_is_limited(limited_http: httpx.AsyncClient) -> None:
    """spec 3.10: POST /asap/stream shares the limit."""
    for i in range(3):
        await limited_http.post("/asap", content=dumps(echo_frame(i)))
    assert_rate_limited(await limited_http.post("/asap/stream", content=dumps(echo_frame("s"))))


async def test_batch_of_3_uses_3_hits(limited_http: httpx.AsyncClient) -> None:
    """spec 3.7/3.10: a batch of N consumes N hits."""
    batch = [echo_frame(i, i) for i in range(3)]
    replies = (await limited_http.post("/asap", content=dumps(batch))).json()
    assert [reply["id"] for reply in replies] == [0, 1, 2]
    assert_rate_limited(await limited_http.post("/asap", content=dumps(echo_frame("next"))))


async def test_batch_over_the_remaining_budget_is_refused_whole(
    limited_http: httpx.AsyncClient,
) -> None:
    """spec 3.7: the batch is charged N before processing, or refused as a whole."""
    assert_echoed((await limited_http.post("/asap", content=dumps(echo_frame(0)))).json(), 0)
    batch = [echo_frame(i, i) for i in range(3)]
    assert_rate_limited(await limited_http.post("/asap", content=dumps(batch)))
    # the refused batch was not charged: two single requests still pass
    for i in range(2):
        assert_echoed((await limited_http.post("/asap", content=dumps(echo_frame(i)))).json(), i)


@pytest.mark.parametrize(
    "packing",
    ["leading whitespace", "gzip", "br"],
)
async def test_any_batch_of_3_uses_3_hits(limited_http: httpx.AsyncClient, packing: str) -> None:
    """spec 3.7/3.10: a batch costs N hits however its bytes are laid out or compressed.

    We decode compressed batches (the reference does not), so they must be charged too.
    """
    raw = dumps([echo_frame(i, i) for i in range(3)])
    headers = {}
    if packing == "leading whitespace":
        body = b"  \n" + raw
    elif packing == "gzip":
        body, headers = gzip.compress(raw), {"content-encoding": "gzip"}
    else:
        body, headers = brotli.compress(raw), {"content-encoding": "br"}
    replies = (await limited_http.post("/asap", content=body, headers=headers)).json()
    assert [reply["id"] for reply in replies] == [0, 1, 2]
    assert_rate_limited(await limited_http.post("/asap", content=dumps(echo_frame("next"))))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_window_resets() -> None:
    """spec 3.10: fixed windows per key reset when the window ends."""
    clock = FakeClock(120.0)
    limiter = RateLimiter(parse_rate_limit("2/minute"), clock=clock)
    assert limiter.hit("a") is None
    assert limiter.hit("a") is None
    refused = limiter.hit("a")
    assert refused is not None
    assert refused[0] == 60
    assert refused[1].text == "2 per 1 minute"
    assert limiter.hit("b") is None  # per key
    clock.now = 179.9
    assert limiter.hit("a") is not None
    clock.now = 180.0
    assert limiter.hit("a") is None
    assert limiter.hit("a") is None
    assert limiter.hit("a") is not None


def test_refused_hit_is_not_charged() -> None:
    """spec 3.10: a refused request does not use the budget of any window."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(parse_rate_limit("3/second;4/minute"), clock=clock)
    assert limiter.hit("k", 3) is None
    refused = limiter.hit("k", 2)  # over the per-second limit
    assert refused is not None and refused[1].text == "3 per 1 second"
    clock.now = 1.0
    # the refused 2 were not charged to the minute window: 3 used, 1 left
    assert limiter.hit("k") is None
    refused = limiter.hit("k")
    assert refused is not None and refused[1].text == "4 per 1 minute"
    assert refused[0] == 59


@pytest.mark.parametrize("now", [0.0, 59.0, 59.999, 59.0000001])
def test_retry_after_is_at_least_1(now: float) -> None:
    """spec 3.10: retry_after is the seconds until the window resets, at least 1."""
    limiter = RateLimiter(parse_rate_limit("1/minute"), clock=FakeClock(now))
    assert limiter.hit("k") is None
    refused = limiter.hit("k")
    assert refused is not None
    assert refused[0] >= 1
    assert refused[0] == max(1, -int(-(60 - now)))  # ceil


def test_a_cost_above_the_limit_is_always_refused() -> None:
    """spec 3.7: a batch bigger than the whole limit never passes."""
    limiter = RateLimiter(parse_rate_limit("3/minute"), clock=FakeClock(0.0))
    assert limiter.hit("k", 4) is not None
    assert limiter.hit("k", 3) is None


@pytest.mark.parametrize(
    ("spec", "texts", "seconds"),
    [
        ("10/second;100/minute", ["10 per 1 second", "100 per 1 minute"], [1, 60]),
        ("5 per 2 minutes", ["5 per 2 minute"], [120]),
        ("1/hour", ["1 per 1 hour"], [3600]),
        (" 7/day ; ", ["7 per 1 day"], [86400]),
    ],
)
def test_parse_rate_limit(spec: str, texts: list[str], seconds: list[int]) -> None:
    """spec 3.10: the limit string and how each limit is named in the 429 body."""
    limits = parse_rate_limit(spec)
    assert [limit.text for limit in limits] == texts
    assert [limit.seconds for limit in limits] == seconds


@pytest.mark.parametrize(
    "spec",
    ["", ";", "garbage", "10/fortnight", "ten/second", "0/second", "5/0 minutes", "-1/second"],
)
def test_parse_rate_limit_errors(spec: str) -> None:
    """spec 3.10: a bad ASAP_RATE_LIMIT is a configuration error, not a silent no-limit."""
    with pytest.raises(ConfigurationError):
        parse_rate_limit(spec)


def test_bad_rate_limit_fails_at_app_creation() -> None:
    """A typo in rate_limit stops the app from being built."""
    with pytest.raises(ConfigurationError):
        create_app(echo_settings(rate_limit="lots/second"))


async def test_the_gc_threshold_is_set_at_start_up() -> None:
    before = gc.get_threshold()
    try:
        async with serve_in_process(create_app(echo_settings(gc_threshold=12345))):
            assert gc.get_threshold() == (12345, *before[1:])
        gc.set_threshold(*before)
        async with serve_in_process(create_app(echo_settings(gc_threshold=0))):
            assert gc.get_threshold() == before  # 0: Python's own, untouched
    finally:
        gc.set_threshold(*before)
    with pytest.raises(ConfigurationError, match="ASAP_GC_THRESHOLD must be 0"):
        create_app(echo_settings(gc_threshold=-1))


# -- metrics (spec 6.2) --------------------------------------------------------------------------


async def test_metrics_after_one_success_and_one_unknown_skill(
    echo_http: httpx.AsyncClient,
) -> None:
    """spec 6.2: request counters by payload type and status, error type, sane histograms."""
    assert_echoed((await echo_http.post("/asap", content=dumps(echo_frame("m")))).json(), "m")
    unknown = frame(envelope(payload={"conversation_id": "c", "skill_id": "nope", "input": {}}))
    assert rpc_error(await echo_http.post("/asap", content=dumps(unknown)))["error"]["code"] == (
        -32013
    )
    text = await metrics_text(echo_http)
    lines = text.splitlines()
    assert 'asap_requests_total{payload_type="task.request",status="success"} 1.0' in lines
    assert 'asap_requests_total{payload_type="task.request",status="error"} 1.0' in lines
    assert 'asap_requests_success_total{payload_type="task.request"} 1.0' in lines
    error_labels = {"payload_type": "task.request", "error_type": "skill_not_found"}
    assert sample_value(text, "asap_requests_error_total", error_labels) == 1.0
    assert 'asap_handler_executions_total{payload_type="task.request"} 1.0' in lines
    assert "# TYPE asap_request_duration_seconds histogram" in lines
    assert "# TYPE asap_process_uptime_seconds gauge" in lines

    histograms = 0
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            key = tuple(sorted(labels.items()))
            if sample.name.endswith("_count"):
                counts[key] = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
        for key, series in buckets.items():
            histograms += 1
            values = [value for _, value in sorted(series)]
            assert values == sorted(values), (family.name, key, series)  # cumulative once
            assert all(value <= counts[key] for value in values), (family.name, key, series)
            assert values[-1] == counts[key]  # +Inf == _count
    assert histograms >= 3  # request duration (success, error) and handler duration


# -- no 500s -------------------------------------------------------------------------------------


def nested_object(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def echo_envelope(value: Any) -> dict[str, Any]:
    return envelope(payload={"conversation_id": "c", "skill_id": "echo", "input": value})


def with_raw(value: Any) -> bytes:
    """JSON of ``value`` where each string "@TOKEN" is written as the raw text TOKEN."""
    text = json.dumps(value)
    return re.sub(r'"@((?:[^"\\]|\\.)*)"', lambda m: json.loads(f'"{m[1]}"'), text).encode()


def full_frame(**envelope_fields: Any) -> bytes:
    return dumps(frame(envelope(**envelope_fields)))


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "not json": b"this is not json",
    "truncated": dumps(frame())[:-5],
    "invalid utf-8": b'{"jsonrpc":"2.0","method":"\xff\xfe"}',
    "utf-8 bom": b"\xef\xbb\xbf" + dumps(frame()),
    "arrays 10000 deep": b"[" * 10000 + b"]" * 10000,
    "objects 10000 deep": b'{"a":' * 10000 + b"1" + b"}" * 10000,
    "arrays 1000 deep": b"[" * 1000 + b"]" * 1000,
    "huge integer": b"1" + b"0" * 5000,
    "huge integer id": b'{"jsonrpc":"2.0","method":"asap.send","params":{},"id":1'
    + b"0" * 400
    + b"}",
    "NaN": b"NaN",
    "Infinity id": b'{"jsonrpc":"2.0","method":"asap.send","params":{},"id":Infinity}',
    "null": b"null",
    "true": b"true",
    "string": b'"asap.send"',
    "[]": b"[]",
    "[[]]": b"[[]]",
    "[null, 1, {}]": b"[null, 1, {}]",
    "{}": b"{}",
    "params list": b'{"jsonrpc":"2.0","method":"asap.send","params":[],"id":1}',
    "params null": b'{"jsonrpc":"2.0","method":"asap.send","params":null,"id":1}',
    "id object": b'{"jsonrpc":"2.0","method":"asap.send","params":{},"id":{"a":1}}',
    "id float": b'{"jsonrpc":"2.0","method":"asap.send","params":{},"id":1.5}',
    "method number": b'{"jsonrpc":"2.0","method":5,"params":{},"id":1}',
    "jsonrpc 1.0": b'{"jsonrpc":"1.0","method":"asap.send","params":{},"id":1}',
    "envelope list": b'{"jsonrpc":"2.0","method":"asap.send","params":{"envelope":[]},"id":1}',
    "envelope empty": b'{"jsonrpc":"2.0","method":"asap.send","params":{"envelope":{}},"id":1}',
    "payload list only": b'{"params": {"envelope": {"payload": []}}}',
    "payload list": full_frame(payload=[]),
    "payload null": full_frame(payload=None),
    "payload string": full_frame(payload="x"),
    "payload_type number": full_frame(payload_type=5),
    "payload_type empty": full_frame(payload_type=""),
    "sender 100k": full_frame(sender="urn:asap:agent:" + "a" * 100_000),
    "extensions list": full_frame(extensions=[1]),
    "timestamp garbage": full_frame(timestamp="yesterday"),
    "timestamp year 1": full_frame(timestamp="0001-01-01T00:00:00-05:00"),
    "timestamp year 9999": full_frame(timestamp="9999-12-31T23:59:59+14:00"),
    "timestamp 1e30": full_frame(timestamp=1e30),
    "timestamp NaN": with_raw(frame(envelope(timestamp="@NaN"))),
    "input NaN": with_raw(frame(echo_envelope({"x": "@NaN", "y": "@-Infinity"}))),
    "input huge integer": with_raw(frame(echo_envelope({"n": "@1" + "0" * 40}))),
    "input objects 300 deep": dumps(frame(echo_envelope(nested_object(300)))),
    "input arrays 600 deep": with_raw(frame(echo_envelope({"x": "@" + "[" * 600 + "]" * 600}))),
    "input lone surrogate": with_raw(frame(echo_envelope({"x": '@"\\ud800"'}))),
    "id lone surrogate": with_raw(
        {"jsonrpc": "2.0", "method": "nope", "params": {}, "id": '@"\\udfff"'}
    ),
    "skill_id NaN": with_raw(
        frame(envelope(payload={"conversation_id": "c", "skill_id": "@NaN", "input": {}}))
    ),
    "batch of garbage": b'[1, "x", null, [], {"id": 1}, {"params": {"envelope": {"payload": []}}}]',
    "duplicate keys": b'{"id":1,"id":"2","jsonrpc":"2.0","method":"asap.send","params":{}}',
}


@pytest.fixture
async def lenient_http() -> AsyncIterator[httpx.AsyncClient]:
    """An echo agent whose crashes reach the client as the 500 a real client would get."""
    async with serve_lenient(create_app(echo_settings(log_level="CRITICAL"))) as client:
        yield client


@pytest.mark.parametrize("path", ["/asap", "/asap/stream"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_bodies_never_get_a_5xx(
    lenient_http: httpx.AsyncClient, name: str, path: str
) -> None:
    """spec 3.3/12.2: whatever is sent, the answer is JSON-RPC (or a documented 4xx), never 5xx."""
    response = await lenient_http.post(path, content=HOSTILE[name])
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        assert response.status_code in (400, 413, 415), response.status_code
        assert set(response.json()) == {"detail"}
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        # spec 3.8: a stream that starts must end with its final chunk
        events = [event for event in response.text.split("\n\n") if event]
        assert all(event.startswith("data: ") for event in events), response.text[:300]
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["payload"]["final"] is True, ("stream cut short", len(events))
        return
    reply = response.json()
    replies = reply if isinstance(reply, list) else [reply]
    assert replies
    for item in replies:
        assert item["jsonrpc"] == "2.0"
        assert ("error" in item) != ("result" in item), item
        if "error" in item:
            assert isinstance(item["error"]["code"], int)
            assert isinstance(item["error"]["message"], str)


@pytest.mark.parametrize("name", ["timestamp NaN", "skill_id NaN"])
async def test_non_standard_json_values_are_parse_errors(name: str) -> None:
    """spec 3.3 step 6: only strict JSON is accepted (NaN is not JSON), so every accepted
    value can be written back in a reply."""
    async with serve_lenient(create_app(echo_settings())) as client:
        response = await client.post("/asap", content=HOSTILE[name])
        body = rpc_error(response)
        assert body["error"]["code"] == -32700, body
        assert body["error"]["data"]["error"].startswith("Invalid JSON")


async def test_not_an_object_is_32600(echo_http: httpx.AsyncClient) -> None:
    """spec 3.3 step 7: a JSON value that is not an object or array."""
    body = rpc_error(await echo_http.post("/asap", content=b'"x"'))
    assert body == {
        "jsonrpc": "2.0",
        "error": {
            "code": -32600,
            "message": "Invalid request",
            "data": {"error": "JSON-RPC request must be an object", "received_type": "str"},
        },
        "id": None,
    }


async def test_parse_error_is_32700_with_null_id(echo_http: httpx.AsyncClient) -> None:
    """spec 3.3 step 6: bad JSON gets -32700 and id null."""
    body = rpc_error(await echo_http.post("/asap", content=b'{"id": "r1", '))
    assert body["error"]["code"] == -32700
    assert body["error"]["message"] == "Parse error"
    assert body["id"] is None


async def test_asap_version_header_is_sent_once(echo_http: httpx.AsyncClient) -> None:
    """spec 3.9: POST /asap (served without Starlette's layers) and the other routes carry
    exactly one asap-version header."""
    for method, path in [("POST", "/asap"), ("GET", "/asap"), ("POST", "/asap/stream")]:
        response = await echo_http.request(method, path, content=dumps(echo_frame("v")))
        assert response.headers.get_list("asap-version") == ["2.2"], (method, path)
    posted = await echo_http.post("/asap", content=dumps(echo_frame("v")))
    assert posted.headers["content-type"] == "application/json"
    assert int(posted.headers["content-length"]) == len(posted.content)


async def test_user_middleware_sees_post_asap() -> None:
    """Middleware a user adds to the app wraps POST /asap too (not only the other routes)."""
    seen: list[str] = []

    class Recorder:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append(f"{scope['method']} {scope['path']}")
            await self.app(scope, receive, send)

    app = create_app(echo_settings())
    app.add_middleware(Recorder)
    async with serve_in_process(app) as client:
        response = await client.post("/asap", content=dumps(echo_frame("mw")))
        assert_echoed(response.json(), "mw")
        assert response.headers.get_list("asap-version") == ["2.2"]
        await client.get("/health")
    assert seen == ["POST /asap", "GET /health"]


async def test_post_asap_under_a_root_path() -> None:
    """Mounted under a prefix (root_path), POST <prefix>/asap is served the same way."""
    app = create_app(echo_settings())
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, root_path="/agent")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/agent/asap", content=dumps(echo_frame("rp")))
    assert_echoed(response.json(), "rp")


async def test_client_gone_before_the_whole_body_gets_400() -> None:
    """A caller that disconnects mid-body gets a 400, not a 500 with a traceback."""
    app = create_app(echo_settings())
    body = dumps(echo_frame("cut"))
    messages = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/asap",
        "raw_path": b"/asap",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    async with LifespanManager(app) as manager:
        await manager.app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {
        "detail": "Client disconnected before sending the whole body"
    }

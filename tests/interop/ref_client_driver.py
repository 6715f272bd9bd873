#!/usr/bin/env python3
"""Drive the *reference* ASAP client (PyPI ``asap-protocol``) against a server.

Run this with the reference venv's interpreter (``.venv-ref/bin/python``, made by
``scripts/ref-venv.sh``), never with the project venv: the ``asap`` package it
imports is the reference implementation, not ours.

    .venv-ref/bin/python tests/interop/ref_client_driver.py \
        --base-url http://127.0.0.1:8001 --all
    .venv-ref/bin/python tests/interop/ref_client_driver.py \
        --base-url http://127.0.0.1:8001 --case send --case health

Output contract (what the pytest side parses):

* stdout carries exactly one line per requested case, in the order requested,
  each of the form ``RESULT {json}``. The JSON object always has ``case`` and
  ``ok``. Failures look like
  ``{"case": ..., "ok": false, "error_type": ..., "error": ..., "rpc_code": ..., "data": ...}``.
* Everything else (the reference's structlog output, which it sends to the
  process's stdout by default, warnings, tracebacks) is moved to stderr. The
  ``RESULT `` prefix is kept anyway so a parser can filter safely.
* Exit status is 0 whenever the driver itself ran (even if cases failed),
  2 on bad command-line usage, 3 if the reference package is not installed.
"""

from __future__ import annotations

import os
import sys

# --- keep stdout clean -------------------------------------------------------
# The reference configures logging on import with a StreamHandler bound to
# sys.stdout. Point fd 1 at stderr *before* importing it, and keep a private
# duplicate of the original stdout for our RESULT lines.
_RESULT_FD = os.dup(1)
os.dup2(2, 1)
_RESULT_STREAM = os.fdopen(_RESULT_FD, "w", buffering=1, encoding="utf-8")
os.environ.setdefault("ASAP_LOG_LEVEL", "WARNING")


def _drop_shadowing_paths() -> None:
    """Make sure ``import asap`` finds the reference, not this repo's package.

    Our own ``asap`` package lives at the repo root; if the driver is started with
    the repo on sys.path (cwd with ``-m``, PYTHONPATH, ...) it would shadow the
    reference installed in the venv.
    """
    prefix = os.path.realpath(sys.prefix)
    keep = []
    for entry in sys.path:
        real = os.path.realpath(entry or os.getcwd())
        shadows = os.path.isfile(os.path.join(real, "asap", "__init__.py"))
        if shadows and not real.startswith(prefix + os.sep):
            continue
        keep.append(entry)
    sys.path[:] = keep


_drop_shadowing_paths()


def _require_reference() -> None:
    import importlib.metadata as md

    try:
        md.version("asap-protocol")
    except md.PackageNotFoundError:
        print(
            "ref_client_driver.py: asap-protocol is not installed in this interpreter "
            f"({sys.executable}); run it with .venv-ref/bin/python (scripts/ref-venv.sh)",
            file=sys.stderr,
        )
        sys.exit(3)


_require_reference()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

warnings.simplefilter("ignore")

import httpx  # noqa: E402

from asap.errors import ASAPError, RecoverableError, RemoteRPCError  # noqa: E402
from asap.models.envelope import Envelope  # noqa: E402
from asap.models.ids import generate_id  # noqa: E402
from asap.models.payloads import TaskRequest  # noqa: E402
from asap.transport.client import ASAPClient  # noqa: E402

RESULT_PREFIX = "RESULT "
SENDER = "urn:asap:agent:ref-client"
RECIPIENT = "urn:asap:agent:echo-agent"
ASAP_VERSION = "0.1"  # envelope-level protocol version the reference emits
LARGE_TEXT_BYTES = 200 * 1024


# --- helpers -----------------------------------------------------------------


def emit(obj: dict[str, Any]) -> None:
    _RESULT_STREAM.write(RESULT_PREFIX + json.dumps(obj, default=str, sort_keys=True) + "\n")
    _RESULT_STREAM.flush()


def dump(model: Any) -> Any:
    if hasattr(model, "model_dump"):
        return model.model_dump(mode="json")
    return model


def envelope_summary(env: Envelope) -> dict[str, Any]:
    full = env.model_dump(mode="json")
    return {
        "id": env.id,
        "asap_version": env.asap_version,
        "payload_type": env.payload_type,
        "correlation_id": env.correlation_id,
        "sender": env.sender,
        "recipient": env.recipient,
        "trace_id": env.trace_id,
        "payload": full["payload"],
        "envelope": full,
    }


def error_fields(exc: BaseException) -> dict[str, Any]:
    """Flatten an exception into JSON-able fields (ASAP error attributes if present)."""
    out: dict[str, Any] = {
        "error_type": type(exc).__name__,
        "error_mro": [c.__name__ for c in type(exc).__mro__ if c not in (object, BaseException)],
        "error": str(exc),
        "message": getattr(exc, "message", str(exc)),
        "code": getattr(exc, "code", None),
        "rpc_code": getattr(exc, "rpc_code", None),
        "json_rpc_code": getattr(exc, "json_rpc_code", None),
        "data": None,
        "is_recoverable": None,
        "retry_after_ms": getattr(exc, "retry_after_ms", None),
        "fallback_action": getattr(exc, "fallback_action", None),
    }
    if isinstance(exc, ASAPError):
        out["data"] = exc.details
        out["is_recoverable"] = (
            exc.is_recoverable
            if isinstance(exc, RemoteRPCError)
            else isinstance(exc, RecoverableError)
        )
    return out


class RecordingTransport(httpx.AsyncBaseTransport):
    """Transparent httpx transport that notes what went over the wire."""

    def __init__(self, exchanges: list[dict[str, Any]] | None = None) -> None:
        try:
            import h2  # noqa: F401

            http2 = True
        except ImportError:
            http2 = False
        self._inner = httpx.AsyncHTTPTransport(http2=http2)
        self.exchanges: list[dict[str, Any]] = exchanges if exchanges is not None else []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            body = request.content
        except httpx.RequestNotRead:  # streaming body; not used by these cases
            body = b""
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "request_content_encoding": request.headers.get("content-encoding"),
            "request_asap_version": request.headers.get("asap-version"),
            "request_body_bytes": len(body),
        }
        response = await self._inner.handle_async_request(request)
        record["status"] = response.status_code
        record["http_version"] = response.extensions.get("http_version", b"").decode() or None
        record["response_content_type"] = response.headers.get("content-type")
        record["response_content_encoding"] = response.headers.get("content-encoding")
        record["response_asap_version"] = response.headers.get("asap-version")
        self.exchanges.append(record)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def make_request(
    skill_id: str = "echo",
    input_: dict[str, Any] | None = None,
    *,
    trace_id: str | None = None,
) -> Envelope:
    payload = TaskRequest(
        conversation_id=f"conv_{generate_id()}",
        skill_id=skill_id,
        input=input_ if input_ is not None else {},
    )
    return Envelope(
        asap_version=ASAP_VERSION,
        sender=SENDER,
        recipient=RECIPIENT,
        payload_type="task.request",
        payload=payload.model_dump(),
        trace_id=trace_id or f"trace_{generate_id()}",
    )


def echoed(env: Envelope) -> Any:
    payload = env.model_dump(mode="json")["payload"]
    result = payload.get("result") if isinstance(payload, dict) else None
    return result.get("echoed") if isinstance(result, dict) else None


# --- cases ------------------------------------------------------------------

Case = Callable[[ASAPClient, argparse.Namespace], Awaitable[dict[str, Any]]]


async def case_send(client: ASAPClient, args: argparse.Namespace) -> dict[str, Any]:
    input_ = {"message": "hi", "n": 1}
    req = make_request("echo", input_)
    resp = await client.send(req)
    return {
        "ok": True,
        "request_id": req.id,
        "request_trace_id": req.trace_id,
        "request": req.model_dump(mode="json"),
        "response": envelope_summary(resp),
        "correlation_ok": resp.correlation_id == req.id,
        "echo_ok": echoed(resp) == input_,
        "last_response_asap_version": client.last_response_asap_version,
    }


def _batch_inputs() -> list[dict[str, Any]]:
    return [{"message": f"batch-{i}", "n": i} for i in range(3)]


async def case_batch(client: ASAPClient, args: argparse.Namespace) -> dict[str, Any]:
    inputs = _batch_inputs()
    reqs = [make_request("echo", i) for i in inputs]
    resps = await client.batch(reqs)
    return {
        "ok": True,
        "request_ids": [r.id for r in reqs],
        "responses": [
            {
                "correlation_id": r.correlation_id,
                "payload_type": r.payload_type,
                "payload": r.model_dump(mode="json")["payload"],
            }
            for r in resps
        ],
        "correlation_ids": [r.correlation_id for r in resps],
        "correlation_ok": [r.correlation_id for r in resps] == [r.id for r in reqs],
        "echo_ok": [echoed(r) for r in resps] == inputs,
        "last_response_asap_version": client.last_response_asap_version,
    }


async def case_send_batch(client: ASAPClient, args: argparse.Namespace) -> dict[str, Any]:
    inputs = _batch_inputs()
    reqs = [make_request("echo", i) for i in inputs]
    results = await client.send_batch(reqs, return_exceptions=True)
    items: list[dict[str, Any]] = []
    for r in results:
        if isinstance(r, BaseException):
            items.append({"ok": False, **error_fields(r)})
        else:
            items.append(
                {
                    "ok": True,
                    "correlation_id": r.correlation_id,
                    "payload_type": r.payload_type,
                    "payload": r.model_dump(mode="json")["payload"],
                }
            )
    all_ok = all(i["ok"] for i in items)
    return {
        "ok": all_ok,
        "request_ids": [r.id for r in reqs],
        "responses": items,
        "correlation_ids": [i.get("correlation_id") for i in items],
        "correlation_ok": [i.get("correlation_id") for i in items] == [r.id for r in reqs],
        "echo_ok": all_ok and [echoed(r) for r in results] == inputs,  # type: ignore[arg-type]
        "last_response_asap_version": client.last_response_asap_version,
    }


def manifest_summary(m: Any) -> dict[str, Any]:
    full = m.model_dump(mode="json")
    caps = full.get("capabilities") or {}
    return {
        "id": full.get("id"),
        "name": full.get("name"),
        "version": full.get("version"),
        "asap_version": caps.get("asap_version"),
        "skills": [s.get("id") for s in caps.get("skills") or []],
        "endpoints": full.get("endpoints"),
        "supported_versions": full.get("supported_versions"),
        "manifest": full,
    }


async def case_manifest(client: ASAPClient, args: argparse.Namespace) -> dict[str, Any]:
    got = await client.get_manifest()
    # get_manifest() and discover() share one per-client cache keyed by URL, so a
    # second call on the same client would not touch the wire: use a fresh client.
    async with new_client(args) as other:
        disc = await other.discover(args.base_url)
    g, d = manifest_summary(got), manifest_summary(disc)
    return {"ok": True, "get_manifest": g, "discover": d, "same": g["manifest"] == d["manifest"]}


async def case_health(client: ASAPClient, args: argparse.Namespace) -> dict[str, Any]:
    health = await client.health_check()
    return {"ok": True, "health": dump(health), "health_type": type(health).__name__}


async def case_large_brotli(client: ASAPClient, args: argparse.Namespace) -> dict[str, Any]:
    unit = "The quick brown fox jumps over the lazy dog 0123456789. "
    text = (unit * (LARGE_TEXT_BYTES // len(unit) + 1))[:LARGE_TEXT_BYTES]
    input_ = {"message": text, "n": 2}
    req = make_request("echo", input_)
    resp = await client.send(req)
    out = echoed(resp)
    got = out.get("message") if isinstance(out, dict) else None
    return {
        "ok": True,
        "request_id": req.id,
        "correlation_ok": resp.correlation_id == req.id,
        "input_len": len(text),
        "echoed_len": len(got) if isinstance(got, str) else None,
        "equal": out == input_,
        "payload_type": resp.payload_type,
        "last_response_asap_version": client.last_response_asap_version,
    }


async def case_unknown_skill(client: ASAPClient, args: argparse.Namespace) -> dict[str, Any]:
    req = make_request("no-such-skill", {"message": "hi"})
    try:
        resp = await client.send(req)
    except RemoteRPCError as exc:  # a JSON-RPC error from the peer is a valid outcome
        return {
            "ok": True,
            "raised": True,
            "request_id": req.id,
            **error_fields(exc),
            "last_response_asap_version": client.last_response_asap_version,
        }
    return {
        "ok": True,
        "raised": False,
        "request_id": req.id,
        "response": envelope_summary(resp),
        "last_response_asap_version": client.last_response_asap_version,
    }


CASES: dict[str, Case] = {
    "send": case_send,
    "batch": case_batch,
    "send_batch": case_send_batch,
    "manifest": case_manifest,
    "health": case_health,
    "large_brotli": case_large_brotli,
    "unknown_skill": case_unknown_skill,
}


# --- runner ------------------------------------------------------------------


def new_client(args: argparse.Namespace) -> ASAPClient:
    """A reference client whose HTTP exchanges are appended to ``args.exchanges``."""
    return ASAPClient(
        args.base_url,
        timeout=args.timeout,
        require_https=False,  # loopback http; avoids a warning log line
        transport=RecordingTransport(args.exchanges),
        max_retries=args.max_retries,
        auth_token=args.auth_token,
    )


async def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    args.exchanges = []
    result: dict[str, Any]
    try:
        async with new_client(args) as client:
            result = await asyncio.wait_for(CASES[name](client, args), args.case_timeout)
    except Exception as exc:  # report, never crash
        result = {"ok": False, **error_fields(exc)}
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
    result["case"] = name
    result["http"] = args.exchanges
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="server base URL, e.g. http://127.0.0.1:8001")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--case", action="append", choices=sorted(CASES), help="case to run (repeatable)"
    )
    g.add_argument("--all", action="store_true", help="run every case")
    p.add_argument("--timeout", type=float, default=30.0, help="ASAPClient timeout (s)")
    p.add_argument("--case-timeout", type=float, default=60.0, help="hard limit per case (s)")
    p.add_argument("--max-retries", type=int, default=3, help="ASAPClient max_retries")
    p.add_argument("--auth-token", default=None, help="bearer token the client sends")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks to stderr")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    names = list(CASES) if args.all else args.case
    for name in names:
        emit(await run_case(name, args))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse writes usage to stderr
        return int(e.code or 0)
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

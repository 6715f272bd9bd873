"""The orchestrator calls only configured peers, follows no redirect, and calls them as
itself, never as its caller."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from asap.process import free_port
from tests.security.common import bearer, error_of, frame, start_uvicorn, status_of

CALLER, ORCHESTRATOR = "urn:asap:agent:caller", "urn:asap:agent:orchestrator"
CALLER_TOKEN = "caller-token-0123456789abcdef"
ORCHESTRATOR_TOKEN = "orchestrator-token-0123456789abcdef"


class Recorder(BaseHTTPRequestHandler):
    """Counts every request; ``/redirect`` answers 307 to the recorder's own ``/asap``."""

    hits: list[str] = []
    target = ""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.hits.append(self.path)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path.startswith("/redirect"):
            self.send_response(307)
            self.send_header("location", self.target)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(500)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A plain HTTP server on loopback; yields its URL and the paths it was asked for."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Recorder)
    Recorder.hits = []
    Recorder.target = f"http://127.0.0.1:{server.server_port}/elsewhere/asap"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", Recorder.hits
    finally:
        server.shutdown()
        server.server_close()


def orchestrate(url: str, plan: dict[str, Any], token: str) -> dict[str, Any]:
    body = frame(CALLER, "orchestrate", plan)
    return httpx.post(url + "/asap", json=body, headers=bearer(token), timeout=60).json()


def test_calls_go_as_the_orchestrator_and_redirects_are_not_followed(
    tmp_path: Path, recorder: tuple[str, list[str]]
) -> None:
    recorder_url, hits = recorder
    worker = start_uvicorn(
        tmp_path,
        "worker",
        {
            "ASAP_AGENT_ID": "urn:asap:agent:worker",
            "ASAP_AUTH_TOKENS": f"{ORCHESTRATOR}={ORCHESTRATOR_TOKEN}",  # not the caller's
        },
        app="asap.examples.flaky_worker:app",
    )
    worker.wait_ready()
    orchestrator = start_uvicorn(
        tmp_path,
        "orchestrator",
        {
            "ASAP_AGENT_ID": ORCHESTRATOR,
            "ASAP_SKILLS": "skills.orchestrator",
            "ASAP_AUTH_TOKENS": f"{CALLER}={CALLER_TOKEN}",
            "ASAP_CLIENT_TOKEN": ORCHESTRATOR_TOKEN,
            "ASAP_PEERS": f"worker={worker.url},redirector={recorder_url}/redirect",
            "ASAP_CLIENT_MAX_RETRIES": "1",
        },
    )
    try:
        orchestrator.wait_ready()
        # the worker itself refuses the caller's token: only the orchestrator's opens it
        direct = httpx.post(
            worker.url + "/asap", json=frame(CALLER, "work"), headers=bearer(CALLER_TOKEN)
        ).json()
        assert error_of(direct)[1]["error"] == "Invalid authentication token"

        steps = [{"id": "w", "peer": "worker", "skill": "work", "input": {"tag": "as-us"}}]
        reply = orchestrate(orchestrator.url, {"steps": steps}, CALLER_TOKEN)
        assert status_of(reply) == "completed", reply
        assert httpx.get(worker.url + "/_faults").json()["executions"] == {"as-us": 1}

        redirected = [{"id": "r", "peer": "redirector", "skill": "work", "input": {}}]
        reply = orchestrate(orchestrator.url, {"steps": redirected}, CALLER_TOKEN)
        payload = reply["result"]["envelope"]["payload"]
        assert payload["status"] == "failed"
        assert "307" in payload["result"]["steps"][0]["error"]
        assert hits == ["/redirect/asap"]  # asked once; the Location was never followed

        # an unauthenticated caller cannot make the orchestrator call anything
        refused = orchestrate(orchestrator.url, {"steps": steps}, "wrong-token-0123456789")
        assert error_of(refused)[1]["error"] == "Invalid authentication token"
        assert httpx.get(worker.url + "/_faults").json()["executions"] == {"as-us": 1}
    finally:
        orchestrator.stop()
        worker.stop()

"""The ``asap`` command as users run it: ``python -m asap ...`` subprocesses against real
agent processes (``uvicorn asap.server:app``), and ``asap serve`` itself as a real server.

Independent commands run concurrently (:func:`asap_all`): each one is a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from asap import __version__
from asap.cli import SEND_OPTIONS, SERVE_OPTIONS, main
from asap.process import AgentProcess, free_port
from tests.conftest import ROOT, TEST_AGENT_ID

pytestmark = pytest.mark.e2e

CLI_ID = "urn:asap:agent:cli"
OPS_ID = "urn:asap:agent:ops"
CLI_TOKEN = "cli-token-0123456789abcdef"
OPS_TOKEN = "ops-token-0123456789abcdef"


@dataclass
class Call:
    """One ``python -m asap`` command line, its extra environment and standard input."""

    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any ``ASAP_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASAP_")}
    return {**env, **(extra or {})}


def asap_all(*calls: Call, timeout: float = 30) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands concurrently; their results in order."""
    processes = [
        (
            call,
            subprocess.Popen(
                [sys.executable, "-m", "asap", *call.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=cli_env(call.env),
                cwd=ROOT,
            ),
        )
        for call in calls
    ]
    results = []
    for call, process in processes:
        try:
            out, err = process.communicate(call.stdin or "", timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def asap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return asap_all(Call(args, env or {}))[0]


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


# -- agents --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent that needs bearer tokens: ``cli`` and ``ops`` may call it, each as itself."""
    agent = AgentProcess.uvicorn(
        quiet=True,
        env={
            "ASAP_SKILLS": "skills.echo,tests.agent_skills",
            "ASAP_AGENT_ID": "urn:asap:agent:guarded",
            "ASAP_AUTH_TOKENS": f"{CLI_ID}={CLI_TOKEN},{OPS_ID}={OPS_TOKEN}",
            "ASAP_STORAGE_URL": "memory://",
        },
        log_path=tmp_path_factory.mktemp("auth-agent") / "agent.log",
        cwd=ROOT,
    )
    with agent:
        yield agent


class _NotAnAgent(BaseHTTPRequestHandler):
    """An HTTP server that is no healthy ASAP agent: unhealthy health, an HTML manifest."""

    def do_GET(self) -> None:
        if self.path == "/.well-known/asap/health":
            body = json.dumps(
                {
                    "status": "unhealthy",
                    "agent_id": "urn:asap:agent:sick",
                    "version": "1.0.0",
                    "asap_version": "0.1",
                    "uptime_seconds": 1.5,
                }
            ).encode()
            self.send_response(503)
            self.send_header("content-type", "application/json")
        else:
            body = b"<html>a web page</html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def not_an_agent() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotAnAgent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- send ----------------------------------------------------------------------------------


def test_send_input_as_json_text_as_file_and_from_stdin(
    test_agent: AgentProcess, tmp_path: Path
) -> None:
    data = tmp_path / "input.json"
    data.write_text('{"from": "file", "n": [1, 2]}')
    key = f"key-{time.time_ns()}"
    from_stdin = Call(("send", test_agent.url, "echo", "-", "--full", "--idempotency-key", key))
    text, from_file, first = asap_all(
        Call(("send", test_agent.url, "greet", '{"name": "ada", "times": 2}')),
        Call(("send", test_agent.url, "echo", "--retries", "2", f"@{data}")),  # INPUT last
        Call(from_stdin.args, stdin='{"from": "stdin"}'),
    )
    (again,) = asap_all(Call(from_stdin.args, stdin='{"from": "stdin"}'))
    for done in (text, from_file, first, again):
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
    assert json.loads(text.stdout) == {"text": "hello ada hello ada"}
    assert json.loads(from_file.stdout) == {"echoed": {"from": "file", "n": [1, 2]}}
    full = json.loads(first.stdout)
    assert full["status"] == "completed" and full["task_id"].startswith("task_")
    assert full["result"] == {"echoed": {"from": "stdin"}}
    assert json.loads(again.stdout) == full  # the same key: the first run's task, replayed


def test_a_failed_task_or_a_refused_request_exits_1(test_agent: AgentProcess) -> None:
    failed, unknown, invalid = asap_all(
        Call(("send", test_agent.url, "fail", '{"message": "kaput"}')),
        Call(("send", test_agent.url, "nope", "{}")),
        Call(("send", test_agent.url, "greet", '{"name": ""}')),
    )
    assert failed.returncode == 1
    assert json.loads(failed.stdout) == {"error": {"type": "ValueError", "message": "kaput"}}
    (line,) = failed.stderr.splitlines()
    assert line.startswith("asap send: task task_") and line.endswith("failed: ValueError: kaput")

    assert unknown.returncode == 1 and unknown.stdout == ""
    assert f"{test_agent.url} refused the request: -32013 Unknown skill: nope" in unknown.stderr
    assert '"available_skills"' in unknown.stderr and '"greet"' in unknown.stderr
    assert invalid.returncode == 1
    assert "-32602 Invalid params" in invalid.stderr and "string_too_short" in invalid.stderr
    for done in (failed, unknown, invalid):
        no_traceback(done)


def test_an_unreachable_agent_exits_3_at_once_with_one_line(not_an_agent: str) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    send, garbage = asap_all(
        Call(("send", down, "echo", "{}")),
        Call(("send", not_an_agent, "echo", "{}")),
    )
    assert time.monotonic() - started < 15
    assert send.returncode == 3 and send.stdout == ""
    assert send.stderr.splitlines() == [
        f"asap send: cannot reach {down}: Cannot connect to 127.0.0.1:{down.rsplit(':', 1)[1]}: "
        "Connection refused"
    ]
    assert garbage.returncode == 3 and garbage.stdout == ""
    (line,) = garbage.stderr.splitlines()
    assert line.startswith(f"asap send: {not_an_agent} did not answer as an ASAP agent: ")
    no_traceback(garbage)


def test_usage_errors_exit_2(test_agent: AgentProcess, tmp_path: Path) -> None:
    """Through real processes: INPUT that is no JSON object, a bad environment variable."""
    not_json, bad_env = asap_all(
        Call(("send", test_agent.url, "echo", "[1, 2]")),
        Call(("send", test_agent.url, "echo"), {"ASAP_CLIENT_TIMEOUT": "soon"}),
    )
    assert not_json.returncode == 2 and not_json.stdout == ""
    assert "asap send: error: INPUT must be a JSON object" in not_json.stderr
    assert bad_env.returncode == 2
    assert "asap send: error: ASAP_CLIENT_TIMEOUT='soon': not a number" in bad_env.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["send", "http://127.0.0.1:1", "echo", "{nope"], "INPUT is not valid JSON"),
        (["send", "http://127.0.0.1:1", "echo", "@/no/such/file.json"], "cannot read INPUT file"),
        (["send", "http://127.0.0.1:1"], "the following arguments are required: SKILL"),
        (
            ["send", "http://127.0.0.1:1", "echo", "--progress", "--idempotency-key", "k1"],
            "--idempotency-key cannot be used with --progress",
        ),
        (["send", "http://example.com", "echo"], "HTTPS is required for non-local hosts"),
        (["send", "ftp://x", "echo"], "base_url must be an http(s) URL"),
        (["send", "http://127.0.0.1:1", "echo", "--sender", "me"], "Agent ID must follow URN"),
        (["send", "http://127.0.0.1:1", "echo", "--retries", "0"], "must be at least 1"),
        (["health", "http://127.0.0.1:1", "--timeout", "-1"], "must be positive"),
        (["serve", "--workers", "0"], "argument --workers: must be at least 1"),
        (["serve", "--log-format", "xml"], "must be one of console, json"),
    ],
)
def test_usage_errors_in_process(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything is sent or served (so cheap enough to run in-process)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and expected in err, err


def test_environment_errors_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable, value, expected in [
        ("ASAP_PORT", "http", "ASAP_PORT='http': not an integer"),
        ("ASAP_WORKERS", "many", "ASAP_WORKERS='many': not an integer"),
        ("ASAP_AGENT_ID", "agent-7", "ASAP_AGENT_ID='agent-7': Agent ID must follow URN"),
        ("ASAP_LOG_LEVEL", "loud", "ASAP_LOG_LEVEL='loud': must be one of"),
    ]:
        monkeypatch.setenv(variable, value)
        with pytest.raises(SystemExit) as stopped:
            main(["serve"])
        monkeypatch.delenv(variable)
        assert stopped.value.code == 2
        assert expected in capsys.readouterr().err


def test_progress_lines_on_stderr_as_the_task_reports_them(test_agent: AgentProcess) -> None:
    command = ["send", test_agent.url, "progress", '{"steps": 3, "seconds": 0.4}', "--progress"]
    with subprocess.Popen(
        [sys.executable, "-m", "asap", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    ) as process:
        watchdog = threading.Timer(30, process.kill)
        watchdog.start()
        try:
            assert process.stderr is not None and process.stdout is not None
            started = process.stderr.readline()
            first = process.stderr.readline()
            running_after_first = process.poll() is None
            rest = process.stderr.read()
            out = process.stdout.read()
        finally:
            watchdog.cancel()
    assert started.startswith("task task_") and started.endswith(" started\n")
    assert first == "[ 33%] step 1 of 3\n"
    assert running_after_first  # shown while the task runs, not at the end
    assert rest.splitlines() == ["[ 67%] step 2 of 3", "[100%] step 3 of 3"]
    assert json.loads(out) == {"done": 3, "resumed_from": 0}
    assert process.returncode == 0


def test_progress_with_a_failing_or_unknown_skill(test_agent: AgentProcess) -> None:
    failed, unknown = asap_all(
        Call(("send", test_agent.url, "fail", '{"message": "late"}', "--progress")),
        Call(("send", test_agent.url, "nope", "--progress")),
    )
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["message"] == "late"
    assert failed.stderr.splitlines()[-1].endswith("failed: ValueError: late")
    assert unknown.returncode == 1 and "-32013 Unknown skill: nope" in unknown.stderr


def test_token_and_sender_from_the_environment(auth_agent: AgentProcess) -> None:
    """``ASAP_CLIENT_TOKEN`` and ``ASAP_SENDER`` are the defaults; the command line wins."""
    url = auth_agent.url
    env_token, missing, cli_wins, streamed = asap_all(
        Call(("send", url, "echo", '{"n": 1}'), {"ASAP_CLIENT_TOKEN": CLI_TOKEN}),
        Call(("send", url, "echo", '{"n": 2}')),
        Call(
            ("send", url, "echo", '{"n": 3}', "--token", OPS_TOKEN),
            {"ASAP_CLIENT_TOKEN": "wrong-token-0123456789abcdef", "ASAP_SENDER": OPS_ID},
        ),
        Call(
            ("send", url, "progress", '{"steps": 2}', "--progress"),
            {"ASAP_CLIENT_TOKEN": CLI_TOKEN},
        ),
    )
    assert env_token.returncode == 0, env_token.stderr
    assert json.loads(env_token.stdout) == {"echoed": {"n": 1}}
    assert missing.returncode == 1
    assert "refused the request: -32600 Invalid request (Authentication required)" in (
        missing.stderr
    )
    assert cli_wins.returncode == 0, cli_wins.stderr  # ops's token, as ops
    assert streamed.returncode == 0, streamed.stderr
    assert "[100%] step 2 of 2" in streamed.stderr
    log = Path(str(auth_agent.log_path)).read_text()
    assert CLI_TOKEN not in log and OPS_TOKEN not in log


# -- manifest, health ----------------------------------------------------------------------


def test_manifest_and_health(test_agent: AgentProcess, not_an_agent: str) -> None:
    manifest, health, sick = asap_all(
        Call(("manifest", test_agent.url)),
        Call(("health", test_agent.url)),
        Call(("health", not_an_agent)),
    )
    assert manifest.returncode == 0, manifest.stderr
    data = json.loads(manifest.stdout)
    assert data["id"] == TEST_AGENT_ID
    skills = {skill["id"]: skill for skill in data["capabilities"]["skills"]}
    assert skills["greet"]["input_schema"]["required"] == ["name"]
    assert health.returncode == 0, health.stderr
    status = json.loads(health.stdout)
    assert status["status"] == "healthy" and status["agent_id"] == TEST_AGENT_ID
    assert sick.returncode == 1
    assert json.loads(sick.stdout)["status"] == "unhealthy"
    assert sick.stderr.strip() == f"asap health: {not_an_agent} is unhealthy"


# -- serve ---------------------------------------------------------------------------------


def children_of(pid: int) -> list[str]:
    """Command lines of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(cmdline.replace(b"\0", b" ").decode())
    return found


def serve(tmp_path: Path, args: list[str], env: dict[str, str], port: int) -> AgentProcess:
    return AgentProcess(
        ["-m", "asap", "serve", *args],
        port,
        env=cli_env(env),
        log_path=tmp_path / f"serve-{port}.log",
        cwd=ROOT,
    )


def test_serve_with_options(tmp_path: Path) -> None:
    port = free_port()
    agent = serve(
        tmp_path,
        ["--port", str(port), "--storage-url", "memory://", "--skills", "skills.echo"],
        {"ASAP_LOG_FORMAT": "json"},
        port,
    )
    with agent:
        manifest = httpx.get(agent.url + "/.well-known/asap/manifest.json").json()
        done = asap("send", agent.url, "echo", '{"via": "serve"}')
        status = agent.stop()  # SIGTERM
    skills = [s["id"] for s in manifest["capabilities"]["skills"]]
    assert "echo" in skills and "greet" not in skills  # --skills skills.echo
    assert done.returncode == 0 and json.loads(done.stdout) == {"echoed": {"via": "serve"}}
    assert status == 0
    log = Path(str(agent.log_path)).read_text()
    assert "Traceback" not in log
    started = [json.loads(line) for line in log.splitlines() if '"asap.server.started"' in line]
    assert started and started[0]["storage"] == "memory://"


def test_serve_takes_its_defaults_from_the_environment(tmp_path: Path) -> None:
    """``ASAP_PORT``, ``ASAP_WORKERS``, ... are the defaults; the command line wins."""
    port = free_port()
    agent = serve(
        tmp_path,
        ["--agent-id", "urn:asap:agent:from-cli"],
        {
            "ASAP_PORT": str(port),
            "ASAP_WORKERS": "2",
            "ASAP_SKILLS": "skills.echo",
            "ASAP_STORAGE_URL": "memory://",
            "ASAP_AGENT_ID": "urn:asap:agent:from-env",
            "ASAP_AGENT_NAME": "From Env",
        },
        port,
    )
    with agent:
        manifest = httpx.get(agent.url + "/.well-known/asap/manifest.json").json()
        assert agent.pid is not None
        workers = [c for c in children_of(agent.pid) if "multiprocessing.spawn" in c]
        status = agent.stop()
    assert manifest["id"] == "urn:asap:agent:from-cli"
    assert manifest["name"] == "From Env"
    assert len(workers) == 2, workers
    assert status == 0


def test_serve_refuses_a_bad_skill_module_before_starting() -> None:
    done = asap("serve", "--port", str(free_port()), "--skills", "no_such_module")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "asap serve: cannot import skill module 'no_such_module': No module named 'no_such_module'"
    )


# -- the command itself --------------------------------------------------------------------


def test_the_console_script_is_the_same_command() -> None:
    script = Path(sys.executable).parent / "asap"
    if not script.exists():
        pytest.skip(f"{script} not installed")
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, env=cli_env(), timeout=30
    )
    assert done.returncode == 0 and done.stdout == f"asap {__version__}\n"


def test_every_option_and_variable_is_documented() -> None:
    docs = (ROOT / "docs" / "cli.md").read_text()
    for option in (*SERVE_OPTIONS, *SEND_OPTIONS):
        assert f"`{option.flag}`" in docs and f"`{option.variable}`" in docs, option.flag


def test_serve_with_workers_counts_metrics_of_every_worker(tmp_path: Path) -> None:
    """`asap serve --workers 2` sets up prometheus-client's multiprocess folder itself, so a
    scrape answered by either worker counts the requests both served."""
    port = free_port()
    env = {"ASAP_RATE_LIMIT": "off", "PROMETHEUS_MULTIPROC_DIR": ""}
    args = ["--port", str(port), "--workers", "2", "--storage-url", "memory://"]
    agent = serve(tmp_path, [*args, "--skills", "skills.echo"], env, port)
    frame = {
        "jsonrpc": "2.0",
        "method": "asap.send",
        "params": {
            "envelope": {
                "asap_version": "0.1",
                "sender": "urn:asap:agent:cli-test",
                "recipient": "urn:asap:agent:default-server",
                "payload_type": "task.request",
                "payload": {"conversation_id": "c", "skill_id": "echo", "input": {}},
            }
        },
        "id": "1",
    }
    with agent:
        for _ in range(20):  # a new connection each: the kernel spreads them over the workers
            assert httpx.post(agent.url + "/asap", json=frame).status_code == 200
        totals = set()
        for _ in range(6):
            text = httpx.get(agent.url + "/asap/metrics").text
            totals.add(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("asap_requests_total{")
                )
            )
    assert totals == {20.0}

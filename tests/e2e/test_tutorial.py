"""The tutorial, end to end, against real agent processes on loopback ports.

``docs/tutorials/multi-agent-orchestration.md`` is the tutorial users follow (identical to the
seed in ``shared/seed``); its Step 3 code runs here verbatim, and Steps 1, 2 and 5 as the
commands it shows.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import httpx
import pytest

from asap.process import AgentProcess, free_port
from tests.conftest import ROOT, SHARED

pytestmark = pytest.mark.e2e

TUTORIAL = ROOT / "docs" / "tutorials" / "multi-agent-orchestration.md"


def section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_tutorial_is_the_seed() -> None:
    seed = SHARED / "seed" / "multi-agent-orchestration.md"
    if not seed.exists():
        pytest.skip(f"{seed} not present")
    assert TUTORIAL.read_text() == seed.read_text()


def test_step3_code_runs_verbatim(echo_agents: list[AgentProcess], tmp_path: Path) -> None:
    """The Step 3 blocks, concatenated, form the script the tutorial builds; run it."""
    code = "\n".join(python_blocks(section(TUTORIAL.read_text(), "Step 3: Build an Orchestrator")))
    a, b = echo_agents
    code = code.replace("http://127.0.0.1:8001", a.url).replace("http://127.0.0.1:8002", b.url)
    script = tmp_path / "orchestrator.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    result_a = next(line for line in done.stdout.splitlines() if line.startswith("Result A:"))
    result_b = next(line for line in done.stdout.splitlines() if line.startswith("Result B:"))
    assert "status=<TaskStatus.COMPLETED: 'completed'>" in result_a
    assert "'echoed': {'step': 'a', 'message': 'task for worker A'}" in result_a
    assert "'echoed': {'step': 'b', 'message': 'task for worker B'}" in result_b


def test_step3_shares_conversation_and_trace(
    echo_agents: list[AgentProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    code = "\n".join(python_blocks(section(TUTORIAL.read_text(), "Step 3: Build an Orchestrator")))
    module = types.ModuleType("tutorial_step3")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, str(TUTORIAL), "exec"), module.__dict__)
    namespace = module.__dict__
    envelope = namespace["build_task_envelope"](
        recipient_id="urn:asap:agent:worker-a",
        skill_id="echo",
        input_payload={"x": 1},
        conversation_id="conv-shared",
        trace_id="trace-shared",
    )
    assert envelope.payload.conversation_id == "conv-shared"
    assert envelope.trace_id == "trace-shared"
    state = asyncio.run(namespace["run_orchestration"](echo_agents[0].url, echo_agents[1].url))
    assert state.completed
    assert state.result_a.result == {"echoed": {"step": "a", "message": "task for worker A"}}


def test_step2_orchestration_cli_logs_the_events(echo_agents: list[AgentProcess]) -> None:
    a, b = echo_agents
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asap.examples.orchestration",
            "--worker-a-url",
            a.url,
            "--worker-b-url",
            b.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ASAP_LOG_FORMAT": "json"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    events = [line for line in done.stdout.splitlines() if '"event"' in line]
    names = [re.search(r'"event":"([^"]+)"', line).group(1) for line in events]  # type: ignore[union-attr]
    order = [n for n in names if n.startswith("asap.orchestration.")]
    assert order[:3] == [
        "asap.orchestration.sent_to_a",
        "asap.orchestration.sent_to_b",
        "asap.orchestration.complete",
    ]
    traces = {re.search(r'"trace_id":"([^"]+)"', e).group(1) for e in events if "trace_id" in e}  # type: ignore[union-attr]
    assert len(traces) == 1  # one trace id across the workflow


def test_step2_cli_exits_1_when_a_worker_is_down(echo_agents: list[AgentProcess]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asap.examples.orchestration",
            "--worker-a-url",
            echo_agents[0].url,
            "--worker-b-url",
            f"http://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "asap.orchestration.sent_to_a" in done.stdout
    assert "asap.orchestration.failed" in done.stdout


def test_step1_echo_agent_flags(echo_agents: list[AgentProcess]) -> None:
    manifest = httpx.get(echo_agents[1].url + "/.well-known/asap/manifest.json").json()
    assert manifest["id"] == "urn:asap:agent:worker-b"
    assert manifest["name"] == "Echo Agent" and manifest["version"] == "0.3.0"
    assert manifest["endpoints"]["asap"] == echo_agents[1].url + "/asap"


def test_uvicorn_asap_server_app_serves_shipped_skills(tmp_path: Path) -> None:
    port = free_port()
    with AgentProcess(
        ["-m", "uvicorn", "asap.server:app", "--port", str(port)],
        port,
        log_path=tmp_path / "server.log",
    ) as agent:
        manifest = httpx.get(agent.url + "/.well-known/asap/manifest.json").json()
    assert manifest["id"] == "urn:asap:agent:default-server"
    assert [s["id"] for s in manifest["capabilities"]["skills"]] == ["echo", "orchestrate"]


def test_duplicate_skill_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    port = free_port()
    agent = AgentProcess(
        ["-m", "uvicorn", "asap.server:app", "--port", str(port)],
        port,
        env={"ASAP_SKILLS": "skills.echo,tests.dup_skills"},
        log_path=tmp_path / "dup.log",
    )
    with pytest.raises(RuntimeError, match="before becoming ready"):
        agent.start(timeout=30)
    assert "Duplicate skill id 'echo'" in (tmp_path / "dup.log").read_text()


def test_asap_demo_runs_the_whole_tutorial() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asap.cli", "demo"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "asap.orchestration.complete" in done.stdout
    assert "completed=True" in done.stdout

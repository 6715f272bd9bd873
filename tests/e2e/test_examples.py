"""The shipped examples run end to end and log what they promise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def run_example(module: str, *args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "ASAP_LOG_FORMAT": "json"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_multi_step_workflow_runs_three_skills_on_three_agents() -> None:
    lines = run_example("asap.examples.multi_step_workflow", "--topic", "weather")
    steps = [line for line in lines if line["event"] == "asap.multi_step_workflow.step"]
    assert [(s["step"], s["peer"], s["status"]) for s in steps] == [
        ("fetch", "fetcher", "completed"),
        ("transform", "transformer", "completed"),
        ("summarize", "summarizer", "completed"),
    ]
    done = next(line for line in lines if line["event"] == "asap.multi_step_workflow.demo_complete")
    assert done["completed"] is True
    assert done["summary"]["count"] == 2 and done["summary"]["topic"] == "weather"


def test_error_recovery_shows_retry_breaker_and_fallback() -> None:
    lines = run_example("asap.examples.error_recovery")
    events = {line["event"]: line for line in lines}
    retry = events["asap.error_recovery.retry"]
    assert retry["injected_failures"] == 2 and retry["executions"] == 1
    assert events["asap.error_recovery.retry_demo_complete"]["ran_once"] is True
    assert "Circuit open" in events["asap.error_recovery.circuit_open"]["error"]
    assert events["asap.error_recovery.circuit_closed"]["status"] == "completed"
    order = [line["event"] for line in lines]
    assert (
        order.index("asap.client.circuit_opened")
        < order.index("asap.client.circuit_half_open")
        < order.index("asap.client.circuit_closed")
    )
    assert events["asap.error_recovery.fallback"]["served_by"] == "backup"
    assert "asap.error_recovery.fallback_demo_complete" in events


def test_long_running_crashes_then_resumes_from_its_snapshot() -> None:
    lines = run_example("asap.examples.long_running", "--num-steps", "5", "--crash-after", "2")
    events = [line["event"] for line in lines]
    assert "asap.long_running.crash_simulated" in events
    resuming = next(line for line in lines if line["event"] == "asap.long_running.resuming")
    assert resuming["from_step"] == 2
    steps = [line["step"] for line in lines if line["event"] == "asap.long_running.checkpoint"]
    assert steps == [1, 2, 3, 4, 5]  # nothing done twice
    done = next(line for line in lines if line["event"] == "asap.long_running.demo_complete")
    assert done["status"] == "completed"
    assert done["result"] == {"steps": 5, "resumed_from": 2}


def test_state_migration_moves_a_snapshot_between_agents() -> None:
    lines = run_example("asap.examples.state_migration")
    events = [line["event"] for line in lines]
    assert events.index("asap.state_migration.saved_on_source") < events.index(
        "asap.state_migration.moved"
    )
    done = next(line for line in lines if line["event"] == "asap.state_migration.demo_complete")
    assert done["data"] == {"step": 3}


def test_the_orchestration_refuses_plain_http_to_other_hosts_without_a_traceback() -> None:
    """Inside a compose network the workers are http://worker:8000: the script says why it
    cannot go on (exit 1, `asap.orchestration.failed`) unless --allow-http is given."""
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asap.examples.orchestration",
            "--worker-a-url",
            "http://worker-a.invalid:8000",
            "--worker-b-url",
            "http://worker-b.invalid:8000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert "asap.orchestration.failed" in output and "HTTPS is required" in output
    assert "Traceback" not in output

"""Logging (issue 2.7): one format for our events and uvicorn's, context on every line."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from asap.models.envelope import Envelope
from asap.models.payloads import TaskRequest
from asap.observability import logging as asap_logging
from asap.process import AgentProcess, free_port
from asap.transport.client import ASAPClient
from tests.conftest import TEST_AGENT_ID

pytestmark = pytest.mark.anyio


def read_json_lines(agent: AgentProcess, until: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every line the agent logged, once a line containing ``until`` has appeared."""
    assert agent.log_path is not None
    deadline = time.monotonic() + timeout
    while True:
        text = agent.log_path.read_text()
        if until in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_request_lines_carry_trace_correlation_skill_and_task(
    test_agent: AgentProcess,
) -> None:
    envelope = Envelope(
        asap_version="0.1",
        sender="urn:asap:agent:log-test",
        recipient=TEST_AGENT_ID,
        payload_type="task.request",
        payload=TaskRequest(conversation_id="c", skill_id="sleep", input={"seconds": 0}),
        trace_id="trace-logging-test",
    )
    async with ASAPClient(test_agent.url) as client:
        reply = await client.send(envelope)
    lines = read_json_lines(test_agent, reply.payload.task_id)  # every line parses as JSON
    ours = [line for line in lines if line.get("correlation_id") == envelope.id]
    events = {line["event"] for line in ours}
    assert {"test.sleeping", "asap.request.processed"} <= events
    for line in ours:
        assert line["trace_id"] == "trace-logging-test"
        assert line["skill_id"] == "sleep"
        assert line["task_id"] == reply.payload.task_id
        assert line["service"] == "asap" and line["level"] and line["timestamp"].endswith("Z")


def test_uvicorn_lines_use_the_same_json_renderer(test_agent: AgentProcess) -> None:
    lines = read_json_lines(test_agent, "Application startup complete")
    startup = [line for line in lines if line.get("logger") == "uvicorn.error"]
    assert any("Application startup complete" in line["event"] for line in startup)
    assert any(line["event"] == "asap.server.started" for line in lines)


def test_console_and_json_output_bind_context_and_redact_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        asap_logging.configure_logging("json", "INFO", force=True)
        asap_logging.bind_context(trace_id="t-1", correlation_id="c-1")
        asap_logging.get_logger("test").info("demo.event", authorization="Bearer s3cret", n=1)
        asap_logging.clear_context()
        asap_logging.get_logger("test").info("demo.after")
        first, second = (json.loads(x) for x in capsys.readouterr().out.splitlines())
        assert first["event"] == "demo.event" and first["n"] == 1
        assert first["trace_id"] == "t-1" and first["correlation_id"] == "c-1"
        assert first["authorization"] == "***"
        assert "trace_id" not in second

        async def in_a_task() -> None:  # binds for itself, not for the code that started it
            asap_logging.bind_context(task_id="t-2")
            asap_logging.get_logger("test").info("demo.task")

        asap_logging.bind_context(trace_id="t-1")
        asyncio.run(in_a_task())
        asap_logging.get_logger("test").info("demo.caller")
        structlog.contextvars.bind_contextvars(user_key="u")  # structlog's own API works too
        asap_logging.get_logger("test").info("demo.structlog", trace_id="given")
        asap_logging.clear_context()
        asap_logging.get_logger("test").info("demo.cleared")
        task_line, caller, own, cleared = (
            json.loads(x) for x in capsys.readouterr().out.splitlines()
        )
        assert (task_line["trace_id"], task_line["task_id"]) == ("t-1", "t-2")
        assert caller["trace_id"] == "t-1" and "task_id" not in caller
        assert (own["user_key"], own["trace_id"]) == ("u", "given")  # the line's value wins
        assert "user_key" not in cleared and "trace_id" not in cleared

        asap_logging.configure_logging("console", "INFO", force=True)
        asap_logging.get_logger("test").info("demo.console", token="abc")
        out = capsys.readouterr().out
        assert "demo.console" in out and "abc" not in out and "token=***" in out
    finally:
        asap_logging.configure_logging("console", "WARNING", force=True)


async def test_lines_of_one_loop_step_are_written_together_and_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def events() -> list[str]:
        return [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]

    try:
        asap_logging.configure_logging("json", "INFO", force=True)
        log = asap_logging.get_logger("test")
        log.info("first")
        logging.getLogger("uvicorn.access").info("access line")
        assert events() == []  # waiting for the end of this step
        log.warning("urgent")  # written at once, after what waits
        assert events() == ["first", "access line", "urgent"]
        log.info("second")
        logging.getLogger("uvicorn.error").info("lifecycle")  # uvicorn's own: at once
        assert events() == ["second", "lifecycle"]
        log.info("third")
        await asyncio.sleep(0)  # the step ends
        assert events() == ["third"]
        log.info("fourth")
        asap_logging.flush_logs()
        assert events() == ["fourth"]
    finally:
        asap_logging.configure_logging("console", "WARNING", force=True)


def test_an_agent_stopped_by_sigterm_has_written_every_line(tmp_path: Path) -> None:
    # uvicorn raises SIGTERM again once it has stopped, which ends the process without exit
    # handlers: nothing may be left waiting in the buffer by then.
    port = free_port()
    agent = AgentProcess(
        ["-m", "uvicorn", "asap.server:app", "--host", "127.0.0.1", "--port", str(port)],
        port,
        env={"ASAP_LOG_FORMAT": "json", "ASAP_LOG_LEVEL": "INFO"},
        log_path=tmp_path / "agent.log",
        cwd=tmp_path,
    )
    with agent:
        with httpx.Client() as client:
            assert client.get(f"{agent.url}/health").status_code == 200
    lines = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert any("GET /health" in event for event in events)
    assert "asap.server.draining" in events
    assert events[-1].startswith("Finished server process")


def test_uvicorn_no_access_log_is_obeyed(tmp_path: Path) -> None:
    port = free_port()
    argv = ["-m", "uvicorn", "asap.server:app", "--port", str(port), "--no-access-log"]
    agent = AgentProcess(argv, port, env={"ASAP_LOG_LEVEL": "INFO"}, log_path=tmp_path / "a.log")
    with agent:
        with httpx.Client() as client:
            assert client.get(f"{agent.url}/health").status_code == 200
            assert client.get(f"{agent.url}/ready").status_code == 200
    text = (tmp_path / "a.log").read_text()
    assert "Application startup complete" in text and "asap.server.started" in text
    assert "GET /" not in text


def test_access_lines_reach_whatever_is_added_on_their_way(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # uvicorn's access lines skip the logging module while ours is their only destination;
    # a handler or filter someone adds still sees (or stops) them, and the line is the same.
    access = logging.getLogger("uvicorn.access")
    args = ("127.0.0.1:5000", "POST", "/asap", "1.1", 200)
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    records: list[logging.LogRecord] = []
    make_record = logging.getLogRecordFactory()

    def counted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        records.append(make_record(*args, **kwargs))
        return records[-1]

    logging.setLogRecordFactory(counted)
    try:
        asap_logging.configure_logging("json", "INFO", force=True)
        access.info('%s - "%s %s HTTP/%s" %d', *args)  # the short way
        assert not records
        logging.Logger.info(access, '%s - "%s %s HTTP/%s" %d', *args)  # the standard one
        assert len(records) == 1
        access.info("%d placeholders, one argument %s", 2)  # reported on stderr, no raise
        asap_logging.flush_logs()
        out, err = capsys.readouterr()
        assert "not enough arguments" in err
        short, standard = (json.loads(x) for x in out.splitlines())
        assert short.pop("timestamp") and standard.pop("timestamp")
        assert (
            short
            == standard
            == {
                "event": '127.0.0.1:5000 - "POST /asap HTTP/1.1" 200',
                "logger": "uvicorn.access",
                "level": "info",
                "service": "asap",
            }
        )
        extra = Collect()
        logging.getLogger().addHandler(extra)
        access.info("with a second handler %d", 1)
        logging.getLogger().removeHandler(extra)
        access.addFilter(lambda record: "secret" not in record.getMessage())
        access.info("a secret path")
        access.info("a public path")
        asap_logging.flush_logs()
        events = [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines()]
        assert seen == ["with a second handler 1"]
        assert events == ["with a second handler 1", "a public path"]
        access.disabled = True  # as logging.config does to loggers it does not name
        access.info("a disabled logger's line")
        access.disabled = False
        logging.getLogger("uvicorn").propagate = False  # its parent keeps its lines
        access.info("a line stopped on its way")
        asap_logging.flush_logs()
        assert capsys.readouterr().out == ""
    finally:
        logging.setLogRecordFactory(make_record)
        logging.getLogger("uvicorn").propagate = True
        access.disabled = False
        access.filters.clear()
        asap_logging.configure_logging("console", "WARNING", force=True)


@pytest.mark.parametrize(
    "event",
    [
        {"event": "asap.request.processed", "level": "info", "timestamp": "T", "n": 1},
        {"event": "x" * 40, "level": "warning", "logger": "uvicorn.error", "service": "asap"},
        {"event": "short", "level": "critical", "logger_name": "l", "logger": "k"},
        {"event": "values", "s": "plain", "q": "a b", "e": "a=b", "t": "tab\there", "n": None},
        {"event": "more", "f": 0.1, "b": True, "d": {"k": [1, "two"]}, "u": "é", "r": "it's"},
        {"event": 42, "level": "info"},
        {"level": "debug", "z": 1, "a": 2},
        {"event": "", "timestamp": "", "level": "info"},
        {"event": "failed", "level": "error", "exception": "Traceback (most recent...)"},
        {"event": "stack", "level": "info", "stack": "Stack (most recent call last)"},
    ],
)
def test_console_lines_read_as_structlogs_console_renderer(event: dict[str, Any]) -> None:
    ours = asap_logging._ConsoleRenderer()
    theirs = structlog.dev.ConsoleRenderer(colors=False)
    assert ours(None, "info", dict(event)) == theirs(None, "info", dict(event))


def test_sanitize_for_logging_redacts_nested_secret_fields() -> None:
    data = {"headers": {"Authorization": "Bearer x"}, "items": [{"api_key": "k", "ok": 1}]}
    assert asap_logging.sanitize_for_logging(data) == {
        "headers": {"Authorization": "***"},
        "items": [{"api_key": "***", "ok": 1}],
    }


def test_bad_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="ASAP_LOG_FORMAT"):
        asap_logging.configure_logging("xml", force=True)
    with pytest.raises(ValueError, match="ASAP_LOG_LEVEL"):
        asap_logging.configure_logging("json", "LOUD", force=True)


def test_a_json_log_event_is_one_line_whatever_a_caller_sent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """U+2028, U+2029 and NEL are valid unescaped in JSON but split lines for many readers."""
    try:
        asap_logging.configure_logging("json", "INFO", force=True)
        hostile = "a\u2028b\u2029c\x85d\ne\rf"
        asap_logging.get_logger("test").info("demo.hostile", skill=hostile)
        lines = capsys.readouterr().out.splitlines()  # splits on all of them
        assert len(lines) == 1
        assert json.loads(lines[0])["skill"] == hostile
    finally:
        asap_logging.configure_logging("console", "WARNING", force=True)


def test_a_logger_follows_every_later_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    """Loggers are made at import (``_log = get_logger(...)``), before the server reads its
    settings: each line goes out in the format and at the level configured last."""
    try:
        asap_logging.configure_logging("console", "WARNING", force=True)
        log = asap_logging.get_logger("test", part="early")
        log.info("demo.filtered")
        log.warning("demo.console")
        asap_logging.flush_logs()
        out = capsys.readouterr().out
        assert "demo.filtered" not in out and "demo.console" in out and "part=early" in out
        assert copy.copy(log).info == log.info  # a copy (or a pickle) finds its methods

        asap_logging.configure_logging("json", "INFO", force=True)
        log.info("demo.json")
        asap_logging.flush_logs()
        line = json.loads(capsys.readouterr().out)
        assert (line["event"], line["level"], line["part"]) == ("demo.json", "info", "early")

        asap_logging.configure_logging("json", "ERROR", force=True)
        log.warning("demo.below")
        asap_logging.flush_logs()
        assert capsys.readouterr().out == ""
    finally:
        asap_logging.configure_logging("console", "WARNING", force=True)

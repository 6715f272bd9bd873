"""The ``asap`` command, also ``python -m asap`` (see ``docs/cli.md``).

- ``asap serve``: run an agent (uvicorn ``asap.server:app``, one or more worker processes);
- ``asap send URL SKILL [INPUT]``: run one task on an agent and print its result;
- ``asap manifest URL``, ``asap health URL``: what an agent says about itself;
- ``asap demo``: two echo workers and the tutorial's orchestration.

Every option that has an environment variable takes it as its default (``--port`` is
``ASAP_PORT``); the command line wins. Options of ``serve`` that are
:class:`asap.settings.Settings` fields reach the app through the environment, so the logic
stays in the library.

Exit codes: 0 success; 1 the agent said no (the task failed, the request was refused with a
JSON-RPC error, the agent is unhealthy); 2 usage error; 3 the agent could not be reached, did
not answer in time, or did not answer as an ASAP agent.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

import httpx

from asap.errors import (
    ASAPConnectionError,
    ASAPError,
    ASAPTimeoutError,
    ConfigurationError,
    MalformedEnvelopeError,
    ProtocolCorrelationError,
    RemoteRPCError,
)
from asap.models.envelope import Envelope, validate_agent_urn
from asap.models.ids import generate_id
from asap.models.payloads import TaskRequest, TaskRequestConfig, TaskResponse

__all__ = [
    "DEFAULT_SENDER",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_FAILED = 1
"""The agent answered no: task failed or cancelled, request refused, agent unhealthy."""
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
"""No usable answer: connection refused, timeout, HTTP error, not the ASAP protocol."""

DEFAULT_SENDER = "urn:asap:agent:cli"
ASAP_VERSION = "0.1"
TRANSPORT_VERSIONS = "2.2, 2.1"


class UsageError(Exception):
    """A bad command line or input: reported with the command's usage, exit code 2."""


# -- options with environment defaults ---------------------------------------------------


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return convert


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _choice(*choices: str, upper: bool = False) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return convert


def _urn(text: str) -> str:
    try:
        return validate_agent_urn(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _text(text: str) -> str:
    return text


@dataclass(frozen=True)
class EnvOption:
    """An option whose default is the environment variable ``variable``."""

    flag: str
    variable: str
    help: str
    convert: Callable[[str], Any] = _text
    default: Any = None
    shown: str | None = None
    """The default as the help shows it, when the value is decided elsewhere (Settings)."""
    setting: bool = False
    """A :class:`Settings` field: ``serve`` passes it to the app through the environment."""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        shown = self.shown if self.shown is not None else self.default
        suffix = f"env {self.variable}" + (f"; default {shown}" if shown is not None else "")
        parser.add_argument(
            self.flag,
            dest=self.dest,
            type=self.convert,
            default=None,
            metavar=self.metavar,
            help=f"{self.help} [{suffix}]",
        )


SERVE_OPTIONS = (
    EnvOption("--host", "ASAP_HOST", "address to bind", default="127.0.0.1"),
    EnvOption("--port", "ASAP_PORT", "port to bind", _integer(1, 65535), 8000),
    EnvOption(
        "--workers",
        "ASAP_WORKERS",
        "worker processes (they share state through the storage)",
        _integer(1),
        1,
        metavar="N",
    ),
    EnvOption(
        "--skills",
        "ASAP_SKILLS",
        "comma-separated modules or packages with @skill functions",
        shown="skills",
        setting=True,
        metavar="MODULES",
    ),
    EnvOption(
        "--storage-url",
        "ASAP_STORAGE_URL",
        "memory://, sqlite:///path or redis://host:port/db",
        shown="sqlite:///asap-state.db",
        setting=True,
        metavar="URL",
    ),
    EnvOption(
        "--agent-id",
        "ASAP_AGENT_ID",
        "the agent's URN",
        _urn,
        shown="urn:asap:agent:default-server",
        setting=True,
        metavar="URN",
    ),
    EnvOption(
        "--agent-name",
        "ASAP_AGENT_NAME",
        "the name in the manifest",
        shown="ASAP Agent",
        setting=True,
        metavar="NAME",
    ),
    EnvOption(
        "--public-url",
        "ASAP_PUBLIC_URL",
        "root URL published in the manifest",
        shown="from each request's Host",
        setting=True,
        metavar="URL",
    ),
    EnvOption(
        "--log-format",
        "ASAP_LOG_FORMAT",
        "console or json",
        _choice("console", "json"),
        shown="console",
        setting=True,
        metavar="FORMAT",
    ),
    EnvOption(
        "--log-level",
        "ASAP_LOG_LEVEL",
        "DEBUG, INFO, WARNING, ERROR or CRITICAL",
        _choice("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", upper=True),
        shown="INFO",
        setting=True,
        metavar="LEVEL",
    ),
)
"""Options of ``asap serve``."""

CLIENT_OPTIONS = (
    EnvOption(
        "--timeout",
        "ASAP_CLIENT_TIMEOUT",
        "seconds to wait for the answer, retries included",
        _positive_number,
        60.0,
        shown="60",
        metavar="SECONDS",
    ),
)
"""Options of ``asap send``, ``asap manifest`` and ``asap health``."""

SEND_OPTIONS = (
    *CLIENT_OPTIONS,
    EnvOption(
        "--sender",
        "ASAP_SENDER",
        "the envelope's sender; with authentication, the token's agent",
        _urn,
        DEFAULT_SENDER,
        metavar="URN",
    ),
    EnvOption(
        "--token",
        "ASAP_CLIENT_TOKEN",
        "bearer token to present",
        shown="none",
        metavar="TOKEN",
    ),
    EnvOption(
        "--retries",
        "ASAP_CLIENT_MAX_RETRIES",
        "attempts in all, with the same idempotency key (1: no retry)",
        _integer(1),
        3,
        metavar="N",
    ),
)
"""Options of ``asap send``."""


def _resolve_env(
    args: argparse.Namespace, parser: argparse.ArgumentParser, environ: dict[str, str]
) -> None:
    """Fill the options not given on the command line from their environment variables."""
    for option in args.env_options:
        if getattr(args, option.dest) is not None:
            continue
        raw = environ.get(option.variable)
        if raw is None or not raw.strip():
            setattr(args, option.dest, option.default)
            continue
        try:
            value = option.convert(raw.strip())
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"{option.variable}={raw!r}: {exc}")
        setattr(args, option.dest, value)


# -- serve ---------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from asap.settings import Settings
    from asap.transport.app import create_app

    for option in args.env_options:
        value = getattr(args, option.dest)
        if option.setting and value is not None:
            os.environ[option.variable] = str(value)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # skills importable from here, as with `uvicorn`
    if args.workers > 1:
        _metrics_folder()
    try:
        # Build the app once here: a bad setting or skill module fails now, in one line,
        # rather than in every worker with a traceback each. This also sets up logging, so
        # that uvicorn's supervisor logs as the workers do.
        create_app(Settings.from_env())
    except (ConfigurationError, ValueError) as exc:
        print(f"asap serve: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    # After a graceful stop uvicorn (one process) raises the SIGTERM it caught again, to die
    # of it; handled here, it ends the command with 0, as the multi-worker supervisor does.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(
        "asap.server:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
    )
    return EXIT_OK


def _metrics_folder() -> None:
    """Several worker processes serve one port: their metrics go to files in one folder
    (prometheus-client's multiprocess mode, docs/metrics.md), so any worker's scrape counts
    them all. An operator's ``PROMETHEUS_MULTIPROC_DIR`` is emptied of a previous run's
    files; without one, a temporary folder is used and removed at exit."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".db"):
                os.remove(os.path.join(folder, name))
        return
    folder = tempfile.mkdtemp(prefix="asap-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    atexit.register(shutil.rmtree, folder, True)


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_OK)


def _demo(args: argparse.Namespace) -> int:
    from asap.examples.run_demo import main as demo

    return demo([])


# -- client commands: shared plumbing ------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The end of a task, from a ``task.response`` or the final chunk of a stream."""

    task_id: str
    status: str
    result: Any


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _client_logging() -> None:
    """Library logs (retries, breakers) at warnings only; :func:`_run_client` sends them to
    stderr, so stdout carries nothing but the result."""
    from asap.observability.logging import configure_logging

    json_logs = os.environ.get("ASAP_LOG_FORMAT", "").strip().lower() == "json"
    configure_logging("json" if json_logs else "console", "WARNING")


def _is_protocol_failure(exc: RemoteRPCError) -> bool:
    """A :class:`RemoteRPCError` the client made up because the answer was not a JSON-RPC
    reply (unreadable JSON, no envelope), as opposed to an error the agent sent."""
    return exc.data is None and exc.json_rpc_code in (-32700, -32600, -32603)


def _refusal(exc: RemoteRPCError) -> str:
    """An agent's JSON-RPC error reply as one or two lines."""
    text = f"{exc.json_rpc_code} {exc.message}"
    data = exc.data if isinstance(exc.data, dict) else {}
    reason = data.get("error")
    if isinstance(reason, str) and reason and reason != exc.message:
        text += f" ({reason})"
    details = exc.details or {
        k: v for k, v in data.items() if k in ("validation_errors", "status_code", "retry_after")
    }
    if details:
        text += "\n" + _one_line(json.dumps(details, ensure_ascii=False), 2000)
    return text


def _run_client(
    command: str,
    url: str,
    timeout: float,
    job: Callable[[TextIO, TextIO], Coroutine[Any, Any, int]],
) -> int:
    """Run ``job(stdout, stderr)``; map errors to exit codes and one-line messages."""
    _client_logging()
    out, err = sys.stdout, sys.stderr
    prefix = f"asap {command}:"
    try:
        with contextlib.redirect_stdout(err):
            return asyncio.run(job(out, err))
    except RemoteRPCError as exc:
        if _is_protocol_failure(exc):
            print(
                f"{prefix} {url} did not answer as an ASAP agent: {_one_line(exc.message)}",
                file=err,
            )
            return EXIT_UNREACHABLE
        print(f"{prefix} {url} refused the request: {_refusal(exc)}", file=err)
        return EXIT_FAILED
    except ASAPTimeoutError as exc:
        print(
            f"{prefix} no answer from {url} within {timeout:g} s ({_one_line(exc.message)})",
            file=err,
        )
        return EXIT_UNREACHABLE
    except ASAPConnectionError as exc:
        print(f"{prefix} cannot reach {url}: {_one_line(_connection_reason(exc))}", file=err)
        return EXIT_UNREACHABLE
    except (MalformedEnvelopeError, ProtocolCorrelationError) as exc:
        print(f"{prefix} {url} did not answer as an ASAP agent: {_one_line(exc.message)}", file=err)
        return EXIT_UNREACHABLE
    except ASAPError as exc:
        print(f"{prefix} {url}: {_one_line(exc.message)}", file=err)
        return EXIT_UNREACHABLE


def _connection_reason(exc: ASAPConnectionError) -> str:
    """The part of the client's message after the URL it repeats."""
    status = exc.details.get("status_code")
    if isinstance(status, int):
        body = exc.details.get("body") or exc.details.get("location") or ""
        return f"HTTP {status}" + (f": {body}" if body else "")
    message = exc.message
    head, sep, tail = message.partition(": ")
    return tail if sep and head.startswith("Connection error to") else message


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout": args.timeout, "require_https": not args.allow_http}


def _check_url(args: argparse.Namespace) -> None:
    from asap.transport.client import ASAPClient

    try:
        ASAPClient(args.url, **_client_kwargs(args))
    except ValueError as exc:
        message = str(exc)
        if "require_https" in message:
            message = f"HTTPS is required for non-local hosts: {args.url!r} (or --allow-http)"
        raise UsageError(message) from None


# -- send ----------------------------------------------------------------------------------


def _read_input(spec: str | None, stdin: TextIO) -> dict[str, Any]:
    """INPUT: JSON text, ``@file`` or ``-`` (standard input); absent means ``{}``."""
    if spec is None:
        return {}
    if spec == "-":
        source, text = "standard input", stdin.read()
    elif spec.startswith("@"):
        path = Path(spec[1:])
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise UsageError(f"cannot read INPUT file {spec[1:]!r}: {reason}") from None
    else:
        source, text = "INPUT", spec
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(
            f"{source} must be a JSON object (a skill's input), got {type(value).__name__}"
        )
    return value


def _send(args: argparse.Namespace) -> int:
    payload = _read_input(args.input, sys.stdin)
    _check_url(args)
    if args.progress and args.idempotency_key:
        raise UsageError(
            "--idempotency-key cannot be used with --progress: the stream endpoint runs every "
            "request it gets, so the key would promise what it does not do"
        )

    async def job(out: TextIO, err: TextIO) -> int:
        outcome = await _send_task(args, payload, err)
        return _report(outcome, args.full, out, err)

    return _run_client("send", args.url, args.timeout, job)


async def _send_task(args: argparse.Namespace, payload: dict[str, Any], err: TextIO) -> Outcome:
    from asap.transport.client import ASAPClient, RetryConfig

    deadline = time.monotonic() + args.timeout
    retry = RetryConfig(max_retries=args.retries, base_delay=0.1, max_delay=2.0)
    async with ASAPClient(
        args.url, **_client_kwargs(args), auth_token=args.token, nonces=True, retry_config=retry
    ) as client:
        recipient = args.recipient or (await client.get_manifest()).id
        envelope = Envelope(
            asap_version=ASAP_VERSION,
            sender=args.sender,
            recipient=recipient,
            payload_type="task.request",
            payload=TaskRequest(
                # Given a key, the same command line must be the same request (the agent
                # compares skill, conversation and input before replaying): the key is the
                # default conversation.
                conversation_id=args.conversation_id or args.idempotency_key or generate_id(),
                skill_id=args.skill,
                input=payload,
            ),
        )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ASAPTimeoutError(f"Deadline passed before calling {args.url}")
        if args.progress:
            return await _stream_task(args, envelope, remaining, err)
        reply = await client.send(envelope, timeout=remaining, idempotency_key=args.idempotency_key)
    response = reply.payload
    if not isinstance(response, TaskResponse):
        raise MalformedEnvelopeError(f"expected a task.response, got {reply.payload_type!r}")
    return Outcome(response.task_id, response.status.value, response.result)


def _report(outcome: Outcome, full: bool, out: TextIO, err: TextIO) -> int:
    body = (
        {"task_id": outcome.task_id, "status": outcome.status, "result": outcome.result}
        if full
        else outcome.result
    )
    print(_dump(body), file=out, flush=True)
    if outcome.status == "completed":
        return EXIT_OK
    print(f"asap send: task {outcome.task_id} {outcome.status}: {_task_error(outcome)}", file=err)
    return EXIT_FAILED


def _task_error(outcome: Outcome) -> str:
    result = outcome.result
    error = result.get("error") if isinstance(result, dict) else None
    if isinstance(error, dict) and error.get("message") is not None:
        kind = error.get("type")
        return _one_line(f"{kind}: {error['message']}" if kind else str(error["message"]))
    if error is not None:
        return _one_line(str(error))
    if outcome.status in ("submitted", "working", "input_required"):
        return "the task has not finished"
    return _one_line(json.dumps(result, ensure_ascii=False))


# -- send --progress: POST /asap/stream ----------------------------------------------------


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (its ``data:`` lines joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _rpc_error(url: str, body: bytes) -> NoReturn:
    """Raise what a JSON (not event-stream) answer of the stream endpoint says."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MalformedEnvelopeError(f"unreadable JSON answer from {url}") from None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        raise MalformedEnvelopeError(f"expected an event stream or a JSON-RPC error from {url}")
    code = error.get("code")
    raise RemoteRPCError(
        code if isinstance(code, int) else -32603, str(error.get("message", "")), error.get("data")
    )


def _progress_line(chunk: dict[str, Any], fraction: Any) -> str:
    percent = chunk.get("percent")
    if not isinstance(percent, int | float) and isinstance(fraction, int | float):
        percent = fraction * 100
    shown = f"{round(percent):3d}%" if isinstance(percent, int | float) else "    "
    message = chunk.get("message")
    return f"[{shown}] {message}" if message else f"[{shown}]"


async def _stream_task(
    args: argparse.Namespace, envelope: Envelope, remaining: float, err: TextIO
) -> Outcome:
    """Run the task through ``POST /asap/stream``: progress lines on ``err`` as the task
    reports them, the outcome from the final chunk. One attempt, no retry."""
    request: TaskRequest = envelope.payload
    config = (request.config or TaskRequestConfig()).model_copy(
        update={"timeout_seconds": max(1, int(remaining))}
    )
    envelope = envelope.model_copy(
        update={
            "payload": request.model_copy(update={"config": config}),
            "extensions": {**(envelope.extensions or {}), "nonce": generate_id()},
        }
    )
    frame = {
        "jsonrpc": "2.0",
        "method": "asap.send",
        "params": {"envelope": envelope.model_dump(mode="json")},
        "id": "req-1",
    }
    headers = {
        "accept": "text/event-stream",
        "content-type": "application/json",
        "asap-version": TRANSPORT_VERSIONS,
    }
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    url = args.url.rstrip("/") + "/asap/stream"
    try:
        async with (
            asyncio.timeout(remaining),
            httpx.AsyncClient(timeout=remaining, follow_redirects=False) as http,
            http.stream("POST", url, content=json.dumps(frame), headers=headers) as response,
        ):
            if not 200 <= response.status_code < 300:
                body = (await response.aread()).decode("utf-8", "replace")[:200]
                raise ASAPConnectionError(
                    f"HTTP {response.status_code} from {url}",
                    {"url": url, "status_code": response.status_code, "body": body},
                )
            kind = response.headers.get("content-type", "")
            if kind.startswith("application/json"):
                _rpc_error(url, await response.aread())
            if not kind.startswith("text/event-stream"):
                raise MalformedEnvelopeError(f"expected an event stream from {url}, got {kind!r}")
            return await _follow(_sse_data(response.aiter_lines()), envelope.id, url, err)
    except TimeoutError:
        raise ASAPTimeoutError(f"no final chunk from {url}") from None
    except httpx.TimeoutException as exc:
        raise ASAPTimeoutError(f"{type(exc).__name__} from {url}") from None
    except httpx.HTTPError as exc:
        raise ASAPConnectionError(f"Connection error to {url}: {exc or type(exc).__name__}") from (
            None
        )


async def _follow(events: AsyncIterator[str], request_id: str, url: str, err: TextIO) -> Outcome:
    task_id = ""
    async for data in events:
        try:
            message = json.loads(data)
            payload = message["payload"]
            chunk = json.loads(payload.get("chunk") or "{}")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise MalformedEnvelopeError(f"unreadable stream event from {url}") from None
        if message.get("correlation_id") != request_id:
            raise ProtocolCorrelationError(request_id, message.get("correlation_id"))
        if not isinstance(chunk, dict):
            chunk = {}
        if payload.get("final"):
            return Outcome(
                str(chunk.get("task_id", task_id)), str(payload.get("status")), chunk.get("result")
            )
        if not task_id and "task_id" in chunk:
            task_id = str(chunk["task_id"])
            print(f"task {task_id} started", file=err, flush=True)
            continue
        print(_progress_line(chunk, payload.get("progress")), file=err, flush=True)
    raise MalformedEnvelopeError(f"the stream from {url} ended before the task finished")


# -- manifest, health ----------------------------------------------------------------------


def _manifest(args: argparse.Namespace) -> int:
    _check_url(args)

    async def job(out: TextIO, err: TextIO) -> int:
        from asap.transport.client import ASAPClient

        async with ASAPClient(args.url, **_client_kwargs(args)) as client:
            manifest = await client.get_manifest()
        print(_dump(manifest.to_wire()), file=out, flush=True)
        return EXIT_OK

    return _run_client("manifest", args.url, args.timeout, job)


def _health(args: argparse.Namespace) -> int:
    _check_url(args)

    async def job(out: TextIO, err: TextIO) -> int:
        from asap.transport.client import ASAPClient

        async with ASAPClient(args.url, **_client_kwargs(args)) as client:
            health = await client.health_check()
        print(_dump(health.to_wire()), file=out, flush=True)
        if health.status == "healthy":
            return EXIT_OK
        print(f"asap health: {args.url} is {health.status}", file=err)
        return EXIT_FAILED

    return _run_client("health", args.url, args.timeout, job)


# -- the parser ----------------------------------------------------------------------------

EXIT_CODES = """exit codes:
  0  success
  1  the agent said no: the task failed or was cancelled, the request was refused
     (JSON-RPC error: unknown skill, invalid input, authentication), the agent is unhealthy
  2  usage error (bad option, INPUT not a JSON object, unreadable file)
  3  the agent could not be reached, did not answer in time, answered with an HTTP error
     or not as an ASAP agent
"""


def _command(
    commands: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    options: Sequence[EnvOption],
    **kwargs: Any,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, **kwargs)
    for option in options:
        option.add_to(parser)
    parser.set_defaults(run=run, parser=parser, env_options=options)
    return parser


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the agent's root URL, e.g. http://host:8001")
    parser.add_argument(
        "--allow-http",
        action="store_true",
        help="allow plain http:// to hosts other than localhost (tokens travel in clear)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``asap`` argument parser."""
    from asap import __version__

    parser = argparse.ArgumentParser(
        prog="asap", description="Serve and call ASAP agents (see docs/cli.md)."
    )
    parser.add_argument("--version", action="version", version=f"asap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = {"epilog": EXIT_CODES, "formatter_class": argparse.RawDescriptionHelpFormatter}

    _command(
        commands,
        "serve",
        _serve,
        SERVE_OPTIONS,
        help="serve an agent (uvicorn asap.server:app)",
        description="Serve an agent: uvicorn asap.server:app in N worker processes. Every "
        "option defaults to its ASAP_* environment variable; the command line wins.",
    )

    send = _command(
        commands,
        "send",
        _send,
        SEND_OPTIONS,
        help="run one task on an agent and print its result",
        description="Send one task.request to the agent at URL; print the task's result as "
        "JSON on stdout.",
        **client,
    )
    _client_arguments(send)
    send.add_argument("skill", metavar="SKILL", help="the skill id")
    send.add_argument(
        "input",
        metavar="INPUT",
        nargs="?",
        help="the skill's input: a JSON object, @FILE, or - for standard input (default {})",
    )
    send.add_argument(
        "--recipient",
        type=_urn,
        metavar="URN",
        help="the envelope's recipient (default: the id in the agent's manifest, fetched first)",
    )
    send.add_argument(
        "--conversation-id",
        metavar="ID",
        help="default: the idempotency key if given, else a new ULID",
    )
    send.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="run the task at most once per sender and key (default: a new key per command)",
    )
    send.add_argument(
        "--progress",
        action="store_true",
        help="stream the task (POST /asap/stream), print its progress on stderr; one attempt",
    )
    send.add_argument(
        "--full",
        action="store_true",
        help='print {"task_id", "status", "result"} rather than the result alone',
    )

    for name, run, about in (
        ("manifest", _manifest, "print an agent's manifest"),
        ("health", _health, "print an agent's health; exit 0 when healthy"),
    ):
        _client_arguments(_command(commands, name, run, CLIENT_OPTIONS, help=about, **client))

    _command(commands, "demo", _demo, (), help="two echo workers and an orchestration")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asap`` console script and of ``python -m asap``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = build_parser().parse_known_args(argv)
    parser: argparse.ArgumentParser = args.parser
    if extras:
        # argparse fills an optional positional (INPUT) from the first run of positionals, so
        # one after an option (`send URL SKILL --full '{...}'`) is left over: parse again,
        # intermixed, which also reports anything really unknown.
        args = parser.parse_intermixed_args(argv[argv.index(args.command) + 1 :])
    _resolve_env(args, parser, dict(os.environ))
    try:
        return int(args.run(args))
    except UsageError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `asap manifest URL | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

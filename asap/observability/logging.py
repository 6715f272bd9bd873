"""Structured logging: structlog configured once, contexts bound with contextvars (spec 6.1).

Console output by default, one JSON object per line with ``ASAP_LOG_FORMAT=json``. Standard
library loggers (uvicorn's included) are routed through the same renderer, so a deployment gets
one log format. Values of sensitive keys (``authorization``, ``token``, ``secret``, ...) are
redacted before rendering.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import orjson
import structlog

from asap.models.base import utc_timestamp

__all__ = [
    "bind_context",
    "clear_context",
    "configure_logging",
    "flush_logs",
    "get_logger",
    "sanitize_for_logging",
]

SENSITIVE_KEY_PARTS = ("password", "token", "secret", "authorization", "credential", "api_key")
_REDACTED = "***"
_configured: tuple[str, str] | None = None
_sensitive_keys: tuple[str, ...] = SENSITIVE_KEY_PARTS
_secrets: tuple[str, ...] = ()


def protect(secrets: Iterable[str] = (), keys: Iterable[str] = ()) -> None:
    """Keep ``secrets`` (token values) out of every log line, wherever they appear, and
    redact the values of keys containing any of ``keys`` (``ASAP_LOG_REDACT_KEYS``), on top
    of :data:`SENSITIVE_KEY_PARTS`. Adds to what earlier calls registered."""
    global _secrets, _sensitive_keys
    _secrets = tuple(sorted({*_secrets, *(s for s in secrets if s)}, key=len, reverse=True))
    _sensitive_keys = tuple(dict.fromkeys([*_sensitive_keys, *(k.lower() for k in keys if k)]))
    _sensitive.clear()
    _harmless.clear()


_sensitive: dict[str, bool] = {}
"""Whether each key seen is sensitive: log lines use the same few keys over and over."""
_harmless: set[str] = set()
"""The keys of :data:`_sensitive` that are not sensitive, as a set: a whole line's keys are
checked against it in one call."""


def _is_sensitive(key: str) -> bool:
    known = _sensitive.get(key)
    if known is None:
        lowered = key.lower()
        known = any(part in lowered for part in _sensitive_keys)
        if len(_sensitive) < 4096:
            _sensitive[key] = known
            if not known:
                _harmless.add(key)
    return known


def _scrub(line: str) -> str:
    for secret in _secrets:
        if secret in line:
            line = line.replace(secret, _REDACTED)
    return line


def sanitize_for_logging(value: Any) -> Any:
    """Return ``value`` with the values of sensitive keys replaced by ``***``, recursively."""
    if isinstance(value, Mapping):
        return {
            key: _REDACTED
            if isinstance(key, str) and _is_sensitive(key)
            else sanitize_for_logging(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [sanitize_for_logging(item) for item in value]
    return value


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # The usual line: every key known harmless and every value plain (nothing inside it to
    # redact), checked in two calls that loop in C.
    if _harmless.issuperset(event_dict) and _PLAIN.issuperset(map(type, event_dict.values())):
        return event_dict
    known = _sensitive
    for key, value in event_dict.items():
        sensitive = known.get(key)
        if sensitive is None:
            sensitive = _is_sensitive(key)
        if sensitive:
            event_dict[key] = _REDACTED
        elif type(value) not in _PLAIN and isinstance(value, Mapping):
            event_dict[key] = sanitize_for_logging(value)
    return event_dict


_PLAIN = frozenset({str, int, float, bool, type(None)})
"""Types of most logged values: nothing inside them to redact (checked before the slower
``Mapping`` test)."""


_bound: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("asap_log_context")
"""What :func:`bind_context` bound in this context: one variable holding every value, read
once per line (structlog's ``merge_contextvars`` copies the whole context and scans every
variable in it for each line)."""

_structlog_bound = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
"""structlog's own context variables, by name: empty until someone calls
``structlog.contextvars.bind_contextvars`` (None: structlog keeps them elsewhere now)."""


_LEVEL_NAMES = {"warn": "warning", "exception": "error"}
"""Log method names that are not their level's name (as structlog's ``add_log_level``)."""


def _preparer(service: str, exceptions_as_text: bool) -> Any:
    """The processor every line goes through before rendering, in one call: the values
    bound with :func:`bind_context` (and structlog's ``bind_contextvars``, which user code
    may call) unless the line sets them, the level (as structlog's ``add_log_level``), the
    timestamp (as its ISO UTC stamper), ``service``, the redaction of sensitive values and,
    with ``exceptions_as_text``, a traceback as text (its ``format_exc_info``). One call
    instead of five: each line pays every processor's call."""

    def prepare(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        bound = _bound.get(None)
        if bound:
            for key, value in bound.items():
                event_dict.setdefault(key, value)
        if _structlog_bound is None or _structlog_bound:
            structlog.contextvars.merge_contextvars(logger, method, event_dict)
        event_dict["level"] = _LEVEL_NAMES.get(method, method)
        event_dict["timestamp"] = utc_timestamp()
        event_dict.setdefault("service", service)
        _redact(logger, method, event_dict)
        if exceptions_as_text and "exc_info" in event_dict:
            return structlog.processors.format_exc_info(logger, method, event_dict)
        return event_dict

    return prepare


class _RecordFormatter(logging.Formatter):
    """Standard library records (uvicorn's access and error logs) through our processors
    and renderer: the event is the formatted message, plus ``logger`` and ``level``.
    Cheaper than structlog's ``ProcessorFormatter``, which copies every record."""

    def __init__(self, processors: list[Any], render: Any) -> None:
        super().__init__()
        self.processors, self.render = processors, render

    def format(self, record: logging.LogRecord) -> str:
        return self.line(record.getMessage(), record.name, record.levelname, record.exc_info)

    def line(self, message: str, logger: str, levelname: str, exc_info: Any = None) -> str:
        level = levelname.lower()
        event: Any = {"event": message, "logger": logger, "level": level}
        if exc_info:
            event["exc_info"] = exc_info
        for processor in self.processors:
            event = processor(None, level, event)
        return str(self.render(None, level, event))


class _Lines:
    """Where every rendered line goes: the current ``sys.stdout`` (which tests may swap),
    in one write per event-loop step. A request logs two lines or more (the access line and
    ``asap.request.processed``), and a write and flush per line cost more than rendering it.

    Lines written in a thread running an event loop wait for the end of the loop's current
    step; lines at ``WARNING`` and above, and lines from any other thread, are written at
    once, after those waiting (one order for all). :func:`flush_logs` and exit write what
    is left; a process killed outright loses the lines of its last step."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop a flush is scheduled on, if any."""

    def write(self, line: str, urgent: bool = False) -> None:
        with self._lock:
            self._lines.append(line)
        loop = None
        if not urgent:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread
                pass
        if loop is None:
            self.flush()
        elif loop is not self._loop:
            self._loop = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._loop = None
            lines, self._lines = self._lines, []
        if lines:
            lines.append("")
            stream = sys.stdout
            stream.write("\n".join(lines))
            stream.flush()


_lines = _Lines()
atexit.register(_lines.flush)


def flush_logs() -> None:
    """Write the log lines still waiting for the end of the event loop's step."""
    _lines.flush()


class _StdoutLogger:
    """structlog's output: rendered lines to :data:`_lines` (warnings and errors at once)."""

    def msg(self, message: str) -> None:
        _lines.write(message)

    def urgent(self, message: str) -> None:
        _lines.write(message, urgent=True)

    log = debug = info = msg
    warn = warning = error = critical = exception = fatal = urgent


_ACCESS = "uvicorn.access"


class _StdoutHandler(logging.Handler):
    """Standard library records to :data:`_lines`, without the handler lock (``_lines`` has
    its own). Only uvicorn's access lines wait for the end of the loop's step: uvicorn logs
    its last lines and then, stopped by a signal, raises that signal again, which ends the
    process at once (no exit handlers)."""

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        _lines.write(line, urgent=record.levelno >= logging.WARNING or record.name != _ACCESS)


class _AccessLogger(logging.Logger):
    """uvicorn's access logger once asap has configured logging: each access line rendered
    straight from uvicorn's message and arguments into :data:`_lines` (no ``LogRecord``, no
    pass through the logging module), which halves its cost. Only while the line would go
    nowhere else: when anyone adds a handler or filter on the way, or replaces the root's
    handler, the lines take the standard library's path again."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        handler = _handler
        root = logging.root
        if (
            kwargs
            or self.disabled
            or self.filters
            or self.handlers
            or not self.propagate
            or handler is None
            or handler.filters
            or handler.level > logging.INFO
            or type(handler.formatter) is not _RecordFormatter
            or root.handlers != [handler]
            or _uvicorn.handlers
            or not _uvicorn.propagate
            or not self.isEnabledFor(logging.INFO)
        ):
            super().info(msg, *args, **kwargs)
            return
        try:
            message = str(msg) % args if args else str(msg)
            line = handler.formatter.line(message, self.name, "INFO")
        except Exception:  # the standard way reports it (handleError) and goes on
            super().info(msg, *args, **kwargs)
            return
        _lines.write(line)


_handler: _StdoutHandler | None = None
"""The root logger's handler, once :func:`configure_logging` has set it."""
_uvicorn = logging.getLogger("uvicorn")


_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
"""Characters JSON allows unescaped that some readers (Python's ``splitlines``, JavaScript)
take as line ends; escaped, so one event stays one line whatever a caller sent."""


def _json_renderer(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    line = orjson.dumps(event_dict, default=str).decode()
    if not line.isascii():
        for char, escaped in _LINE_BREAKS.items():
            if char in line:
                line = line.replace(char, escaped)
    return line


class _ConsoleRenderer:
    """structlog's ``ConsoleRenderer(colors=False)`` line, built directly: the same text for
    every line without a traceback or stack (those go to structlog's own), at a fifth of its
    cost (it writes each column through its own formatter and ``StringIO``)."""

    _QUOTED = frozenset(" \t=\r\n\"'")
    """A string value containing any of these is shown as its ``repr``, as structlog does."""

    def __init__(self) -> None:
        self.full = structlog.dev.ConsoleRenderer(colors=False)
        levels = structlog.dev.ConsoleRenderer.get_default_level_styles(colors=False)
        self.level_width = len(max(levels, key=len))
        self.event_width = self.full.pad_event_to

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        level = event_dict.get("level", "")
        if (
            "exc_info" in event_dict
            or "exception" in event_dict
            or "stack" in event_dict
            or not isinstance(level, str)
        ):
            return str(self.full(logger, name, event_dict))
        parts = []  # the columns first, in structlog's order, then the rest by key
        if (value := event_dict.pop("timestamp", _ABSENT)) is not _ABSENT:
            parts.append(str(value))
        if event_dict.pop("level", _ABSENT) is not _ABSENT:
            parts.append(f"[{level.ljust(self.level_width)}]")
        if (value := event_dict.pop("event", _ABSENT)) is not _ABSENT:
            parts.append(str(value).ljust(self.event_width))
        for key in ("logger", "logger_name"):
            if (value := event_dict.pop(key, _ABSENT)) is not _ABSENT:
                parts.append(f"[{value}]")
        quoted = self._QUOTED
        for key in sorted(event_dict):
            value = event_dict[key]
            if not isinstance(value, str) or not quoted.isdisjoint(value):
                value = repr(value)
            parts.append(f"{key}={value}")
        return " ".join(part for part in parts if part).rstrip(" ")


_ABSENT: Any = object()


def configure_logging(
    log_format: str | None = None,
    level: str | None = None,
    service_name: str | None = None,
    *,
    force: bool = False,
) -> None:
    """Configure structlog and the standard library once (idempotent unless ``force``).

    Arguments default to ``ASAP_LOG_FORMAT`` (``console`` or ``json``), ``ASAP_LOG_LEVEL``
    (``INFO``) and ``ASAP_SERVICE_NAME`` (``asap``).
    """
    global _configured
    log_format = (log_format or os.environ.get("ASAP_LOG_FORMAT") or "console").lower()
    level = (level or os.environ.get("ASAP_LOG_LEVEL") or "INFO").upper()
    service = service_name or os.environ.get("ASAP_SERVICE_NAME") or "asap"
    if _configured == (log_format, level) and not force:
        return
    if log_format not in ("console", "json"):
        raise ValueError(f"ASAP_LOG_FORMAT must be 'console' or 'json', got {log_format!r}")
    numeric_level = logging.getLevelName(level)
    if not isinstance(numeric_level, int):
        raise ValueError(f"ASAP_LOG_LEVEL is not a log level: {level!r}")

    shared = [_preparer(service, exceptions_as_text=log_format == "json")]
    render: Any = _json_renderer if log_format == "json" else _ConsoleRenderer()

    def renderer(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
        """Render, then blank out registered secrets wherever they ended up (exception
        text, a skill's input, ...)."""
        line = render(logger, name, event_dict)
        return _scrub(line) if _secrets else line

    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *args: _StdoutLogger(),
        cache_logger_on_first_use=True,
    )

    global _handler
    handler = _handler = _StdoutHandler()
    handler.setFormatter(_RecordFormatter(shared, renderer))
    root = logging.getLogger()
    root.handlers = [handler]
    # Our lines carry none of the caller's file, line, thread or process: spare every record
    # finding them (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    setattr(logging, "logAsyncioTasks", False)  # noqa: B010 (Python 3.12+; absent before)
    root.setLevel(numeric_level)
    # uvicorn installs its own handlers before importing the app; send its records to ours.
    # httpx logs every request at INFO; our client logs its own events.
    logging.getLogger("httpx").setLevel(max(numeric_level, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error", _ACCESS):
        uvicorn_logger = logging.getLogger(name)
        if name == _ACCESS and not uvicorn_logger.handlers and not uvicorn_logger.propagate:
            continue  # how `uvicorn --no-access-log` leaves it: no access lines, no cost
        uvicorn_logger.handlers = []
        uvicorn_logger.propagate = True
        if name == _ACCESS and type(uvicorn_logger) is logging.Logger:
            uvicorn_logger.__class__ = _AccessLogger
    _configured = (log_format, level)
    for logger in list(_loggers):
        logger._renew()


class _Logger:
    """What :func:`get_logger` returns: the logging methods of a structlog bound logger made
    with the current configuration, made again each time logging is configured. A call goes
    straight to structlog's method (its lazy proxy found the method through ``__getattr__`` on
    every call, a failed attribute lookup first, even for a line filtered out by its level),
    and a logger made at import follows a configuration made later (the proxy, once used,
    kept the configuration it was first used with). Everything else (``bind``, ``new``,
    ...) is the bound logger's."""

    _METHODS = ("debug", "info", "warning", "warn", "error", "exception", "critical", "fatal")

    def __init__(self, name: str | None, initial: dict[str, Any]) -> None:
        self._name, self._initial = name, initial
        self._renew()
        _loggers.add(self)

    def _renew(self) -> None:
        bound = structlog.get_logger(self._name).bind(**self._initial)
        self._bound = bound
        for method in self._METHODS:
            setattr(self, method, getattr(bound, method))

    def __getattr__(self, name: str) -> Any:
        if name == "_bound" or name.startswith("__"):  # not made yet (copy, pickle): no loop
            raise AttributeError(name)
        return getattr(self._bound, name)

    def __repr__(self) -> str:
        return f"<asap logger {self._name!r} {self._bound!r}>"


_loggers: weakref.WeakSet[_Logger] = weakref.WeakSet()
"""Every logger :func:`get_logger` made that is still in use: renewed by each configuration."""


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """Return a structlog logger, configuring logging on first use. It follows every later
    :func:`configure_logging` (format, level); what its ``bind`` returns does not."""
    if _configured is None:
        configure_logging()
    return _Logger(name, initial)


def bind_context(**values: Any) -> None:
    """Bind values (``trace_id``, ``correlation_id``, ...) to every log line of this context
    (an asyncio task's, a thread's): on top of those bound before, which it may replace."""
    bound = _bound.get(None)
    _bound.set({**bound, **values} if bound else values)


def clear_context() -> None:
    """Remove every value bound with :func:`bind_context` in this context (and with
    structlog's ``bind_contextvars``)."""
    _bound.set({})
    if _structlog_bound is None or _structlog_bound:
        structlog.contextvars.clear_contextvars()

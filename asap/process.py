"""Run agents as child processes: start, wait until ready (polling, with a deadline), stop.

Used by ``asap demo`` and by the end-to-end tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

__all__ = ["AgentProcess", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AgentProcess:
    """A child process serving an agent on ``127.0.0.1:port``.

    ``args`` is the command after the Python interpreter (e.g. ``["-m", "uvicorn", ...]``).
    Output goes to ``log_path``, to this process's own output with ``inherit_output``, or is
    discarded; never to a pipe, so a chatty child never blocks.
    """

    def __init__(
        self,
        args: Sequence[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        python: str = sys.executable,
        ready_path: str = "/health",
        inherit_output: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.args = [python, *args]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.ready_path = ready_path
        self.inherit_output = inherit_output
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"AgentProcess({self.url!r}, pid={self.pid})"

    @classmethod
    def uvicorn(
        cls,
        app: str = "asap.server:app",
        *,
        port: int | None = None,
        quiet: bool = False,
        **options: Any,
    ) -> AgentProcess:
        """``python -m uvicorn <app>`` on ``port`` (a free one by default); ``quiet`` keeps
        only warnings (no access log). Other options as for the constructor."""
        port = port or free_port()
        args = ["-m", "uvicorn", app, "--port", str(port)]
        if quiet:
            args += ["--log-level", "warning", "--no-access-log"]
            options["env"] = {"ASAP_LOG_LEVEL": "WARNING", **options.get("env", {})}
        return cls(args, port, **options)

    @property
    def pid(self) -> int | None:
        """The child's process id once started."""
        return self.process.pid if self.process else None

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> AgentProcess:
        """Start the process and (unless ``wait`` is false) wait until it is ready."""
        output: Any = None if self.inherit_output else subprocess.DEVNULL
        if self.log_path:
            output = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=output, stderr=subprocess.STDOUT, cwd=self.cwd
            )
        finally:
            if self.log_path:
                output.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll until the agent answers, the process dies, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.args} exited with {self.process.returncode} before becoming ready"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.url} not ready after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop with SIGTERM (SIGKILL after ``timeout``); return the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """Stop at once with SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

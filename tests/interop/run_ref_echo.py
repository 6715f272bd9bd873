#!/usr/bin/env python3
"""Start the reference echo agent, run the reference-client driver against it, stop it.

Stdlib only; runs under any Python >= 3.11 (the agent and the driver themselves run
under the reference venv). Used to check the interop plumbing end to end:

    python3 tests/interop/run_ref_echo.py            # all cases, RESULT lines on stdout
    python3 tests/interop/run_ref_echo.py --case send --case health
    python3 tests/interop/run_ref_echo.py --serve     # just run the agent until Ctrl-C

Exit status: 0 if every case reported ok, 1 otherwise, 2 if the agent never became ready.
The helpers ``free_port``, ``start_ref_echo_agent``, ``wait_ready``, ``stop`` and
``parse_results`` are importable by pytest fixtures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REF_PYTHON = Path(os.environ.get("ASAP_REF_PYTHON", ROOT / ".venv-ref" / "bin" / "python"))
DRIVER = Path(__file__).resolve().parent / "ref_client_driver.py"
RESULT_PREFIX = "RESULT "
MANIFEST_PATH = "/.well-known/asap/manifest.json"

# The reference server defaults to "10/second;100/minute" per client IP, which a
# test run exceeds quickly; lift it for the agent process.
AGENT_ENV = {"ASAP_RATE_LIMIT": "100000/second;1000000/minute", "ASAP_LOG_LEVEL": "WARNING"}


def ref_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for reference-venv subprocesses (no PYTHONPATH leaking our package)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ref_echo_agent(port: int, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    env = ref_env(AGENT_ENV)
    # -P: do not put the cwd on sys.path, or this repo's own ``asap`` package
    # would shadow the reference one when run from the repo root.
    cmd = [str(REF_PYTHON), "-P", "-m", "asap.examples.echo_agent"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    if log_path is None:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with open(log_path, "wb") as out:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], deadline_s: float = 60.0) -> float:
    """Poll the manifest until it answers 200; return seconds waited."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"reference echo agent exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(base_url + MANIFEST_PATH, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - start > deadline_s:
            raise TimeoutError(f"{base_url} not ready after {deadline_s}s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_driver(
    base_url: str, cases: list[str] | None, timeout_s: float = 300.0, *extra: str
) -> subprocess.CompletedProcess[str]:
    sel = ["--all"] if not cases else [a for c in cases for a in ("--case", c)]
    return subprocess.run(
        [str(REF_PYTHON), "-P", str(DRIVER), "--base-url", base_url, *sel, *extra],
        env=ref_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def parse_results(stdout: str) -> dict[str, dict[str, Any]]:
    """Map case name -> result object, ignoring any line without the RESULT prefix."""
    out: dict[str, dict[str, Any]] = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            obj = json.loads(line[len(RESULT_PREFIX) :])
            out[obj["case"]] = obj
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--agent-log", type=Path)
    args = ap.parse_args()
    if not REF_PYTHON.exists():
        print(f"missing {REF_PYTHON}; run scripts/ref-venv.sh", file=sys.stderr)
        return 2
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = start_ref_echo_agent(port, args.agent_log)
    try:
        try:
            waited = wait_ready(base, proc)
        except (RuntimeError, TimeoutError) as e:
            print(f"agent not ready: {e}", file=sys.stderr)
            return 2
        print(f"# reference echo agent ready at {base} after {waited:.2f}s", file=sys.stderr)
        if args.serve:
            try:
                proc.wait()
            except KeyboardInterrupt:
                pass
            return 0
        res = run_driver(base, args.case)
        sys.stdout.write(res.stdout)
        if res.stderr.strip():
            print(f"# driver stderr: {len(res.stderr.splitlines())} lines", file=sys.stderr)
        results = parse_results(res.stdout)
        bad = [c for c, r in results.items() if not r.get("ok")]
        print(
            f"# driver rc={res.returncode} cases={len(results)} not_ok={bad} "
            f"total={time.monotonic() - t0:.2f}s",
            file=sys.stderr,
        )
        return 0 if res.returncode == 0 and results and not bad else 1
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())

"""Shared by bench/run.py and bench/memory.py: servers, wrk, /proc readings, a tiny Redis client.

Standard library only.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA = BENCH / "post.lua"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Same body as bench/post.lua; used for the readiness/sanity request.
BODY = (
    b'{"jsonrpc":"2.0","method":"asap.send","params":{"envelope":{"asap_version":"0.1",'
    b'"sender":"urn:asap:agent:bench","recipient":"urn:asap:agent:echo-agent",'
    b'"payload_type":"task.request","payload":{"conversation_id":"bench","skill_id":"echo",'
    b'"input":{"message":"hello"}}}},"id":"b-1"}'
)


@dataclass
class Target:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    hint: str = ""  # shown if it fails to start
    levels: list[int] = field(default_factory=list)  # concurrency levels it is measured at
    token: str = ""  # bearer token the requests carry (wrk: BENCH_TOKEN)
    idempotency: bool = False  # wrk sends a unique X-Idempotency-Key with every request
    redis_prefix: str = ""  # its keys in Redis, deleted afterwards
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    stack: str = ""  # python version, event loop and HTTP parser
    reply_bytes: int = 0
    skipped: str = ""  # reason, if not (or no longer) benchmarked
    checks: list[str] = field(default_factory=list)  # what the start-up checks saw
    requests: int = 0  # answered in warm-ups and runs (wrk's count)
    runs: dict[int, list[dict[str, float]]] = field(default_factory=dict)

    def headers(self, idempotency_key: str = "") -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if idempotency_key:
            h["X-Idempotency-Key"] = idempotency_key
        return h


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def uvicorn_cmd(python: Path, app: str, port: int, *extra: str, quiet: bool = True) -> list[str]:
    """uvicorn on HOST:port; quiet = warnings only and no access log (else uvicorn's
    defaults, as the Docker image runs it: INFO and an access line per request)."""
    logs = ["--log-level", "warning", "--no-access-log"] if quiet else []
    return [str(python), "-m", "uvicorn", app, *extra, "--host", HOST, "--port", str(port), *logs]


def describe_stack(python: str) -> str:
    code = (
        "import sys, importlib.util as u; f = lambda m: u.find_spec(m) is not None; "
        "print(sys.version.split()[0], 'uvloop' if f('uvloop') else 'asyncio', "
        "'httptools' if f('httptools') else 'h11')"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
        v, loop, parser = out.stdout.split()
        return f"Python {v}, {loop} + {parser}"
    except Exception:
        return "unknown"


def log_tail(t: Target, lines: int = 12) -> str:
    text = t.log.read_text(errors="replace") if t.log and t.log.exists() else ""
    tail = "\n".join(text.strip().splitlines()[-lines:])
    return "\n      ".join(["", *tail.splitlines()]) if tail else " (no output)"


def post_once(port: int, headers: dict[str, str], timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/asap", BODY, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def task_id(body: bytes) -> str:
    """The task id of an echo reply, "" if it is not one."""
    try:
        return str(json.loads(body)["result"]["envelope"]["payload"]["task_id"])
    except (ValueError, KeyError, TypeError):
        return ""


def start(t: Target, logdir: Path, deadline_s: float) -> bytes:
    """Start the server, poll POST /asap until it answers, check that the answer is a JSON-RPC
    result (with the target's token and, if it uses them, an idempotency key). Returns it."""
    if not Path(t.argv[0]).exists():
        t.skipped = f"{t.argv[0]} not found" + (f" ({t.hint})" if t.hint else "")
        return b""
    t.stack = describe_stack(t.argv[0])
    t.log = logdir / f"{t.name}.log"
    t.cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | t.env
    with open(t.log, "wb") as log:
        t.proc = subprocess.Popen(
            t.argv,
            cwd=t.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    headers = t.headers("bench-check" if t.idempotency else "")
    deadline = time.monotonic() + deadline_s
    while True:
        if t.proc.poll() is not None:
            why = f"exited with code {t.proc.returncode} before answering"
            t.skipped = f"{why}{'; ' + t.hint if t.hint else ''}; last output:{log_tail(t)}"
            return b""
        try:
            status, body = post_once(t.port, headers)
            break
        except OSError:
            if time.monotonic() > deadline:
                t.skipped = (
                    f"not answering POST /asap after {deadline_s:.0f}s; last output:{log_tail(t)}"
                )
                return b""
            time.sleep(0.05)  # poll interval, not a startup delay
    if status != 200 or b'"result"' not in body:
        t.skipped = f"POST /asap answered HTTP {status} without a JSON-RPC result: {body[:300]!r}"
    t.reply_bytes = len(body)
    return body


def stop_all(targets: list[Target]) -> None:
    live = [t.proc for t in targets if t.proc and t.proc.poll() is None]
    for proc in live:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # own session: uvicorn and anything it spawned
        except ProcessLookupError:
            pass
    for proc in live:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def alive(t: Target) -> bool:
    if not t.skipped and t.proc is not None and t.proc.poll() is not None:
        code = t.proc.returncode
        t.skipped = f"server died during the benchmark (code {code}); last output:{log_tail(t)}"
    return not t.skipped


# ---------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_cpu(stat: str = "/proc/stat") -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs since boot; (0, 0) where there is no such file.

    Steal is time the hypervisor ran something else while this virtual machine had work for
    its CPUs: a run during which it is more than a few % measured a slower machine."""
    try:
        with open(stat) as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    return (ticks[7] if len(ticks) == 8 else 0), sum(ticks)


# ---------------------------------------------------------------- load


def to_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if not m:
        raise RuntimeError(f"unexpected wrk latency value {value!r}")
    num, unit = m.groups()
    return float(num) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


def wrk(t: Target, conns: int, seconds: int, redis_pid: int | None = None) -> dict[str, float]:
    """One wrk run (1 thread, conns connections) against t; server CPU from /proc, and the
    Redis server's too when redis_pid is given."""
    assert t.proc is not None
    pid = t.proc.pid
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(LUA)]
    argv.append(f"http://{HOST}:{t.port}/asap")
    env = dict(os.environ, BENCH_TOKEN=t.token)
    if t.idempotency:  # a fresh prefix per run: keys never repeat across runs
        env["BENCH_IDEMPOTENCY_PREFIX"] = "bench-" + secrets.token_hex(6)
    cpu0 = cpu_seconds(pid)
    rcpu0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    steal0, total0 = machine_cpu()
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    cpu = cpu_seconds(pid) - cpu0
    rcpu = cpu_seconds(redis_pid) - rcpu0 if redis_pid else float("nan")
    steal1, total1 = machine_cpu()
    text = out.stdout + out.stderr

    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.M)
        if not m:
            raise RuntimeError(f"cannot parse wrk output ({pattern!r}):\n{text}")
        return m

    requests = int(grab(r"^\s*(\d+) requests in ([\d.]+\w+)").group(1))
    t.requests += requests
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    counts = grab(r"ASAP-COUNTS non2xx=(\d+) rpc_errors=(\d+)")
    per_req = 1e6 / requests if requests else float("nan")
    return {
        "rps": float(grab(r"^Requests/sec:\s*([\d.]+)").group(1)),
        "p50": to_ms(grab(r"^\s*50%\s+(\S+)").group(1)),
        "p99": to_ms(grab(r"^\s*99%\s+(\S+)").group(1)),
        "cpu_us": cpu * per_req,
        "cpu_pct": 100 * cpu / seconds,
        "redis_cpu_us": rcpu * per_req,
        "steal_pct": 100 * (steal1 - steal0) / (total1 - total0) if total1 > total0 else 0.0,
        "requests": requests,
        "non2xx": int(counts.group(1)),
        "rpc_errors": int(counts.group(2)),
        "socket": sum(map(int, sock.groups())) if sock else 0,
    }


# ---------------------------------------------------------------- Redis


class RedisError(Exception):
    pass


class Redis:
    """Just enough RESP2 to count and delete the benchmark's keys and find Redis's pid."""

    def __init__(self, url: str, timeout: float = 5) -> None:
        u = urlsplit(url)
        try:
            self.sock = socket.create_connection((u.hostname or HOST, u.port or 6379), timeout)
        except OSError as exc:
            raise RedisError(f"cannot connect to {url}: {exc}") from exc
        self.reader = self.sock.makefile("rb")
        db = u.path.strip("/")
        if db and db != "0":
            self.call("SELECT", db)

    def call(self, *args: str | int) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.reader.read(n + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RedisError(f"unexpected reply {line!r}")

    def keys(self, pattern: str) -> list[str]:
        cursor, found = "0", []
        while True:
            cursor, batch = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found += batch
            if cursor == "0":
                return found

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            self.call("UNLINK", *keys[i : i + 1000])

    def pid(self) -> int | None:
        m = re.search(r"^process_id:(\d+)", self.call("INFO", "server"), re.M)
        pid = int(m.group(1)) if m else None
        try:
            if pid:
                cpu_seconds(pid)  # readable here (same host, /proc not hidden)?
            return pid
        except OSError:
            return None

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# ---------------------------------------------------------------- host


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else platform.processor() or cpu
    except OSError:
        cpu = platform.processor() or cpu
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    return {
        "nproc": str(os.cpu_count()),
        "CPU": cpu,
        "harness Python": f"{platform.python_version()} ({sys.executable})",
        "wrk": wrk_v[0] if wrk_v else "unknown",
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


# ---------------------------------------------------------------- what is benchmarked

MAIN = ["ours", "ours-prod", "reference", "bare"]  # measured at every --concurrency level
SINGLE = [  # at --feature-concurrency
    "ours+json-logs",
    "ours+auth",
    "ours+redis-idempotency",
    "ours+idempotency",
]
PROD_FEATURES = ["ours+json-logs", "ours+auth", "ours+redis-idempotency"]
"""The single features ours-prod combines."""
ORDER = MAIN + SINGLE
# `ours` plus production features; each single-feature target adds one, ours-prod all of them.
FEATURES: dict[str, tuple[str, ...]] = {
    "ours": (),
    "ours-prod": ("json-logs", "auth", "redis-idempotency"),
    "ours+json-logs": ("json-logs",),
    "ours+auth": ("auth",),
    "ours+redis-idempotency": ("redis-idempotency",),
    "ours+idempotency": ("idempotency",),
}
AGENT = "urn:asap:agent:bench"  # the sender of bench/post.lua's envelope
NOTES = {
    "ours": "the defaults (SQLite storage in a fresh folder, metrics on, console logs at "
    "WARNING, no authentication); ASAP_RATE_LIMIT lifted because wrk is one sender",
    "ours-prod": "production settings: ours + JSON logs at INFO (uvicorn's defaults as in the "
    "Docker image: access log on) + bearer authentication + Redis storage with a unique "
    "X-Idempotency-Key per request; the rate limit is on (its windows in Redis) but too high "
    "to trigger",
    "ours+json-logs": "ours + ASAP_LOG_FORMAT=json at INFO with uvicorn's default logging (an "
    "asap.request.processed line and an access line per request) into the log file",
    "ours+auth": "ours + ASAP_AUTH_TOKENS; wrk sends Authorization: Bearer <token>",
    "ours+redis-idempotency": "ours + ASAP_STORAGE_URL on the local Redis (task records and "
    "rate-limit windows move there too) + a unique X-Idempotency-Key per request (a "
    "stored outcome per request)",
    "ours+idempotency": "ours + a unique X-Idempotency-Key per request on the default SQLite "
    "storage (a stored outcome per request): what every call between our agents does, as our "
    "clients key every request",
    "reference": "run as shipped: its CLI calls uvicorn.run() with defaults, so the access log "
    "is on and, without uvloop/httptools in its venv, it runs on asyncio + h11; "
    "ASAP_RATE_LIMIT lifts its default 10/second;100/minute limit (429s otherwise)",
    "bare": "reads the body and returns a fixed echo-sized reply: the floor of the stack",
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_target(name: str, scratch: Path, run_id: str, redis_url: str, token: str) -> Target:
    """The server for a target name, on a free port, with its own folder in scratch."""
    port, cwd = free_port(), scratch / slug(name)
    if name in FEATURES:
        features = FEATURES[name]
        # wrk is one sender; like the reference's, our limit is lifted, not removed
        env = {"ASAP_LOG_LEVEL": "WARNING", "ASAP_RATE_LIMIT": "1000000/second"}
        if "json-logs" in features:
            env |= {"ASAP_LOG_FORMAT": "json", "ASAP_LOG_LEVEL": "INFO"}
        if "auth" in features:
            env["ASAP_AUTH_TOKENS"] = f"{AGENT}={token}"
        prefix = ""
        if "redis-idempotency" in features:
            prefix = f"asap-bench-{run_id}-{slug(name)}:"
            env["ASAP_STORAGE_URL"] = (
                f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
            )
        # Started in its own folder: the default storage, sqlite:///asap-state.db, is a fresh
        # file there (asap and skills are imported from the editable install).
        return Target(
            name,
            port,
            uvicorn_cmd(
                ROOT / ".venv/bin/python",
                "asap.server:app",
                port,
                quiet="json-logs" not in features,
            ),
            env,
            cwd,
            hint="is asap.server:app implemented yet?",
            token=token if "auth" in features else "",
            idempotency=bool({"idempotency", "redis-idempotency"} & set(features)),
            redis_prefix=prefix,
        )
    if name == "bare":
        python = ROOT / ".venv/bin/python"
        return Target(
            name, port, uvicorn_cmd(python, "bare_app:app", port, "--app-dir", str(BENCH)), {}, cwd
        )
    if name == "reference":
        # Started from a scratch dir: `python -m` puts the cwd first on sys.path, and from the
        # repo root it would import our `asap` package instead.
        argv = [str(ROOT / ".venv-ref/bin/python"), "-m", "asap.examples.echo_agent"]
        return Target(
            name,
            port,
            [*argv, "--host", HOST, "--port", str(port)],
            # Its default limit is 10/second;100/minute; the env var replaces it.
            {"ASAP_RATE_LIMIT": "1000000/second", "ASAP_LOG_LEVEL": "WARNING"},
            cwd,
            hint="create its venv with scripts/ref-venv.sh",
        )
    raise ValueError(f"unknown target {name!r}")

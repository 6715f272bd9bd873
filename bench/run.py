#!/usr/bin/env python3
"""Side-by-side HTTP benchmark of POST /asap: ours vs the reference vs a bare Starlette app.

    python bench/run.py [--runs 3] [--duration 5] [--concurrency 1,16,64]
                        [--targets ours,reference,bare] [--warmup 1]

Each target runs as one uvicorn worker in its own process on 127.0.0.1. Load comes from
`wrk` (one thread, connections = concurrency) running bench/post.lua. For every
concurrency level each target gets a warm-up, then --runs measured runs interleaved
across targets (so drift on a shared machine hits every target alike); the table shows
medians. Server CPU per request comes from /proc/<pid>/stat (utime+stime, all threads).
A target that cannot start or does not answer POST /asap with a JSON-RPC result is
skipped with the reason. Results are printed and written to bench/results.md.
Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA = BENCH / "post.lua"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ORDER = ["ours", "reference", "bare"]
NOTES = {
    "reference": "run as shipped: its CLI calls uvicorn.run() with defaults, so the access log "
    "is on and, without uvloop/httptools in its venv, it runs on asyncio + h11; "
    "ASAP_RATE_LIMIT lifts its default 10/second;100/minute limit (429s otherwise)",
    "bare": "reads the body and returns a fixed echo-sized reply: the floor of the stack",
}

# Same body as bench/post.lua; used for the readiness/sanity request.
BODY = (
    b'{"jsonrpc":"2.0","method":"asap.send","params":{"envelope":{"asap_version":"0.1",'
    b'"sender":"urn:asap:agent:bench","recipient":"urn:asap:agent:echo-agent",'
    b'"payload_type":"task.request","payload":{"conversation_id":"bench","skill_id":"echo",'
    b'"input":{"message":"hello"}}}},"id":"b-1"}'
)


def uvicorn_cmd(python: Path, app: str, port: int, *extra: str) -> list[str]:
    return [
        str(python),
        "-m",
        "uvicorn",
        app,
        *extra,
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def target_spec(name: str, port: int, scratch: Path) -> tuple[list[str], dict[str, str], Path, str]:
    """(argv, extra env, cwd, hint shown if it fails to start) for a target."""
    if name == "ours":
        return (
            uvicorn_cmd(ROOT / ".venv/bin/python", "asap.server:app", port),
            # wrk is one sender; like the reference's, our limit is lifted, not removed
            {"ASAP_LOG_LEVEL": "WARNING", "ASAP_RATE_LIMIT": "1000000/second"},
            ROOT,
            "is asap.server:app implemented yet?",
        )
    if name == "bare":
        return (
            uvicorn_cmd(ROOT / ".venv/bin/python", "bare_app:app", port, "--app-dir", str(BENCH)),
            {},
            ROOT,
            "",
        )
    # The reference is started from a scratch dir: `python -m` puts the cwd first on
    # sys.path, and from the repo root it would import our `asap` package instead.
    return (
        [
            str(ROOT / ".venv-ref/bin/python"),
            "-m",
            "asap.examples.echo_agent",
            "--host",
            HOST,
            "--port",
            str(port),
        ],
        # Its default limit is 10/second;100/minute; the env var replaces it.
        {"ASAP_RATE_LIMIT": "1000000/second", "ASAP_LOG_LEVEL": "WARNING"},
        scratch,
        "create its venv with scripts/ref-venv.sh",
    )


@dataclass
class Target:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    stack: str = ""  # python version, event loop and HTTP parser
    reply_bytes: int = 0
    skipped: str = ""  # reason, if not (or no longer) benchmarked
    runs: dict[int, list[dict[str, float]]] = field(default_factory=dict)


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


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


def post_once(port: int, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/asap", BODY, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start(t: Target, port: int, cwd: Path, hint: str, logdir: Path, deadline_s: float) -> None:
    """Start the server, poll POST /asap until it answers, then check the answer."""
    if not Path(t.argv[0]).exists():
        t.skipped = f"{t.argv[0]} not found ({hint})" if hint else f"{t.argv[0]} not found"
        return
    t.stack = describe_stack(t.argv[0])
    t.log = logdir / f"{t.name}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | t.env
    with open(t.log, "wb") as log:
        t.proc = subprocess.Popen(
            t.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + deadline_s
    while True:
        if t.proc.poll() is not None:
            why = f"exited with code {t.proc.returncode} before answering"
            t.skipped = f"{why}{'; ' + hint if hint else ''}; last output:{log_tail(t)}"
            return
        try:
            status, body = post_once(port, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                t.skipped = (
                    f"not answering POST /asap after {deadline_s:.0f}s; last output:{log_tail(t)}"
                )
                return
            time.sleep(0.05)  # poll interval, not a startup delay
    if status != 200 or b'"result"' not in body:
        t.skipped = f"POST /asap answered HTTP {status} without a JSON-RPC result: {body[:300]!r}"
    t.reply_bytes = len(body)


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


# ---------------------------------------------------------------- load


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def to_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if not m:
        raise RuntimeError(f"unexpected wrk latency value {value!r}")
    num, unit = m.groups()
    return float(num) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


def wrk(t: Target, conns: int, seconds: int) -> dict[str, float]:
    assert t.proc is not None
    port, pid = t.port, t.proc.pid
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(LUA),
        f"http://{HOST}:{port}/asap",
    ]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True)
    cpu = cpu_seconds(pid) - cpu0
    text = out.stdout + out.stderr

    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.M)
        if not m:
            raise RuntimeError(f"cannot parse wrk output ({pattern!r}):\n{text}")
        return m

    requests = int(grab(r"^\s*(\d+) requests in ([\d.]+\w+)").group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    counts = grab(r"ASAP-COUNTS non2xx=(\d+) rpc_errors=(\d+)")
    return {
        "rps": float(grab(r"^Requests/sec:\s*([\d.]+)").group(1)),
        "p50": to_ms(grab(r"^\s*50%\s+(\S+)").group(1)),
        "p99": to_ms(grab(r"^\s*99%\s+(\S+)").group(1)),
        "cpu_us": cpu * 1e6 / requests if requests else float("nan"),
        "cpu_pct": 100 * cpu / seconds,
        "requests": requests,
        "non2xx": int(counts.group(1)),
        "rpc_errors": int(counts.group(2)),
        "socket": sum(map(int, sock.groups())) if sock else 0,
    }


def alive(t: Target) -> bool:
    if not t.skipped and t.proc is not None and t.proc.poll() is not None:
        code = t.proc.returncode
        t.skipped = f"server died during the benchmark (code {code}); last output:{log_tail(t)}"
    return not t.skipped


# ---------------------------------------------------------------- report


def median(t: Target, c: int, key: str) -> float:
    return statistics.median(r[key] for r in t.runs[c])


def errors(t: Target, c: int) -> int:
    return sum(int(r["non2xx"] + r["rpc_errors"] + r["socket"]) for r in t.runs[c])


def tables(targets: list[Target], levels: list[int]) -> str:
    done = [t for t in targets if t.runs]
    lines = [
        "| target | concurrency | req/s | p50 ms | p99 ms | server CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        for t in done:
            if c in t.runs:
                rps, p50, p99, cpu = (median(t, c, k) for k in ("rps", "p50", "p99", "cpu_us"))
                lines.append(
                    f"| {t.name} | {c} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {cpu:,.0f} "
                    f"| {errors(t, c)} |"
                )
    by = {t.name: t for t in done}

    def ratio(a: str, b: str, c: int) -> str:
        if a in by and b in by and c in by[a].runs and c in by[b].runs:
            return f"{median(by[a], c, 'rps') / median(by[b], c, 'rps'):.2f}×"
        return "n/a"

    lines += [
        "",
        "Throughput ratios (median req/s):",
        "",
        "| concurrency | ours/reference | ours/bare | reference/bare |",
        "|---:|---:|---:|---:|",
    ]
    for c in levels:
        lines.append(
            f"| {c} | {ratio('ours', 'reference', c)} | {ratio('ours', 'bare', c)} "
            f"| {ratio('reference', 'bare', c)} |"
        )
    err = [
        f"- {t.name} @ {c}: "
        + ", ".join(
            f"{k} {sum(r[k] for r in t.runs[c])}" for k in ("non2xx", "rpc_errors", "socket")
        )
        for t in done
        for c in t.runs
        if errors(t, c)
    ]
    if err:
        lines += [
            "",
            "Errors (summed over measured runs; rpc_errors = 2xx reply without a result):",
            "",
            *err,
        ]
    return "\n".join(lines)


def machine() -> list[str]:
    cpu = "unknown"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else platform.processor() or cpu
    except OSError:
        cpu = platform.processor() or cpu
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    return [
        f"- nproc: {os.cpu_count()}",
        f"- CPU: {cpu}",
        f"- harness Python: {platform.python_version()} ({sys.executable})",
        f"- wrk: {wrk_v[0] if wrk_v else 'unknown'}",
        f"- load average at start: {Path('/proc/loadavg').read_text().split()[:3]}",
    ]


def write_results(
    path: Path,
    args: argparse.Namespace,
    targets: list[Target],
    table: str,
    host_info: list[str],
    started: datetime.datetime,
    elapsed: float,
) -> None:
    out = [
        "# asap benchmark: POST /asap (echo)",
        "",
        f"- date: {started.isoformat(timespec='seconds')}",
        *host_info,
        f"- command: `{shlex.join([sys.executable, *sys.argv])}`",
        f"- settings: {args.runs} runs × {args.duration:g}s per target and concurrency "
        f"(median shown), {args.warmup:g}s warm-up, wrk 1 thread, connections = concurrency, "
        f"runs interleaved across targets; total {elapsed:.0f}s",
        "",
        table,
        "",
        "## Targets",
        "",
    ]
    for t in targets:
        env = " ".join(f"{k}={v}" for k, v in t.env.items())
        out.append(f"- **{t.name}**: `{(env + ' ') if env else ''}{shlex.join(t.argv)}`")
        if t.name in NOTES:
            out.append(f"  - {NOTES[t.name]}")
        if t.stack:
            out.append(
                f"  - {t.stack}" + (f"; reply {t.reply_bytes} bytes" if t.reply_bytes else "")
            )
        if t.skipped:
            out.append("  - SKIPPED: " + t.skipped.replace("\n", "\n    "))
        for c, runs in t.runs.items():
            rps = ", ".join(f"{r['rps']:,.0f}" for r in runs)
            cpu = statistics.median(r["cpu_pct"] for r in runs)
            out.append(f"  - c={c}: req/s per run {rps}; server CPU {cpu:.0f}% of a core")
    out += [
        "",
        "Server CPU µs/req = (utime+stime of the server process over a run) / requests. "
        "Errors = non-2xx + 2xx replies without a JSON-RPC result + wrk socket errors, "
        "summed over the measured runs.",
        "",
    ]
    path.write_text("\n".join(out))


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="measured runs per target and concurrency")
    p.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    p.add_argument(
        "--warmup", type=int, default=1, help="warm-up seconds per target and concurrency"
    )
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts")
    p.add_argument("--targets", default="ours,reference,bare", help=f"subset of {','.join(ORDER)}")
    p.add_argument("--ready-timeout", type=float, default=30, help="seconds to wait for a server")
    p.add_argument("--output", type=Path, default=BENCH / "results.md")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if unknown := set(names) - set(ORDER):
        p.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    if not levels or min(levels) < 1 or args.runs < 1 or args.duration < 1:
        p.error("need --runs >= 1, --duration >= 1 (whole seconds) and concurrency levels >= 1")
    if not shutil.which("wrk"):
        print(
            "bench: `wrk` is not installed. On Debian/Ubuntu: "
            "sudo apt-get update && sudo apt-get install -y wrk",
            file=sys.stderr,
        )
        return 2

    # Make SIGTERM unwind like Ctrl-C so the servers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, t0 = datetime.datetime.now(datetime.UTC), time.monotonic()
    host_info = machine()
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="asap-bench-") as tmp:
        scratch = Path(tmp)
        try:
            for name in sorted(names, key=ORDER.index):
                port = free_port()
                argv, env, cwd, hint = target_spec(name, port, scratch)
                t = Target(name, port, argv, env)
                targets.append(t)
                start(t, port, cwd, hint, scratch, args.ready_timeout)
                if t.skipped:
                    print(f"bench: skipping {name}: {t.skipped}", file=sys.stderr)
                else:
                    print(
                        f"bench: {name} ready on :{port} ({t.stack}; reply {t.reply_bytes} bytes)",
                        file=sys.stderr,
                    )
            for c in levels:
                for t in targets:
                    if args.warmup > 0 and alive(t):
                        wrk(t, c, args.warmup)
                for i in range(args.runs):
                    for t in targets:
                        if alive(t):
                            r = wrk(t, c, args.duration)
                            t.runs.setdefault(c, []).append(r)
                            print(
                                f"bench: {t.name:9} c={c:<3} run {i + 1}/{args.runs}: "
                                f"{r['rps']:9,.0f} req/s  p99 {r['p99']:7.2f} ms  "
                                f"{r['cpu_us']:6,.0f} µs CPU/req",
                                file=sys.stderr,
                            )
        finally:
            stop_all(targets)
        for t in targets:  # a target that died mid-run: report why
            if t.skipped and t.runs:
                print(f"bench: {t.name}: {t.skipped}", file=sys.stderr)

    table = tables(targets, levels)
    print(table)
    write_results(args.output, args, targets, table, host_info, started, time.monotonic() - t0)
    print(f"\nbench: wrote {args.output}", file=sys.stderr)
    return 0 if any(t.runs for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

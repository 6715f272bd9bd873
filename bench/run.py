#!/usr/bin/env python3
"""Side-by-side HTTP benchmark of POST /asap: ours, ours with production settings, the
reference and a bare Starlette app; what each production feature costs; memory.

    python bench/run.py [--runs 3] [--duration 5] [--warmup 1] [--concurrency 1,16,64]
                        [--feature-concurrency 16] [--targets ours,ours-prod,...]
                        [--memory-requests 100000]

Each target runs as one uvicorn worker in its own process on 127.0.0.1 (bench/common.py
defines them). Load comes from `wrk` (one thread, connections = concurrency) running
bench/post.lua. For every concurrency level each target gets a warm-up, then --runs measured
runs interleaved across targets (so drift on a shared machine hits every target alike); the
tables show medians. Server CPU per request comes from /proc/<pid>/stat (utime+stime, all
threads). A target that cannot start or does not answer POST /asap with a JSON-RPC result is
skipped with the reason. Then bench/memory.py measures `ours` alone.

Writes bench/results.json (every figure) and bench/results.md (tables, feature cost, memory,
the targets of the performance issue, computed); bench/chart.py draws bench/results.png from
the JSON. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import secrets
import shlex
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import memory
import report
from common import (
    BENCH,
    MAIN,
    NOTES,
    ORDER,
    SINGLE,
    Redis,
    RedisError,
    Target,
    alive,
    machine,
    make_target,
    post_once,
    start,
    stop_all,
    task_id,
    wrk,
)


def levels_for(name: str, levels: list[int], feature_levels: list[int]) -> list[int]:
    """Main targets at every level; single features at the feature levels, where `ours` and
    `ours-prod` are measured too (they are what a feature's cost is read against)."""
    if name in SINGLE:
        return feature_levels
    if name in ("ours", "ours-prod"):
        return sorted(set(levels) | set(feature_levels))
    return levels


def verify(t: Target, first_reply: bytes) -> None:
    """Beyond the start-up check (a result, with the token if any): the feature is really on."""
    if t.token:
        t.checks.append("with the bearer token: a JSON-RPC result")
        _, body = post_once(t.port, {"Content-Type": "application/json"})
        if b'"result"' in body:
            t.skipped = "answers without a token: authentication is not on"
            return
        t.checks.append(f"without it: {body.decode(errors='replace')[:160]}")
    if t.idempotency:
        _, body = post_once(t.port, t.headers("bench-check"))
        first, again = task_id(first_reply), task_id(body)
        if not first or first != again:
            t.skipped = f"a repeated X-Idempotency-Key ran a new task ({first} then {again})"
            return
        t.checks.append(f"a repeated X-Idempotency-Key answered the stored task ({first})")


def after_run(t: Target, redis: Redis | None) -> None:
    """What the features left behind: JSON log lines, idempotency records (then deleted)."""
    if "ASAP_LOG_FORMAT" in t.env and t.log and t.log.exists() and t.requests:
        data = t.log.read_bytes()
        lines = data.count(b"\n")
        t.checks.append(
            f"log file: {lines / t.requests:.2f} lines and {len(data) / t.requests:,.0f} bytes "
            f"per request ({len(data) / 2**20:,.1f} MiB)"
        )
    if t.redis_prefix and redis:
        keys = redis.keys(t.redis_prefix + "*")
        records = sum(k.startswith(t.redis_prefix + "idempotency:") for k in keys)
        t.checks.append(
            f"{records:,} idempotency records in Redis for {t.requests:,} requests counted by "
            "wrk (wrk leaves out those in flight when a run stops)"
        )
        redis.delete(keys)
    database = t.cwd / "asap-state.db"
    if t.idempotency and not t.redis_prefix and database.exists():
        with closing(sqlite3.connect(database)) as conn:
            (records,) = conn.execute("SELECT count(*) FROM idempotency").fetchone()
        t.checks.append(
            f"{records:,} idempotency records in SQLite for {t.requests:,} requests counted by "
            "wrk (wrk leaves out those in flight when a run stops)"
        )


def summarize(t: Target) -> dict[str, Any]:
    masked = {
        k: v.replace(t.token, f"<{len(t.token)}-char token>") if t.token else v
        for k, v in t.env.items()
    }
    env = " ".join(f"{k}={v}" for k, v in masked.items())
    results = []
    for c, runs in t.runs.items():

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        detail = {k: int(sum(r[k] for r in runs)) for k in ("non2xx", "rpc_errors", "socket")}
        redis_cpu = med("redis_cpu_us") if t.redis_prefix else math.nan
        results.append(
            {
                "concurrency": c,
                **{k: med(k) for k in ("rps", "p50", "p99", "cpu_us", "cpu_pct")},
                # NaN when Redis's /proc entry cannot be read
                "redis_cpu_us": None if math.isnan(redis_cpu) else redis_cpu,
                "requests": int(sum(r["requests"] for r in runs)),
                "errors": sum(detail.values()),
                "error_detail": detail,
                "runs_rps": [r["rps"] for r in runs],
                "runs_steal_pct": [round(r["steal_pct"], 1) for r in runs],
            }
        )
    return {
        "name": t.name,
        "command": f"{(env + ' ') if env else ''}{shlex.join(t.argv)}",
        "note": NOTES.get(t.name, ""),
        "stack": t.stack,
        "reply_bytes": t.reply_bytes,
        "skipped": t.skipped,
        "checks": t.checks,
        "results": results,
    }


def csv_ints(text: str) -> list[int]:
    return sorted({int(c) for c in text.split(",") if c.strip()})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="measured runs per target and concurrency")
    p.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per target and level")
    p.add_argument("--concurrency", default="1,16,64", help="levels for " + ", ".join(MAIN))
    p.add_argument("--feature-concurrency", default="16", help="levels for " + ", ".join(SINGLE))
    p.add_argument("--targets", default=",".join(ORDER), help="subset of the default")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for the Redis ones")
    p.add_argument(
        "--memory-requests",
        type=int,
        default=100_000,
        help="requests of the memory run (bench/memory.py); 0 skips it",
    )
    p.add_argument("--ready-timeout", type=float, default=30, help="seconds to wait for a server")
    p.add_argument("--output", type=Path, default=BENCH / "results.md")
    p.add_argument("--json", type=Path, default=BENCH / "results.json")
    args = p.parse_args()
    levels, feature_levels = csv_ints(args.concurrency), csv_ints(args.feature_concurrency)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if unknown := set(names) - set(ORDER):
        p.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    if not levels or min(levels + feature_levels) < 1 or args.runs < 1 or args.duration < 1:
        p.error("need --runs >= 1, --duration >= 1 (whole seconds) and concurrency levels >= 1")
    if not shutil.which("wrk"):
        print(
            "bench: `wrk` is not installed. On Debian/Ubuntu: "
            "sudo apt-get update && sudo apt-get install -y wrk",
            file=sys.stderr,
        )
        return 2

    def say(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr)

    # Make SIGTERM unwind like Ctrl-C so the servers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, t0 = datetime.datetime.now(datetime.UTC), time.monotonic()
    host_info = machine()
    run_id, token = secrets.token_hex(4), secrets.token_urlsafe(24)  # a 32-character token
    targets: list[Target] = []
    redis: Redis | None = None
    redis_pid: int | None = None
    mem: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="asap-bench-") as tmp:
        scratch = Path(tmp)
        try:
            for name in sorted(names, key=ORDER.index):
                t = make_target(name, scratch, run_id, args.redis_url, token)
                t.levels = levels_for(name, levels, feature_levels)
                targets.append(t)
                if t.redis_prefix and redis is None:
                    try:
                        redis = Redis(args.redis_url)
                        redis.call("PING")
                        redis_pid = redis.pid()  # its CPU is read too, if /proc lets us
                    except (RedisError, OSError) as exc:
                        redis, t.skipped = None, f"no Redis: {exc}"
                if not t.skipped:
                    reply = start(t, scratch, args.ready_timeout)
                    if not t.skipped:
                        verify(t, reply)
                if t.skipped:
                    say(f"skipping {name}: {t.skipped}")
                else:
                    say(f"{name} ready on :{t.port} ({t.stack}; reply {t.reply_bytes} bytes)")
                    for check in t.checks:
                        say(f"  {name}: {check}")
            for c in sorted({c for t in targets for c in t.levels}):
                here = [t for t in targets if c in t.levels]
                for t in here:
                    if args.warmup > 0 and alive(t):
                        wrk(t, c, args.warmup)
                for i in range(args.runs):
                    for t in here:
                        if alive(t):
                            r = wrk(t, c, args.duration, redis_pid if t.redis_prefix else None)
                            t.runs.setdefault(c, []).append(r)
                            say(
                                f"{t.name:22} c={c:<3} run {i + 1}/{args.runs}: "
                                f"{r['rps']:9,.0f} req/s  p99 {r['p99']:7.2f} ms  "
                                f"{r['cpu_us']:6,.0f} µs CPU/req  steal {r['steal_pct']:4.1f}%"
                            )
        finally:
            stop_all(targets)
            for t in targets:
                after_run(t, redis)  # also deletes the Redis keys, whatever happened
            if redis:
                redis.close()
        for t in targets:  # a target that died mid-run: report why
            if t.skipped and t.runs:
                say(f"{t.name}: {t.skipped}")
        if args.memory_requests > 0:
            say(f"memory: `ours` alone, {args.memory_requests:,} requests")
            mem = memory.measure(
                scratch, args.memory_requests, ready_timeout=args.ready_timeout, log=say
            )

    res: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": host_info,
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {
            "runs": args.runs,
            "duration": args.duration,
            "warmup": args.warmup,
            "levels": levels,
            "feature_levels": feature_levels,
            "elapsed_s": round(time.monotonic() - t0, 1),
        },
        "targets": [summarize(t) for t in targets],
        "memory": mem,
    }
    res["goals"] = report.goals(res)
    args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    page = report.render(res)
    args.output.write_text(page)
    print(page)
    say(f"wrote {args.output} and {args.json}")
    return 0 if any(t.runs for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())

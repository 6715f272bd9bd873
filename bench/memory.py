#!/usr/bin/env python3
"""Resident memory of `ours` (the defaults) idle and over a long run of echo requests.

    python bench/memory.py [--requests 100000] [--concurrency 16]

Starts `ours` alone (the same server as bench/run.py's `ours` target) and reads VmRSS from
/proc/<pid>/status: idle after start-up (one check request, then 2 s quiet); then drives
--requests echo requests with wrk (one thread, --concurrency connections). wrk runs for a
duration, not a count, so short runs are chained until wrk's request count reaches the total,
each sized from the previous run's rate to land near the checkpoints; RSS is read after the
run that passes 20% of the total (20,000 of 100,000) and after the last one, sampled every
second under load (the maximum is reported), and read again 2 s after the load stops.

"No growth" means: RSS after the total minus RSS after its first 20% < GROWTH_TOLERANCE_MB
(the first 20% warm caches, pools and allocator arenas up; growth after that would be a leak).

bench/run.py runs this after its throughput runs (--memory-requests) and writes the figures
into bench/results.md; run alone, it prints them. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import alive, log_tail, make_target, rss_mb, start, stop_all, wrk
from report import memory_section

IDLE_TARGET_MB = 60.0
GROWTH_TOLERANCE_MB = 5.0
EARLY_SHARE = 0.2  # the first checkpoint: 20,000 of 100,000
SETTLE_S = 2.0


class Sampler(threading.Thread):
    """VmRSS of pid every `every` seconds until stopped."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.is_set():
            try:
                self.samples.append((round(time.monotonic() - t0, 1), rss_mb(self.pid)))
            except (OSError, RuntimeError):
                return  # the process is gone
            self.halt.wait(self.every)


def measure(
    scratch: Path,
    requests: int,
    conns: int = 16,
    ready_timeout: float = 30,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start `ours` alone, measure, stop it. The returned dict goes into results.json."""
    t = make_target("ours", scratch / "memory", secrets.token_hex(4), "", "")
    out: dict[str, Any] = {
        "requests_target": requests,
        "concurrency": conns,
        "idle_target_mb": IDLE_TARGET_MB,
        "tolerance_mb": GROWTH_TOLERANCE_MB,
        "command": " ".join(f"{k}={v}" for k, v in t.env.items()) + " " + " ".join(t.argv),
    }
    try:
        start(t, scratch / "memory", ready_timeout)
        if t.skipped or t.proc is None:
            return out | {"skipped": t.skipped}
        pid = t.proc.pid
        time.sleep(SETTLE_S)
        out["idle_mb"] = rss_mb(pid)
        log(f"memory: ours idle {out['idle_mb']:.1f} MiB")
        early_goal = max(1, round(requests * EARLY_SHARE))
        total, errors, busy, rate = 0, 0, 0.0, 0.0
        chunks: list[tuple[int, float]] = []  # (requests so far, MiB) after each wrk run
        sampler = Sampler(pid)
        sampler.start()
        try:
            while total < requests:
                goal = early_goal if total < early_goal else requests
                # the first run probes the rate; later ones aim at the next checkpoint
                secs = 2 if not rate else min(5, max(1, math.ceil((goal - total) / rate)))
                r = wrk(t, conns, secs)
                if not alive(t):
                    return out | {"skipped": t.skipped}
                total += int(r["requests"])
                errors += int(r["non2xx"] + r["rpc_errors"] + r["socket"])
                busy += secs
                rate = r["rps"] or 1.0
                chunks.append((total, rss_mb(pid)))
                log(f"memory: {total:>9,} requests  {chunks[-1][1]:6.1f} MiB")
                if "early" not in out and total >= early_goal:
                    out["early"] = {"requests": total, "rss_mb": chunks[-1][1]}
        finally:
            sampler.halt.set()
            sampler.join()
        out["final"] = {"requests": total, "rss_mb": chunks[-1][1]}
        time.sleep(SETTLE_S)
        out["after_mb"] = rss_mb(pid)
        out["max_load_mb"] = max([mb for _, mb in sampler.samples] + [c[1] for c in chunks])
        out["growth_mb"] = out["final"]["rss_mb"] - out["early"]["rss_mb"]
        out["errors"] = errors
        out["rps"] = total / busy if busy else 0.0
        out["chunks"] = chunks
        out["samples"] = sampler.samples
        return out
    except Exception as exc:
        return out | {"skipped": f"{type(exc).__name__}: {exc}; last output:{log_tail(t)}"}
    finally:
        stop_all([t])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000, help="total echo requests")
    p.add_argument("--concurrency", type=int, default=16, help="wrk connections")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        p.error("need --requests >= 1 and --concurrency >= 1")
    with tempfile.TemporaryDirectory(prefix="asap-bench-") as tmp:
        m = measure(
            Path(tmp), args.requests, args.concurrency, log=lambda s: print(s, file=sys.stderr)
        )
    if args.json:
        args.json.write_text(json.dumps(m, indent=1))
    if m.get("skipped"):
        print(f"memory: skipped: {m['skipped']}", file=sys.stderr)
        return 1
    print("\n".join(memory_section(m)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

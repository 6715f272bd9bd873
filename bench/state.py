#!/usr/bin/env python3
"""Storage benchmark: snapshot append and get throughput per backend.

    python bench/state.py [--ops 2000]

One process, sequential awaits (what one task's checkpoints see), on memory://, a SQLite file
in a temporary folder, and the Redis at 127.0.0.1:6379 (skipped if absent). Writes
bench/state.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asap.models.ids import generate_id  # noqa: E402
from asap.state import open_storage  # noqa: E402

DATA = {"results": {f"s{i}": {"status": "completed", "result": {"n": i}} for i in range(8)}}


async def measure(url: str, ops: int) -> tuple[float, float]:
    storage = await open_storage(url)
    try:
        task = "bench_" + generate_id()
        started = time.perf_counter()
        for _ in range(ops):
            await storage.snapshots.append(task, DATA, checkpoint=True)
        appends = ops / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(ops):
            await storage.snapshots.get(task)
        gets = ops / (time.perf_counter() - started)
        await storage.snapshots.delete(task)
        return appends, gets
    finally:
        await storage.aclose()


async def main_async(ops: int) -> list[str]:
    folder = tempfile.mkdtemp(prefix="asap-bench-")
    backends = {
        "memory://": "memory://",
        "sqlite (file, WAL)": f"sqlite:///{folder}/bench.db",
        "redis (127.0.0.1)": f"redis://127.0.0.1:6379/0?prefix=asap-bench-{generate_id()}:",
    }
    rows = []
    for name, url in backends.items():
        try:
            appends, gets = await measure(url, ops)
        except Exception as exc:  # a backend that is not there is reported, not fatal
            rows.append(f"| {name} | skipped: {exc} | |")
            continue
        rows.append(f"| {name} | {appends:,.0f} | {gets:,.0f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "state.md")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args.ops))
    text = (
        "\n".join(
            [
                "# Storage benchmark",
                "",
                f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
                f"- command: `python bench/state.py --ops {args.ops}`; one task, sequential awaits,"
                " an 8-step orchestration state per snapshot",
                "",
                "| backend | append (checkpoint) per s | get latest per s |",
                "|---|---:|---:|",
                *rows,
            ]
        )
        + "\n"
    )
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

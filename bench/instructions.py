#!/usr/bin/env python3
"""Instructions per echo request, counted by the CPU: a figure that barely moves when the
machine is busy, for comparing two versions of the code.

    python bench/instructions.py                       # this checkout
    python bench/instructions.py --root /tmp/old       # another checkout (git worktree add ...)
    python bench/instructions.py --app bare            # the bare Starlette app of bench/
    python bench/instructions.py --counter callgrind   # where perf has no counters (VMs)

Runs POST /asap (the body of bench/post.lua) in process, straight into the ASGI app with its
lifespan running: 16 concurrent callers, no sockets, so uvicorn and the kernel are left out.
``perf stat -e instructions:u`` counts two runs of different lengths; their difference divided
by the extra requests is the cost of one request (start-up and warm-up cancel out). Needs
Linux ``perf`` (Debian: linux-perf) with access to the counters; on a virtual machine without
them, ``--counter callgrind`` counts with valgrind instead (about 50 times slower, so use fewer
requests, e.g. ``--requests 1600``; the same figure to within 1% run after run, whatever else
the machine is doing). Both count every thread of the process, the SQLite writer's included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def serve(app_name: str, requests: int) -> None:
    """The measured loop (run in a child process by :func:`count`)."""
    from asgi_lifespan import LifespanManager
    from common import BODY

    if app_name == "ours":
        from asap.server import app
    else:
        from bare_app import app

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/asap",
        "raw_path": b"/asap",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }

    async def one() -> None:
        messages = [{"type": "http.request", "body": BODY, "more_body": False}]
        status: list[int] = []

        async def receive() -> dict[str, object]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))  # type: ignore[call-overload]

        await app(dict(scope), receive, send)
        if status != [200]:
            raise SystemExit(f"POST /asap answered {status}")

    async def main() -> None:
        async with LifespanManager(app):
            for _ in range(1000):  # warm-up
                await one()

            async def caller(n: int) -> None:
                for _ in range(n):
                    await one()

            await asyncio.gather(*(caller(requests // 16) for _ in range(16)))

    asyncio.run(main())


def count(root: Path, app_name: str, requests: int, counter: str = "perf") -> int:
    """Instructions (user mode) of a whole child run of ``requests`` requests."""
    env = {
        **os.environ,
        "ASAP_LOG_LEVEL": os.environ.get("ASAP_LOG_LEVEL", "WARNING"),
        "ASAP_RATE_LIMIT": os.environ.get("ASAP_RATE_LIMIT", "1000000/second"),
        "PYTHONPATH": os.pathsep.join([str(root), str(BENCH)]),
    }
    code = (
        f"import sys; sys.path[:0] = [{str(root)!r}, {str(BENCH)!r}]; "
        f"from instructions import serve; serve({app_name!r}, {requests})"
    )
    if counter == "callgrind":
        tool = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    else:
        tool = ["perf", "stat", "-x", ",", "-e", "instructions:u"]
    done = subprocess.run(
        [*tool, sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"the measured run failed:\n{done.stderr[-2000:]}")
    for line in done.stderr.splitlines():
        if counter == "callgrind" and "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
        if counter == "perf" and "instructions" in line and line.split(",")[0].isdigit():
            return int(line.split(",")[0])
    raise SystemExit(f"{counter} reported no instruction count:\n{done.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=BENCH.parent, help="checkout to measure")
    parser.add_argument("--app", choices=["ours", "bare"], default="ours")
    parser.add_argument("--requests", type=int, default=16000, help="extra requests counted")
    parser.add_argument(
        "--counter", choices=["perf", "callgrind"], default="perf", help="what counts them"
    )
    args = parser.parse_args()
    program = "perf" if args.counter == "perf" else "valgrind"
    if shutil.which(program) is None:
        package = "linux-perf" if program == "perf" else "valgrind"
        print(f"bench/instructions.py --counter {args.counter} needs {program} ({package})")
        return 2
    root = args.root.resolve()
    short = count(root, args.app, args.requests // 2, args.counter)
    long = count(root, args.app, args.requests // 2 + args.requests, args.counter)
    print(f"{args.app} at {root}: {(long - short) // args.requests:,} instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())

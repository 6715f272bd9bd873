"""The ``asap`` command: ``asap serve`` runs an agent, ``asap demo`` runs the tutorial.

Options map one to one onto :class:`asap.settings.Settings` (``--agent-id`` is
``ASAP_AGENT_ID``); the logic lives in the library, not here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    for option in ("agent_id", "agent_name", "skills", "public_url", "log_format", "log_level"):
        value = getattr(args, option)
        if value is not None:
            os.environ[f"ASAP_{option.upper()}"] = value
    uvicorn.run(
        "asap.server:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from asap.examples.run_demo import main as demo

    return demo([])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asap`` console script."""
    parser = argparse.ArgumentParser(prog="asap", description="ASAP agents.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve an agent (uvicorn asap.server:app)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--agent-id")
    serve.add_argument("--agent-name")
    serve.add_argument("--skills", help="comma-separated modules with @skill functions")
    serve.add_argument("--public-url")
    serve.add_argument("--log-format", choices=["console", "json"])
    serve.add_argument("--log-level")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="two echo workers and an orchestration")
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

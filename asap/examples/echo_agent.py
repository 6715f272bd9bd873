"""An echo agent: ``python -m asap.examples.echo_agent --host 127.0.0.1 --port 8001``.

Serves the shipped ``echo`` skill as ``urn:asap:agent:echo-agent`` (override with
``--agent-id``), with the manifest endpoint ``http://<host>:<port>/asap``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn
from starlette.applications import Starlette

from asap.settings import Settings
from asap.transport.app import create_app

__all__ = ["create_echo_app", "main"]

DEFAULT_AGENT_ID = "urn:asap:agent:echo-agent"


def create_echo_app(
    host: str = "127.0.0.1", port: int = 8001, agent_id: str = DEFAULT_AGENT_ID
) -> Starlette:
    """The echo agent's app, as the reference's echo agent describes itself (spec 7)."""
    settings = Settings.from_env(
        agent_id=agent_id,
        agent_name="Echo Agent",
        agent_version="0.3.0",
        agent_description="Echoes task input as output",
        skills=("skills.echo",),
        public_url=f"http://{host}:{port}",
    )
    return create_app(settings)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(description="Run an ASAP echo agent.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--agent-id", default=DEFAULT_AGENT_ID)
    args = parser.parse_args(argv)
    app = create_echo_app(args.host, args.port, args.agent_id)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None)


if __name__ == "__main__":
    main()

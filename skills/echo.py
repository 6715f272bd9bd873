"""The echo skill: answers ``{"echoed": <input>}``, exactly as the reference echo agent does."""

from __future__ import annotations

from typing import Any

from asap import skill


@skill("echo", description="Echo back the input")
async def echo(input: dict[str, Any]) -> dict[str, Any]:
    """Return the input unchanged under ``echoed``."""
    return {"echoed": input}

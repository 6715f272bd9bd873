"""A second ``echo`` skill: serving it beside ``skills.echo`` must fail at start-up."""

from __future__ import annotations

from typing import Any

from asap import skill


@skill("echo")
async def another_echo(data: dict[str, Any]) -> dict[str, Any]:
    return data

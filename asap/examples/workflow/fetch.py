"""``fetch``: the first step of the workflow, returns records about a topic (built in, offline)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from asap import skill

CORPUS: dict[str, list[str]] = {
    "agents": [
        "Agents exchange envelopes over a small JSON-RPC binding",
        "An orchestrator fans work out to specialised workers",
        "Idempotency keys make retried requests safe to resend",
    ],
    "weather": [
        "Morning fog clears by noon",
        "A light breeze from the west keeps the afternoon cool",
    ],
}


class FetchInput(BaseModel):
    topic: str = Field(min_length=1)


class Records(BaseModel):
    topic: str
    records: list[str]


@skill("fetch", description="Fetch the records about a topic")
async def fetch(data: FetchInput) -> Records:
    """Return the records of ``topic`` (none for an unknown topic)."""
    return Records(topic=data.topic, records=CORPUS.get(data.topic, []))

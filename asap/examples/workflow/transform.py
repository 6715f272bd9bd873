"""``transform``: the second step, normalises the fetched records and counts their words."""

from __future__ import annotations

from typing import Any

from asap import skill


@skill("transform", description="Normalise records and count their words")
async def transform(data: dict[str, Any]) -> dict[str, Any]:
    """Take ``previous_result.records`` (the fetch step's output) and annotate each record."""
    fetched = data.get("previous_result") or {}
    records = [
        {"text": text.strip().lower(), "words": len(text.split())}
        for text in fetched.get("records", [])
    ]
    return {"topic": fetched.get("topic"), "records": records}

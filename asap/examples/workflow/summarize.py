"""``summarize``: the last step, one line about the transformed records."""

from __future__ import annotations

from typing import Any

from asap import skill


@skill("summarize", description="Summarise transformed records")
async def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Summarise ``previous_result`` (the transform step's output)."""
    transformed = data.get("previous_result") or {}
    records = transformed.get("records", [])
    total = sum(record["words"] for record in records)
    longest = max(records, key=lambda record: record["words"], default=None)
    return {
        "topic": transformed.get("topic"),
        "count": len(records),
        "total_words": total,
        "summary": (
            f"{len(records)} records about {transformed.get('topic')}, {total} words; "
            f"longest: {longest['text']!r}"
            if longest
            else "nothing to summarise"
        ),
    }

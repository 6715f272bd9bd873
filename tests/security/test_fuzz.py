"""Fuzzing a real agent process with hostile input (security).

What this proves: an agent started the way a user starts it (``python -m uvicorn
asap.server:app`` in its own process, JSON logs, the shipped skills) survives more than 10,000
seeded, deterministic hostile requests sent over 12 concurrent connections:

- no reply is an HTTP 5xx, no JSON-RPC reply is ``-32603`` (internal error), and every reply
  labelled ``application/json`` is JSON;
- the server's log holds no traceback, no line at level error or critical, none of the events
  the server logs for internal failures (``asap.request.internal_error``,
  ``asap.server.unhandled_error``, ``asap.handler.error``, ...) and nothing that is not a JSON
  log line (an unexpected write to stderr);
- afterwards ``GET /health`` and a valid echo request succeed, and SIGTERM stops it cleanly;
- its resident memory (``VmRSS``) is back within ``RSS_MARGIN_MB`` of a baseline measured
  after a warm-up of 300 valid requests and the 14 bodies of ~10 MiB, so hostile input leaves
  nothing behind that grows with the number of requests (caches keyed by input, buffers,
  tasks that never end).

The inputs (``Fuzzer``): mutated ``task.request`` (and other) envelopes, mutated JSON-RPC
frames, batches, broken bytes (truncated JSON, BOMs, non-UTF-8, deep nesting), hostile
headers, compressed bodies (truncated, mislabelled, bombs), other routes and methods, bodies
at and past the size limit, and broken HTTP (Content-Length mismatches, bad chunked encoding,
broken request lines and headers) written to raw sockets. The generator is seeded (``SEED``),
so every run sends the same inputs; only timestamps follow the clock. Requests are written
byte for byte by a small keep-alive client (``Connection``): httpx would add and normalize
headers, refuse some, and costs ~3 ms a request on a 2-core machine shared with the server.

The agent runs with:

- SQLite storage in the test's temporary directory, not ``memory://``: the memory store keeps
  every accepted task by design, so the RSS check would measure how many fuzzed requests
  happened to be valid rather than whether anything leaks;
- no rate limit, so that every input reaches the pipeline (limits have their own tests);
- a maintenance loop every ``TRIM_PERIOD`` second, so the heap trim that follows it
  (``asap.memory``) runs while RSS is read.

``pytest tests/security/test_fuzz.py -s`` prints the status histogram and the RSS figures.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import signal
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import brotli
import httptools
import httpx
import orjson
import pytest

from asap.process import AgentProcess
from tests.conftest import asap_send

pytestmark = pytest.mark.e2e

SEED = 0x5EC0F022
MIN_INPUTS = 10_000
CONCURRENCY = 12
WARMUP_REQUESTS = 300
RSS_MARGIN_MB = 15
"""Allowed growth of the agent's RSS over its baseline (after the warm-up and the heavy bodies).

Observed on a 2-core machine: +3.5 to +6 MB after the 10,700 other inputs (the Python heap,
traced with tracemalloc, grows by under 1 MB: manifests cached per Host, short payload types
normalized; the rest is allocator fragmentation). With the unbounded payload-type cache this
test found put back, the same run ends +18 to +22 MB, so the margin fails on that bug; spread
over the inputs it also catches any leak of more than ~1.4 KB per request."""
TRIM_PERIOD = 1
"""Seconds between the agent's heap trims (``ASAP_TASK_LEASE_SECONDS`` / 3)."""
REPLY_TIMEOUT = 30
"""Seconds a request may wait for (more of) its reply."""
PHASE_DEADLINE = 300
"""Seconds a phase may take (about 30 s on a 2-core machine): past it the agent hangs."""
MAX_BODY = 10 * 1024 * 1024  # the server's default ASAP_MAX_REQUEST_SIZE
AGENT_ID = "urn:asap:agent:fuzz-target"
SENDER = "urn:asap:agent:fuzzer"

INTERNAL_ERROR_EVENTS = frozenset(
    {
        "asap.request.internal_error",
        "asap.server.unhandled_error",
        "asap.response.unserializable",
        "asap.handler.error",
        "asap.tasks.maintenance_failed",
        "asap.tasks.persist_failed",
        "asap.tasks.outbox_write_failed",
        "asap.orchestration.checkpoint_failed",
    }
)
"""What the server logs when something fails inside it (``asap/transport``, ``asap/tasks.py``)."""
BAD_LEVELS = frozenset({"error", "critical", "exception", "fatal"})


# -- JSON the standard encoder cannot write --------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text put into a document verbatim: ``1e999``, ``NaN``, 100,000 levels of nesting."""

    text: str


def to_json(value: Any, rng: random.Random) -> bytes:
    """``value`` as JSON bytes; lone surrogates become invalid UTF-8 when not escaped."""
    raws: list[str] = []

    def swap(node: Any) -> Any:
        if isinstance(node, Raw):
            raws.append(node.text)
            return f"\x01RAW{len(raws) - 1}\x01"
        if isinstance(node, dict):
            return {key: swap(item) for key, item in node.items()}
        if isinstance(node, list):
            return [swap(item) for item in node]
        return node

    compact = rng.random() < 0.85
    text = json.dumps(
        swap(value),
        ensure_ascii=rng.random() < 0.7,
        allow_nan=True,
        separators=(",", ":") if compact else (", ", ": "),
    )
    for index, raw in enumerate(raws):
        text = text.replace(f'"\\u0001RAW{index}\\u0001"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


# -- palettes ----------------------------------------------------------------------------------

SCALARS: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    Raw("18446744073709551616"),
    Raw("-9223372036854775809"),
    Raw("1" * 400),
    0.0,
    -0.0,
    1.5,
    -1e-300,
    1e308,
    5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
    Raw("1e999"),
    Raw("-1E+999"),
    Raw("01"),
    Raw("1."),
    Raw(".5"),
    Raw("0x1F"),
    Raw("+1"),
    Raw("undefined"),
    Raw("'single'"),
    Raw("True"),
    Raw("nul"),
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x7f\x1b[31m",
    "\ud800",
    "\udfff",
    "\udc00\ud800",
    "\U0001f600",
    "\u202eRTL",
    "\ufeffBOM",
    "\u2028\u2029",
    "e\u0301\u0301\u0301",
    "\uffff\ufffe",
    "\U0010ffff",
    "null",
    "true",
    "{}",
    "[]",
    "NaN",
    "urn:asap:agent:x",
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "%00%0d%0a",
    "../../../../etc/passwd",
    "${jndi:ldap://x/a}",
    "\r\nX-Injected: 1",
    "{{7*7}}",
    "%s%n%x",
    [],
    {},
    [None],
    [[[]]],
    {"": None},
    {"__proto__": {"admin": True}},
    {"$ref": "#"},
]

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz0123456789-_.:",
    "".join(map(chr, range(0, 32))) + "\x7f",
    "".join(map(chr, range(0x80, 0x100))),
    "\u0301\u200b\u200d\u202e\u2028\u2029\ufeff\ufffd\uffff",
    "\U0001f600\U0001f4a9\U00010348\U0010ffff",
    "\ud800\udbff\udc00\udfff",
    "\"\\/'`{}[]<>",
]

URNS = [
    SENDER,
    AGENT_ID,
    "",
    "urn:asap:agent:",
    "urn:asap:agent:UPPER",
    "urn:asap:agent:a:b:c",
    "urn:asap:agent:a_b",
    "urn:asap:agent:" + "a" * 241,  # 256 characters: the longest valid
    "urn:asap:agent:" + "a" * 242,
    "urn:asap:agent:" + "a" * 100_000,
    "URN:ASAP:AGENT:x",
    "urn:asap:agent:x\n",
    "urn:asap:agent:x\x00",
    " urn:asap:agent:x",
    "urn:asap:agent:\u00e9",
    "urn:asap:agent:-",
    "urn:asap:agent:x:",
    "urn:asap:tool:x",
    "http://evil.example/agent",
]

PAYLOAD_TYPES = [
    "task.request",
    "TaskRequest",
    "task_request",
    "TASK.REQUEST",
    "task..request",
    "task.request\x00",
    "ta\u015fk.request",
    "task.response",
    "task.cancel",
    "state.query",
    "state.restore",
    "task.stream",
    "TaskStream",
    "task.update",
    "message.send",
    "mcp.tool_call",
    "mcp.tool_result",
    "MessageAck",
    "",
    ".",
    "\U0001f642",
]

SKILLS = [
    "echo",
    "ECHO",
    "echo ",
    "",
    "orchestrate",
    "unknown-skill",
    "../echo",
    "echo\x00",
    "\u0435cho",  # Cyrillic e
]

VERSIONS = ["0.1", "", "99", "0.1\x00", "2.2", "0.1" * 10_000]

CONTENT_TYPES = [
    b"application/json",
    b"text/plain",
    b"application/xml",
    b"application/json; charset=utf-16",
    b"multipart/form-data; boundary=x",
    b"application/x-www-form-urlencoded",
    b"",
    b"*/*",
    b"application/json" * 500,
    b"application/json; charset=\xff",
]

ASAP_VERSIONS = [
    b"",
    b" ",
    b"2.2",
    b"2.1",
    b"2.2, 2.1",
    b"9.9, 2.1",
    b"9.9",
    b"99.0",
    b",,,",
    b"2.2;q=1",
    b"2.1\t",
    b"\xe9",
    b"2" * 8_000,
    b"9.9," * 5_000 + b"2.2",
]

ENCODING_LABELS = [
    b"gzip",
    b"br",
    b"gzip, br",
    b"br, gzip",
    b"deflate",
    b"identity",
    b"IDENTITY",
    b"zstd",
    b"compress",
    b"x-gzip",
    b"gzip;q=1",
    b"",
    b" ",
    b",",
    b"identity, identity",
    b"GZIP",
    b"gzip" * 2_000,
]

AUTHORIZATIONS = [
    b"Bearer",
    b"Bearer ",
    b"Bearer x",
    b"bearer x",
    b"Basic !!!",
    b"Basic " + b"QUxBRERJTjpPUEVOIFNFU0FNRQ==",
    b"Bearer " + b"a" * 8_000,
    b'Digest username="x", nonce="y"',
    b"\xff\xfe",
    b"Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
    b"Bearer null",
    b"Bearer " + b"a.b.c" * 1_000,
]

TRACEPARENTS = [
    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
    b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    b"garbage",
    b"00-" + b"a" * 10_000,
    b"",
]


HUGE_SIZES = [2_000, 70_000, 1_100_000]


def value_pool() -> dict[str, list[Raw]]:
    """Large values, serialized once: long strings, deep nesting (both sides of the limit of
    128 levels, and far past it), large containers.

    Containers stop at 10,000 elements: with 50,000 the run takes 10 s longer and leaves RSS
    ~20 MB higher, not in live memory (the Python heap is back within 1 MB) but in pymalloc
    arenas pinned by a few survivors, a high-water mark that would hide what the RSS check
    looks for. The 10 MiB body of 2.6 million empty objects (``case_size``) stays.
    """
    pool: dict[str, list[Raw]] = {}
    for size in HUGE_SIZES:
        pool[f"huge-{size}"] = [
            Raw(json.dumps(unit * (size // len(unit.encode())), ensure_ascii=ascii))
            for unit in ["A", "\U0001f600", "\x00", "\\", '"', "\u00e9"]
            for ascii in (True, False)
        ]
    pool["nested"] = []
    for depth in [3, 50, 120, 123, 124, 125, 126, 127, 128, 200, 1_000, 100_000]:
        pool["nested"].append(Raw("[" * depth + "]" * depth))
        pool["nested"].append(Raw('{"a":' * depth + "1" + "}" * depth))
        pool["nested"].append(Raw('{"k":[' * (depth // 2) + '"x"' + "]}" * (depth // 2)))
    pool["container"] = []
    for size in [100, 1_000, 10_000]:
        pool["container"] += [
            Raw(json.dumps(list(range(size)))),
            Raw(json.dumps({f"k{i}": i for i in range(size)})),
            Raw("[" + ",".join(["{}"] * size) + "]"),
            Raw("[" + ",".join(["null", "true", "-0.0", '""', "1e308"] * (size // 5)) + "]"),
        ]
    return pool


class Fuzzer:
    """Deterministic hostile requests (``cases``), from one seeded random generator."""

    CATEGORIES = {
        "envelope": 4_300,
        "jsonrpc": 1_500,
        "batch": 600,
        "bytes": 1_300,
        "headers": 1_200,
        "compression": 600,
        "routes": 500,
        "stream": 300,
        "raw": 400,
    }
    HEAVY = 14

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.serial = 0
        self.sized = 0
        self.pool = value_pool()
        self.bombs: dict[tuple[str, bytes, int], bytes] = {}

    # -- values ------------------------------------------------------------------------------

    def text(self) -> str:
        alphabet = self.rng.choice(ALPHABETS)
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(1, 48)))

    def huge(self) -> Raw:
        size = self.rng.choices(HUGE_SIZES, weights=[70, 27, 3])[0]
        return self.rng.choice(self.pool[f"huge-{size}"])

    def nested(self) -> Raw:
        return self.rng.choice(self.pool["nested"])

    def container(self) -> Raw:
        return self.rng.choice(self.pool["container"])

    def hostile(self) -> Any:
        roll = self.rng.random()
        if roll < 0.55:
            return self.rng.choice(SCALARS)
        if roll < 0.72:
            return self.text()
        if roll < 0.82:
            return self.huge()
        if roll < 0.92:
            return self.nested()
        return self.container()

    def ulid(self) -> str:
        return "".join(self.rng.choice("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(26))

    def timestamp(self) -> Any:
        now = datetime.now(UTC)
        choices: list[Any] = [
            now,
            now - timedelta(seconds=10),
            now + timedelta(seconds=20),
            now + timedelta(seconds=31),
            now - timedelta(seconds=301),
            "2020-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59-14:00",
            "0001-01-01T00:00:00Z",
            "0001-01-01T00:00:00+14:00",
            now.replace(tzinfo=None),
            now.strftime("%Y-%m-%d %H:%M:%SZ"),
            now.strftime("%Y-%m-%dT%H:%M:%S.123456789Z"),
            "2026-06-01T24:00:00Z",
            "2026-02-30T00:00:00Z",
            "T",
            "now",
            int(now.timestamp()),
            int(now.timestamp() * 1000),
            now.timestamp(),
            10**20,
            -(2**63),
            "+275760-09-13T00:00:00Z",
            "2026-06-01T12:00:00+99:99",
        ]
        value = self.rng.choice(choices)
        if isinstance(value, datetime):
            text = value.isoformat()
            return text.replace("+00:00", "Z") if self.rng.random() < 0.5 else text
        return value if self.rng.random() < 0.85 else self.hostile()

    def pick(self, palette: list[Any], hostile: float = 0.2) -> Any:
        return self.hostile() if self.rng.random() < hostile else self.rng.choice(palette)

    def idempotency_key(self) -> Any:
        return self.rng.choice(
            [
                f"key-{self.rng.randrange(8)}",  # a small pool: replays and conflicts
                self.ulid(),
                "",
                "k",
                "k" * 70_000,
                "\u00e9\U0001f600",
                "a\x00b",
                0,
                -1,
                [],
                {},
                None,
                True,
                self.hostile(),
            ]
        )

    # -- valid requests ----------------------------------------------------------------------

    def envelope(self, payload_type: str, payload: dict[str, Any]) -> dict[str, Any]:
        envelope: dict[str, Any] = {
            "asap_version": "0.1",
            "sender": SENDER,
            "recipient": AGENT_ID,
            "payload_type": payload_type,
            "payload": payload,
        }
        if self.rng.random() < 0.5:  # every field, as the Python client sends it
            envelope = {
                "id": self.ulid(),
                "asap_version": "0.1",
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                **{k: v for k, v in envelope.items() if k != "asap_version"},
                "correlation_id": None,
                "trace_id": self.rng.choice(
                    [None, "trace_fuzz", f"{self.rng.getrandbits(128):032x}"]
                ),
                "requires_ack": False,
                "extensions": None,
            }
        return envelope

    def task_request(self, skill: str = "echo") -> dict[str, Any]:
        payload: dict[str, Any] = {
            "conversation_id": f"conv_fuzz_{self.rng.randrange(100)}",
            "skill_id": skill,
            "input": {"message": "hello", "n": self.rng.randrange(1000), "nested": {"ok": True}},
        }
        if skill == "orchestrate":
            payload["input"] = {
                "mode": self.rng.choice(["sequential", "parallel", "graph"]),
                "steps": [
                    {"id": "a", "peer": "nobody", "skill": "echo", "input": {"n": 1}},
                    {"id": "b", "peer": "nobody", "skill": "echo", "on_error": "retry"},
                ],
            }
        if self.rng.random() < 0.3:
            payload["parent_task_id"] = None
            payload["config"] = {
                "timeout_seconds": self.rng.choice([None, 5, 30]),
                "priority": "high",
                "idempotency_key": None,
                "streaming": False,
            }
        return payload

    def valid_frame(self) -> dict[str, Any]:
        self.serial += 1
        kind = self.rng.choices(
            ["echo", "orchestrate", "cancel", "query", "restore", "other"],
            weights=[70, 8, 6, 6, 5, 5],
        )[0]
        task_id = "task_" + self.ulid()
        if kind == "echo":
            envelope = self.envelope("task.request", self.task_request())
        elif kind == "orchestrate":
            envelope = self.envelope("task.request", self.task_request("orchestrate"))
        elif kind == "cancel":
            envelope = self.envelope("task.cancel", {"task_id": task_id, "reason": "fuzz"})
        elif kind == "query":
            envelope = self.envelope("state.query", {"task_id": task_id})
        elif kind == "restore":
            envelope = self.envelope(
                "state.restore", {"task_id": task_id, "snapshot_id": self.ulid()}
            )
        else:
            envelope = self.envelope("message.send", {"task_id": task_id})
        frame: dict[str, Any] = {
            "jsonrpc": "2.0",
            "method": "asap.send",
            "params": {"envelope": envelope},
            "id": f"fuzz-{self.serial}",
        }
        if self.rng.random() < 0.1:
            frame["params"]["idempotency_key"] = f"key-{self.rng.randrange(8)}"
        return frame

    def frame_bytes(self, frame: Any) -> bytes:
        return to_json(frame, self.rng)

    # -- mutations ---------------------------------------------------------------------------

    TARGETS: list[tuple[str, ...]] = [
        ("jsonrpc",),
        ("method",),
        ("id",),
        ("params",),
        ("params", "envelope"),
        ("params", "idempotency_key"),
        ("params", "envelope", "id"),
        ("params", "envelope", "asap_version"),
        ("params", "envelope", "timestamp"),
        ("params", "envelope", "timestamp"),
        ("params", "envelope", "sender"),
        ("params", "envelope", "recipient"),
        ("params", "envelope", "payload_type"),
        ("params", "envelope", "payload_type"),
        ("params", "envelope", "payload"),
        ("params", "envelope", "correlation_id"),
        ("params", "envelope", "trace_id"),
        ("params", "envelope", "requires_ack"),
        ("params", "envelope", "extensions"),
        ("params", "envelope", "extensions", "nonce"),
        ("params", "envelope", "extensions", "nonce"),
        ("params", "envelope", "extensions", "trace_id"),
        ("params", "envelope", "extensions", "snapshot"),
        ("params", "envelope", "payload", "conversation_id"),
        ("params", "envelope", "payload", "skill_id"),
        ("params", "envelope", "payload", "skill_id"),
        ("params", "envelope", "payload", "input"),
        ("params", "envelope", "payload", "input"),
        ("params", "envelope", "payload", "input", "steps"),
        ("params", "envelope", "payload", "input", "mode"),
        ("params", "envelope", "payload", "parent_task_id"),
        ("params", "envelope", "payload", "task_id"),
        ("params", "envelope", "payload", "config"),
        ("params", "envelope", "payload", "config", "timeout_seconds"),
        ("params", "envelope", "payload", "config", "idempotency_key"),
        ("params", "envelope", "payload", "config", "temperature"),
        ("params", "envelope", "payload", "config", "unknown"),
    ]

    def value_for(self, path: tuple[str, ...]) -> Any:
        name = path[-1]
        rng = self.rng
        if name == "jsonrpc":
            return self.pick(["1.0", "2", 2.0, 2, None, "", "2.0 ", "2.0\x00", [], {}])
        if name == "method":
            return self.pick(
                ["ASAP.SEND", "asap.send ", "asap.sendx", "", "rpc.discover", "__init__", None, 1]
            )
        if name == "id" and len(path) == 1:
            return self.pick([None, {}, [], 1.5, 1e308, 2**63 - 1, -(2**63), 2**64 - 1, 0, True])
        if name in ("sender", "recipient"):
            return self.pick(URNS)
        if name == "timestamp":
            return self.timestamp()
        if name == "payload_type":
            roll = rng.random()
            if roll < 0.15:  # long and unique: a cache keyed by payload type must not keep them
                return self.text() * rng.choice([1, 1_000, 20_000])
            return self.pick(PAYLOAD_TYPES)
        if name == "asap_version":
            return self.pick(VERSIONS)
        if name == "skill_id":
            return self.pick(SKILLS)
        if name in ("idempotency_key",):
            return self.idempotency_key()
        if name == "nonce":
            return self.pick(["dup-nonce", "", "n" * 70_000, 0, [], {}, None, True], 0.3)
        if name == "trace_id":
            return self.pick(["0" * 32, f"{rng.getrandbits(128):032x}", "ZZ" * 16, "a" * 33])
        if name == "timeout_seconds":
            return self.pick([0, -1, 1, 2**63 - 1, 2**64 - 1, 1.5, "5", 86_400 * 365])
        if name == "temperature":
            return self.pick([-1, 3, 1e308, 2.0, "0.5"])
        if name == "mode":
            return self.pick(["sequential", "parallel", "graph", "chaos", ""])
        if name == "steps":
            step = {"id": "s", "peer": "nobody", "skill": "echo", "input": {}}
            return self.pick(
                [
                    [],
                    [step] * 101,
                    [{**step, "depends_on": ["s"]}],
                    [{**step, "retries": 10, "on_error": "retry"}],
                    [{**step, "fallback": ["nobody"] * 50, "on_error": "fallback"}],
                    [{**step, "id": "x" * 65}],
                    [{**step, "timeout_seconds": 1e-300}],
                ],
                0.3,
            )
        if name == "extensions":
            return self.pick(
                [None, {}, [], "x", {"nonce": None}, {"snapshot": "x"}, {"snapshot": {}}], 0.4
            )
        if name == "snapshot":
            return self.pick(
                [{}, [], "x", {"id": "s", "task_id": "t", "version": -1, "data": None}], 0.4
            )
        return self.hostile()

    def set_path(self, doc: Any, path: tuple[str, ...], value: Any) -> None:
        node = doc
        for key in path[:-1]:
            if not isinstance(node, dict):
                return
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if isinstance(node, dict):
            if self.rng.random() < 0.12:
                node.pop(path[-1], None)  # a missing field
            else:
                node[path[-1]] = value

    def containers(self, doc: Any) -> list[Any]:
        """Dicts and small lists of ``doc`` (a frame, so shallow unless a mutation deepened it)."""
        found: list[Any] = []
        stack = [(doc, 0)]
        while stack and len(found) < 200:
            node, depth = stack.pop()
            if isinstance(node, dict) or (isinstance(node, list) and 0 < len(node) <= 20):
                found.append(node)
                if depth < 12:
                    children = node.values() if isinstance(node, dict) else node
                    stack.extend((child, depth + 1) for child in children)
        return found

    def mutate_generic(self, doc: Any) -> None:
        node = self.rng.choice(self.containers(doc) or [doc])
        rng = self.rng
        op = rng.randrange(6)
        if isinstance(node, list):
            index = rng.randrange(len(node))
            if op == 0:
                del node[index]
            elif op == 1:
                node.append(self.hostile())
            else:
                node[index] = self.hostile()
            return
        if not isinstance(node, dict):
            return
        keys = list(node)
        if op == 0 and keys:
            del node[rng.choice(keys)]
        elif op == 1 or not keys:
            node[rng.choice(["extra", "", "\x00", "__class__", "id ", self.text()])] = (
                self.hostile()
            )
        elif op == 2:
            node[rng.choice(keys)] = self.hostile()
        elif op == 3:
            key = rng.choice(keys)
            node[key] = [node[key]] if rng.random() < 0.5 else {"value": node[key]}
        elif op == 4:
            key = rng.choice(keys)
            renamed = rng.choice([key.upper(), key + " ", "\x00" + key, key.replace("e", "\u0435")])
            node[renamed] = node.pop(key)
        else:
            key = rng.choice(keys)
            node[key] = self.nested()

    def mutate_frame(self, frame: dict[str, Any], rounds: int) -> dict[str, Any]:
        for _ in range(rounds):
            if self.rng.random() < 0.6:
                path = self.rng.choice(self.TARGETS)
                self.set_path(frame, path, self.value_for(path))
            else:
                self.mutate_generic(frame)
        return frame

    def mutate_bytes(self, data: bytes) -> bytes:
        rng = self.rng
        if not data:
            return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        position = rng.randrange(len(data))
        op = rng.randrange(11)
        if op == 0:
            return data[:position]  # truncated
        if op == 1:
            flipped = data[position] ^ (1 << rng.randrange(8))
            return data[:position] + bytes([flipped]) + data[position + 1 :]
        if op == 2:
            noise = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            return data[:position] + noise + data[position:]
        if op == 3:
            return data[:position] + data[position + rng.randint(1, 32) :]
        if op == 4:
            return data[:position] + data[position : position + 64] * 3 + data[position:]
        if op == 5:
            return (
                rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff"]) + data
            )
        if op == 6:
            return data + rng.choice([b"x", b"}", b"]]]", b"\x00", b" {}", b'\n\n{"a":1}', b","])
        if op == 7:
            return data.replace(b'"', b"'", rng.randint(1, 5))
        if op == 8:
            bad = rng.choice(
                [b"\xc0\xaf", b"\xed\xa0\x80", b"\xff", b"\xf8\x88\x80\x80\x80", b"\x80"]
            )
            return data[:position] + bad + data[position:]
        if op == 9:
            return data.decode("utf-8", "replace").encode(rng.choice(["utf-16", "utf-32"]))
        return data.replace(b":", b"=", 1)

    # -- cases -------------------------------------------------------------------------------

    def headers(self, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        base = [(b"content-type", b"application/json")]
        if self.rng.random() < 0.5:
            base.append((b"asap-version", b"2.2, 2.1"))
        return [*base, *extra]

    def case_envelope(self) -> Case:
        frame = self.mutate_frame(self.valid_frame(), self.rng.choice([1, 1, 1, 2, 3]))
        return Case("envelope", body=self.frame_bytes(frame), headers=self.headers())

    def case_stream(self) -> Case:
        frame = self.valid_frame()
        if self.rng.random() < 0.8:
            frame = self.mutate_frame(frame, self.rng.choice([1, 2]))
        return Case(
            "stream", path="/asap/stream", body=self.frame_bytes(frame), headers=self.headers()
        )

    def case_jsonrpc(self) -> Case:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            frame: Any = self.valid_frame()
            for _ in range(rng.choice([1, 1, 2])):
                path = rng.choice(self.TARGETS[:6])
                self.set_path(frame, path, self.value_for(path))
        elif roll < 0.7:
            frame = self.valid_frame()
            frame[rng.choice(["extra", "result", "error", "Method", "jsonrpc "])] = self.hostile()
        elif roll < 0.8:
            frame = self.valid_frame()
            frame["params"] = self.pick(
                [
                    None,
                    [],
                    [frame["params"]["envelope"]],
                    "string",
                    1,
                    {},
                    {"envelope": None},
                    {"envelope": []},
                    {"envelope": "x"},
                    {"envelope": {}},
                    {"Envelope": frame["params"]["envelope"]},
                    {**frame["params"], "junk": self.container()},
                ],
                0.2,
            )
        else:
            frame = self.pick([None, True, 1, "asap.send", [], 1.5, Raw("1e999"), Raw('""')], 0.3)
        return Case("jsonrpc", body=self.frame_bytes(frame), headers=self.headers())

    def case_batch(self) -> Case:
        rng = self.rng
        roll = rng.random()
        if roll < 0.1:
            body: Any = self.pick([[], [[]], [[[]]], [1, 2, 3], [None], [{}], ["asap.send"]], 0.1)
        elif roll < 0.25:
            body = [self.valid_frame() for _ in range(rng.choice([1, 2, 5, 10]))]
        elif roll < 0.3:
            item = self.valid_frame()
            count = rng.choice([49, 50, 51, 100, 1_000])
            body = [{**item, "id": f"{item['id']}-{index}"} for index in range(count)]
        elif roll < 0.4:
            body = [[self.valid_frame()]]
        elif roll < 0.5:
            item = self.valid_frame()  # the same id (and envelope) many times
            body = [item] * rng.choice([2, 10, 50])
        else:
            body = []
            for _ in range(rng.randint(2, 12)):
                choice = rng.random()
                if choice < 0.4:
                    body.append(self.valid_frame())
                elif choice < 0.85:
                    body.append(self.mutate_frame(self.valid_frame(), rng.choice([1, 2])))
                else:
                    body.append(self.hostile())
        headers = self.headers()
        if rng.random() < 0.1:
            headers.append((b"prefer", b"respond-async"))
        if rng.random() < 0.1:
            headers.append((b"x-idempotency-key", b"batch-key"))
        return Case("batch", body=self.frame_bytes(body), headers=headers)

    def case_bytes(self) -> Case:
        rng = self.rng
        if rng.random() < 0.3:
            body = rng.choice(
                [
                    b"",
                    b" ",
                    b"\n\t\r ",
                    b"{",
                    b"}",
                    b"[",
                    b'{"jsonrpc":',
                    b"null",
                    b"\x00" * 64,
                    b"\xef\xbb\xbf{}",
                    b"{'jsonrpc': '2.0'}",
                    b'{"a":1,}',
                    b"[1,2,]",
                    b'{"a":1}{"b":2}',
                    b'{"a":1} trailing',
                    b"// comment\n{}",
                    b'{"a":NaN}',
                    b'{"a":Infinity}',
                    b'{"a":-Infinity}',
                    b'{"a":1e99999}',
                    b'{"a":123456789012345678901234567890}',
                    b'{"a":"\\ud800"}',
                    b'{"a":"\\udc00\\ud800"}',
                    b'{"a":"\\u00"}',
                    b'{"a":"\\x41"}',
                    b'{"a":"\x01"}',
                    b'{"a":"\xc3"}',
                    b'{"\xff":1}',
                    b'{"a":1,"a":2}',
                    b'{"jsonrpc":"2.0","jsonrpc":"1.0","method":"asap.send","params":{},"id":1}',
                    b"[" * 1_000 + b"]" * 1_000,
                    b"[" * 100_000,
                    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
                    b"\xfe\xff\x00{\x00}",
                    bytes(range(256)),
                    b"\x1f\x8b\x08\x00",
                    "{}".encode("utf-16"),
                ]
            )
        else:
            body = self.mutate_bytes(self.frame_bytes(self.valid_frame()))
            if rng.random() < 0.3:
                body = self.mutate_bytes(body)
        return Case("bytes", body=body, headers=self.headers())

    def case_headers(self) -> Case:
        rng = self.rng
        frame = self.valid_frame()
        if rng.random() < 0.3:
            frame = self.mutate_frame(frame, 1)
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        for _ in range(rng.choice([1, 1, 2, 3])):
            kind = rng.randrange(12)
            if kind == 0:
                headers = [h for h in headers if h[0] != b"content-type"]
                if rng.random() < 0.7:
                    headers.append((b"content-type", rng.choice(CONTENT_TYPES)))
            elif kind == 1:
                headers.append((b"asap-version", rng.choice(ASAP_VERSIONS)))
            elif kind == 2:
                headers.append((b"content-encoding", rng.choice(ENCODING_LABELS)))
            elif kind == 3:
                headers.append((b"authorization", rng.choice(AUTHORIZATIONS)))
            elif kind == 4:
                key = rng.choice(
                    [b"", b"k", b"k" * 8_000, b"k" * 60_000, b"\xe9\xff", b",", b" k ", b"key-1"]
                )
                headers.append((b"x-idempotency-key", key))
                if rng.random() < 0.2:
                    headers.append((b"x-idempotency-key", b"another"))
            elif kind == 5:
                prefer = rng.choice(
                    [
                        b"respond-async",
                        b"respond-async, wait=0",
                        b"RESPOND-ASYNC",
                        b"wait=abc",
                        b"return=minimal",
                        b"respond-async" * 1_000,
                    ]
                )
                headers.append((b"prefer", prefer))
            elif kind == 6:
                headers.append((b"traceparent", rng.choice(TRACEPARENTS)))
            elif kind == 7:
                headers.extend((f"x-fuzz-{i}".encode(), b"v" * 10) for i in range(300))
            elif kind == 8:
                name = rng.choice([b"x-huge", b"cookie", b"accept", b"user-agent", b"referer"])
                headers.append((name, b"h" * rng.choice([16_000, 64_000])))
            elif kind == 9:
                host = rng.choice([b"evil.example", b"a" * 1_000, b"[::1]:99999", b"x y", b"\xff"])
                headers.append((b"host", host))
            elif kind == 10:
                headers.append(
                    (rng.choice([b"x-forwarded-for", b"forwarded", b"x-real-ip"]), self.junk())
                )
            else:
                headers.append(
                    (b"accept", rng.choice([b"application/vnd.asap+lambda", b"*/*;q=x"]))
                )
        return Case("headers", body=self.frame_bytes(frame), headers=headers)

    def junk(self) -> bytes:
        return self.rng.choice(
            [b"", b"unknown", b"1.2.3.4, 5.6.7.8", b'for="[::1]"', b"999.999.999.999", b"\xff" * 40]
        )

    def compressed(self, data: bytes, encoding: str) -> bytes:
        return gzip.compress(data, 6) if encoding == "gzip" else brotli.compress(data, quality=4)

    def bomb(self, encoding: str, filler: bytes) -> bytes:
        """A small body that inflates past the size limit (made once per kind)."""
        size = self.rng.choice([MAX_BODY + 1, 16 * 1024 * 1024, 64 * 1024 * 1024])
        if encoding == "gzip":
            size = min(size, 16 * 1024 * 1024)  # gzip is slow to make; 16 MiB is past enough
        key = (encoding, filler, size)
        if key not in self.bombs:
            data = filler * (size // len(filler))
            self.bombs[key] = (
                gzip.compress(data, 6) if encoding == "gzip" else brotli.compress(data, quality=1)
            )
        return self.bombs[key]

    def case_compression(self) -> Case:
        rng = self.rng
        encoding = rng.choice(["gzip", "br"])
        frame = self.valid_frame()
        if rng.random() < 0.3:
            frame = self.mutate_frame(frame, 1)
        plain = self.frame_bytes(frame)
        label = encoding.encode()
        kind = rng.randrange(13)
        if kind == 0:  # valid
            body = self.compressed(plain, encoding)
        elif kind == 1:  # truncated
            whole = self.compressed(plain, encoding)
            body = whole[: rng.randrange(len(whole))]
        elif kind == 2:  # garbage labelled as compressed
            body = rng.choice([plain, bytes(rng.randrange(256) for _ in range(200)), b""])
        elif kind == 3:  # corrupted
            whole = bytearray(self.compressed(plain, encoding))
            where = rng.randrange(len(whole))
            whole[where] ^= 0xFF
            body = bytes(whole)
        elif kind == 4:  # compressed invalid JSON
            body = self.compressed(self.mutate_bytes(plain), encoding)
        elif kind == 5:  # compressed twice, labelled once
            body = self.compressed(self.compressed(plain, encoding), encoding)
        elif kind == 6:  # stacked, labelled as stacked
            body = brotli.compress(gzip.compress(plain))
            label = rng.choice([b"gzip, br", b"br, gzip", b"gzip,br"])
        elif kind == 7:  # other labels
            body = self.compressed(plain, encoding)
            label = rng.choice([b"GZIP", b" gzip ", b"Br", b"x-gzip", b"deflate", b"gzip;q=1"])
        elif kind == 8:
            body = zlib.compress(plain)
            label = rng.choice([b"deflate", b"gzip"])
        elif kind == 9:  # gzip members one after another, or trailing garbage; the first
            # member past 64 KiB once sent the agent into an endless loop
            padding = b" " * rng.choice([0, 100_000])
            body = gzip.compress(padding + plain) + rng.choice([gzip.compress(b"{}"), b"junk"])
            label = b"gzip"
        elif kind == 10:  # compressed deep nesting / huge numbers
            body = self.compressed(
                rng.choice([b"[" * 200_000 + b"]" * 200_000, b'{"a":1e99999}', b"\xff\xfe"]),
                encoding,
            )
        elif kind == 11 and rng.random() < 0.35:  # bombs: inflate past the size limit
            body = self.bomb(encoding, rng.choice([b"\x00", b"[", b" ", b"0,"]))
        else:  # valid, with whitespace padding that inflates a lot
            body = self.compressed(b" " * rng.choice([10, 100_000, 1_000_000]) + plain, encoding)
        return Case("compression", body=body, headers=self.headers((b"content-encoding", label)))

    def case_routes(self) -> Case:
        rng = self.rng
        roll = rng.random()
        body = self.frame_bytes(self.valid_frame()) if rng.random() < 0.5 else b""
        if roll < 0.3:
            method = rng.choice(
                ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]
            )
            path = rng.choice(["/asap", "/asap/stream", "/health", "/asap/metrics"])
            return Case("routes", method=method, path=path, body=body)
        if roll < 0.55:
            inm = rng.choice(
                [
                    b"*",
                    b'W/"x"',
                    b'""',
                    b'"' + b"a" * 64 + b'"',
                    b"," * 5_000,
                    b"\xff\xfe",
                    b"W/",
                    b'"a", W/"b", *',
                    b"x" * 60_000,
                ]
            )
            method = rng.choice(["GET", "GET", "HEAD", "POST"])
            host = rng.choice(
                [b"127.0.0.1", b"evil.example", b"h" * 200, f"h{rng.randrange(200)}".encode()]
            )
            headers = [(b"if-none-match", inm), (b"host", host)]
            return Case(
                "routes", method=method, path="/.well-known/asap/manifest.json", headers=headers
            )
        if roll < 0.65:
            path = rng.choice(["/health", "/ready", "/.well-known/asap/health", "/asap/metrics"])
            query = rng.choice(["", "?", "?a=" + "b" * 5_000, "?%zz", "?\u00e9=1"])
            return Case("routes", method="GET", path=path + query)
        path = rng.choice(
            [
                "/",
                "/asap/",
                "//asap",
                "/ASAP",
                "/asap/../asap",
                "/%2e%2e/etc/passwd",
                "/asap%00",
                "/" + "a" * 8_000,
                "/.well-known/asap/manifest.json/x",
                "/asap?x=" + "y" * 8_000,
                "/%F0%9F%98%80",
                "/asap/ws",
                "/.well-known/",
                "/docs",
                "/openapi.json",
            ]
        )
        return Case("routes", method=rng.choice(["GET", "POST"]), path=path, body=body)

    def case_size(self) -> Case:
        """Bodies at and past the 10 MiB limit (few: some cost the agent seconds).

        None becomes a task: a stored task of ~10 MB costs the storage seconds and ~100 MB
        while it is written, and leaves RSS several MB higher (allocator fragmentation),
        noise the RSS check would have to allow for; the agent's memory with such tasks is a
        matter for its own test.
        """
        self.sized += 1
        kind = self.sized % 7
        frame = self.valid_frame()
        if kind == 0:  # a request just under the limit, parsed and validated, then refused
            frame["params"]["envelope"]["payload"] = self.task_request("no-such-skill")
            frame["params"]["envelope"]["payload"]["input"] = {"big": "x" * (MAX_BODY - 4_096)}
            return Case("size", body=self.frame_bytes(frame), headers=self.headers())
        if kind == 1:  # one byte over
            body = self.frame_bytes(frame)
            return Case("size", body=body + b" " * (MAX_BODY + 1 - len(body)), may_drop=True)
        if kind == 2:  # many small objects: parsing amplifies memory
            frame["params"]["junk"] = Raw("[" + ",".join(["{}"] * (MAX_BODY // 4)) + "]")
            return Case("size", body=self.frame_bytes(frame), headers=self.headers())
        if kind == 3:  # streamed without Content-Length, past the limit
            return Case("size", body=b"[" + b"0," * (MAX_BODY // 2 + 10) + b"0]", chunked=True)
        if kind == 4:  # the largest batch of the largest items, each with invalid input
            item = self.valid_frame()
            item["params"]["envelope"]["payload"] = self.task_request("orchestrate")
            item["params"]["envelope"]["payload"]["input"] = {"big": "y" * (MAX_BODY // 60)}
            return Case("size", body=self.frame_bytes([item] * 50), headers=self.headers())
        if kind == 5 and self.sized < 7:  # once: many nests just within the depth limit
            nest = b"[" * 126 + b"]" * 126
            body = b"[" + b",".join([nest] * (MAX_BODY // (len(nest) + 1) - 1)) + b"]"
            return Case("size", body=body, headers=self.headers())
        body = b'{"a":"' + b"\\u00e9" * (MAX_BODY // 6 - 2) + b'"}'  # escapes: 6 bytes each
        return Case("size", body=body, headers=self.headers())

    def case_raw(self) -> Case:
        rng = self.rng
        body = self.frame_bytes(self.valid_frame())
        size = len(body)
        kind = rng.randrange(16)
        if kind == 0:  # Content-Length shorter than the body: the rest is a second request
            declared = str(rng.randrange(1, size)).encode()
            return raw_case(headers=[(b"content-length", declared)], body=body)
        if kind == 1:  # longer than the body, then the client goes away
            declared = str(size + rng.choice([1, 100, 100_000])).encode()
            return raw_case(headers=[(b"content-length", declared)], body=body, half_close=True)
        if kind == 2:
            value = rng.choice(
                [b"abc", b"-1", b"1e3", b" 12", b"0x10", b"+5", b"9" * 30, b"", b"1 2", b"\xff"]
            )
            return raw_case(headers=[(b"content-length", value)], body=body, half_close=True)
        if kind == 3:
            first, second = str(size).encode(), str(size + rng.choice([0, 1])).encode()
            headers = [(b"content-length", first), (b"content-length", second)]
            return raw_case(headers=headers, body=body, half_close=True)
        if kind == 4:  # Content-Length and chunked together
            headers = [(b"content-length", str(size).encode()), (b"transfer-encoding", b"chunked")]
            return raw_case(headers=headers, body=chunked(body, rng), half_close=True)
        if kind == 5:
            return raw_case(headers=[(b"transfer-encoding", b"chunked")], body=chunked(body, rng))
        if kind == 6:
            bad = rng.choice(
                [
                    b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                    b"-1\r\n" + body + b"\r\n0\r\n\r\n",
                    b"f" * 20 + b"\r\n" + body,
                    b"%x\r\n" % (size + 10) + body,
                    b"%x;ext=1\r\n" % size + body + b"\r\n0\r\nx-trailer: 1\r\n\r\n",
                    b"%x\r\n" % size + body + b"\r\n",
                    b"%x\r\n" % size + body + b"XX0\r\n\r\n",
                ]
            )
            return raw_case(headers=[(b"transfer-encoding", b"chunked")], body=bad, half_close=True)
        if kind == 7:
            value = rng.choice(
                [
                    b"gzip, chunked",
                    b"chunked, identity",
                    b"Chunked",
                    b"xchunked",
                    b"chunked, chunked",
                ]
            )
            data = chunked(gzip.compress(body) if value.startswith(b"gzip") else body, rng)
            return raw_case(headers=[(b"transfer-encoding", value)], body=data, half_close=True)
        if kind == 8:  # broken header lines
            line = rng.choice(
                [
                    b"x-a: a\x00b",
                    b"x-a: a\rb",
                    b" folded: continuation",
                    b"no-colon-here",
                    b"x-a : spaced",
                    b": empty-name",
                    b"x-\xff\xfe: v",
                    b"asap-version: 2.2\x00",
                    b"content-type: application/json\r\n\tfolded",
                ]
            )
            return raw_case(extra_lines=[line], body=body, half_close=True)
        if kind == 9:  # a huge header, or very many
            if rng.random() < 0.5:
                lines = [b"x-huge: " + b"h" * rng.choice([100_000, 1_000_000])]
            else:
                lines = [b"x-h%d: v" % i for i in range(2_000)]
            return raw_case(extra_lines=lines, body=body, half_close=True)
        if kind == 10:  # broken request lines
            data = rng.choice(
                [
                    b"GET / HTTP/9.9\r\nhost: x\r\n\r\n",
                    b"GET /\r\n\r\n",
                    b"FOO /asap HTTP/1.1\r\nhost: x\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                    b"\r\n\r\n\r\n",
                    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
                    b"POST http://evil.example/asap HTTP/1.1\r\n"
                    b"host: x\r\ncontent-length: 2\r\n\r\n{}",
                    b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n",
                    b"post /asap HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
                    b"POST /asap HTTP/1.1\nhost: x\ncontent-length: 2\n\n{}",
                    b"GET /asap\x00 HTTP/1.1\r\nhost: x\r\n\r\n",
                    b"G" * 10_000 + b" / HTTP/1.1\r\n\r\n",
                    bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))),
                ]
            )
            return Case("raw", raw=data, half_close=True, may_drop=True)
        if kind == 11:  # HTTP/1.0, with and without a length
            if rng.random() < 0.5:
                return raw_case(
                    headers=[(b"content-length", str(size).encode())], body=body, version=b"1.0"
                )
            return raw_case(body=body, version=b"1.0", half_close=True)
        if kind == 12:
            headers = [(b"expect", b"100-continue"), (b"content-length", str(size).encode())]
            return raw_case(headers=headers, body=body)
        if kind == 13:  # upgrades: websocket (no such route) and h2c (unsupported)
            if rng.random() < 0.5:
                headers = [
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                    (b"sec-websocket-version", b"13"),
                ]
                return raw_case(
                    method=b"GET",
                    path=rng.choice([b"/asap", b"/asap/ws"]),
                    headers=headers,
                    close=False,
                    half_close=True,
                )
            headers = [
                (b"upgrade", b"h2c"),
                (b"connection", b"Upgrade, HTTP2-Settings"),
                (b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
                (b"content-length", str(size).encode()),
            ]
            return raw_case(headers=headers, body=body)
        if kind == 14:  # pipelined requests, the last one closing the connection
            one = request_bytes(b"POST", b"/asap", [(b"content-length", str(size).encode())], body)
            last = request_bytes(b"GET", b"/health", [(b"connection", b"close")], b"")
            return Case("raw", raw=one * rng.randint(1, 4) + last)
        # a valid request, to check the raw path itself
        return raw_case(headers=[(b"content-length", str(size).encode())], body=body)

    def cases(self) -> Iterator[Case]:
        """Every category's share of cases (but ``size``), interleaved in a seeded order."""
        plan = [name for name, count in self.CATEGORIES.items() for _ in range(count)]
        self.rng.shuffle(plan)
        for name in plan:
            yield getattr(self, f"case_{name}")()

    def heavy(self) -> Iterator[Case]:
        """The ``size`` cases: bodies of about 10 MiB."""
        for _ in range(self.HEAVY):
            yield self.case_size()

    def warmup(self, count: int) -> Iterator[Case]:
        """Valid requests of every kind: the code paths a normal client exercises."""
        for index in range(count):
            frame = self.valid_frame()
            frame["params"]["envelope"]["payload_type"] = "task.request"
            frame["params"]["envelope"]["payload"] = self.task_request()
            body = self.frame_bytes(frame)
            kind = index % 6
            if kind == 0:
                yield Case(
                    "warmup",
                    body=self.compressed(body, "gzip"),
                    headers=self.headers((b"content-encoding", b"gzip")),
                )
            elif kind == 1:
                yield Case(
                    "warmup",
                    body=self.compressed(body, "br"),
                    headers=self.headers((b"content-encoding", b"br")),
                )
            elif kind == 2:
                yield Case("warmup", path="/asap/stream", body=body, headers=self.headers())
            elif kind == 3:
                batch = [self.valid_frame() for _ in range(5)]
                yield Case("warmup", body=self.frame_bytes(batch), headers=self.headers())
            elif kind == 4:
                yield Case("warmup", method="GET", path="/.well-known/asap/manifest.json")
            else:
                yield Case("warmup", body=body, headers=self.headers())


# -- requests ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One hostile request: sent on a keep-alive connection (``Connection``), or written to a
    new socket as it is when ``raw`` is set."""

    kind: str
    method: str = "POST"
    path: str = "/asap"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes | None = None
    half_close: bool = False
    """Shut down our side after writing ``raw`` (the request is incomplete or garbage)."""
    may_drop: bool = False
    """The server may close the connection without an answer (garbage, or a client gone)."""
    chunked: bool = False
    """Send ``body`` with chunked encoding (no Content-Length)."""


def request_bytes(
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    version: bytes = b"1.1",
    extra_lines: list[bytes] | None = None,
) -> bytes:
    lines = [method + b" " + path + b" HTTP/" + version]
    lines += [name + b": " + value for name, value in headers]
    lines += extra_lines or []
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def raw_case(
    *,
    method: bytes = b"POST",
    path: bytes = b"/asap",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    version: bytes = b"1.1",
    extra_lines: list[bytes] | None = None,
    close: bool = True,
    half_close: bool = False,
) -> Case:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), *(headers or [])]
    if close:
        headers.append((b"connection", b"close"))
    data = request_bytes(method, path, headers, body, version, extra_lines)
    return Case("raw", raw=data, half_close=half_close, may_drop=half_close)


def chunked(body: bytes, rng: random.Random | None = None) -> bytes:
    """``body`` in chunked transfer encoding: random chunk sizes, or 256 KiB ones."""
    out = bytearray()
    position = 0
    while position < len(body):
        size = rng.randint(1, max(1, len(body) // 3)) if rng else 256 * 1024
        out += b"%x\r\n" % len(body[position : position + size])
        out += body[position : position + size] + b"\r\n"
        position += size
    return bytes(out + b"0\r\n\r\n")


def http_request(case: Case) -> bytes:
    """The bytes of a non-raw case: its headers exactly as generated, plus Host (unless it
    has one) and the body's framing."""
    headers = list(case.headers)
    if not any(name.lower() == b"host" for name, _ in headers):
        headers.insert(0, (b"host", b"127.0.0.1"))
    body = case.body
    if case.chunked:
        headers.append((b"transfer-encoding", b"chunked"))
        body = chunked(body)
    elif body or case.method in ("POST", "PUT", "PATCH"):
        headers.append((b"content-length", str(len(body)).encode()))
    return request_bytes(case.method.encode(), case.path.encode(), headers, body)


@dataclass
class Outcome:
    statuses: list[int]
    body: bytes = b""
    content_type: str = ""
    error: str | None = None


class _Reply:
    """What httptools' response parser reports."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.headers_done = False
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Connection:
    """A keep-alive HTTP/1.1 connection to the agent.

    Requests go out byte for byte as generated (a full client such as httpx adds and
    normalizes headers, refuses some, and costs ~3 ms per request on a 2-core machine, which
    alone would take 10,000 inputs past a minute); replies are parsed by httptools.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def exchange(self, data: bytes, *, head: bool = False) -> Outcome:
        reused = self.writer is not None
        outcome = await self._exchange(data, head)
        if reused and outcome.error and not outcome.statuses:  # a keep-alive the server closed
            outcome = await self._exchange(data, head)
        return outcome

    async def _exchange(self, data: bytes, head: bool) -> Outcome:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reply = _Reply()
        parser = httptools.HttpResponseParser(reply)
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError:
            pass  # the server may answer (413) and close before reading everything
        try:
            while not (reply.done or (head and reply.headers_done)):
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), timeout=REPLY_TIMEOUT)
                if not chunk:
                    break
                parser.feed_data(chunk)
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            await self.close()
            return Outcome([], error=f"{type(exc).__name__}: {exc}")
        if head or not reply.done or not parser.should_keep_alive():
            await self.close()
        if not reply.headers_done:
            return Outcome([], error="closed without a reply")
        content_type = reply.headers.get(b"content-type", b"").decode("latin-1")
        return Outcome([parser.get_status_code()], bytes(reply.body), content_type)


async def send_raw(port: int, case: Case) -> Outcome:
    """Write a whole request (possibly broken) on a new connection; read until it closes."""
    assert case.raw is not None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return Outcome([], error=f"connect: {exc!r}")
    try:
        writer.write(case.raw)
        await writer.drain()
        if case.half_close:
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), timeout=REPLY_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return Outcome([], error=f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    statuses = [int(match.group(1)) for match in STATUS_LINE.finditer(data)]
    return Outcome(statuses, data, "", None if statuses else "closed without a reply")


STATUS_LINE = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


@dataclass
class Results:
    count: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def record(self, case: Case, outcome: Outcome) -> None:
        self.count += 1
        labels = [str(status) for status in outcome.statuses] or ["no reply"]
        self.statuses.update(labels)
        self.by_kind.setdefault(case.kind, Counter()).update(labels)
        what = f"{case.kind} {case.method} {case.path} {describe(case)}"
        if any(status >= 500 for status in outcome.statuses):
            self.problems.append(f"HTTP {outcome.statuses}: {what} -> {outcome.body[:300]!r}")
        if b'"code":-32603' in outcome.body:
            self.problems.append(f"JSON-RPC -32603: {what} -> {outcome.body[:300]!r}")
        if outcome.error and not case.may_drop:
            self.problems.append(f"no reply ({outcome.error}): {what}")
        if outcome.content_type.startswith("application/json") and outcome.body:
            try:
                orjson.loads(outcome.body)
            except orjson.JSONDecodeError:
                self.problems.append(f"reply is not JSON: {what} -> {outcome.body[:300]!r}")


def describe(case: Case) -> str:
    data = case.raw if case.raw is not None else case.body
    headers = b"; ".join(name + b"=" + value[:60] for name, value in case.headers)
    return f"[{headers[:300]!r}] {len(data)} bytes {data[:200]!r}"


async def run_cases(
    port: int, cases: Iterator[Case], results: Results, deadline: float = PHASE_DEADLINE
) -> None:
    """Send ``cases`` over ``CONCURRENCY`` connections, each taking the next case when free.

    Fails when the whole takes longer than ``deadline`` seconds (an agent that stopped
    answering), naming the requests it was given last.
    """
    in_flight: dict[int, Case] = {}

    async def worker(index: int) -> None:
        connection = Connection(port)
        try:
            for case in cases:  # one shared iterator: each case is taken once
                in_flight[index] = case
                if case.raw is not None:
                    outcome = await send_raw(port, case)
                else:
                    head = case.method == "HEAD"
                    outcome = await connection.exchange(http_request(case), head=head)
                results.record(case, outcome)
                del in_flight[index]
        finally:
            await connection.close()

    try:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(worker(index) for index in range(CONCURRENCY)))
    except TimeoutError:
        waiting = "\n".join(describe(case) for case in in_flight.values())
        raise AssertionError(
            f"no end after {deadline} s ({results.count} answered); in flight:\n{waiting}"
        ) from None


# -- the server --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def settled_rss_mb(pid: int, timeout: float = 15) -> float:
    """RSS once the process is idle (background work such as the task outbox done): the
    lowest reading over ``TRIM_PERIOD`` and a half after its CPU time stopped moving for
    0.5 s, so that the agent's periodic heap trim has run (``asap.memory``)."""

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    deadline = time.monotonic() + timeout
    previous, quiet = cpu_ticks(), 0
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.25)
        current = cpu_ticks()
        quiet = quiet + 1 if current == previous else 0
        previous = current
    lowest = rss_mb(pid)
    until = time.monotonic() + TRIM_PERIOD * 1.5
    while time.monotonic() < until:
        time.sleep(0.1)
        lowest = min(lowest, rss_mb(pid))
    return lowest


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The server's log lines as JSON objects, and the lines showing an internal failure."""
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            problems.append(f"line {number} is not a JSON log line: {line[:300]}")
            continue
        entries.append(entry)
        level = str(entry.get("level", "")).lower()
        if (
            "Traceback" in line
            or level in BAD_LEVELS
            or entry.get("event") in INTERNAL_ERROR_EVENTS
            or "exception" in entry
        ):
            problems.append(f"line {number}: {line[:2000]}")
    return entries, problems


def test_hostile_inputs_leave_a_running_agent_healthy(tmp_path: Path) -> None:
    log_path = tmp_path / "agent.log"
    agent = AgentProcess.uvicorn(
        env={
            "ASAP_AGENT_ID": AGENT_ID,
            "ASAP_LOG_FORMAT": "json",
            "ASAP_LOG_LEVEL": "INFO",
            "ASAP_STORAGE_URL": f"sqlite:///{tmp_path / 'state.db'}",
            "ASAP_RATE_LIMIT": "",  # every input reaches the pipeline (empty: no limit)
            # the maintenance loop (leases, then a heap trim) runs every lease / 3 seconds
            "ASAP_TASK_LEASE_SECONDS": str(TRIM_PERIOD * 3),
        },
        log_path=log_path,
        cwd=Path(__file__).resolve().parents[2],
    )
    fuzzer = Fuzzer(SEED)
    results = Results()
    try:
        agent.start()
        assert agent.pid is not None
        port = agent.port

        warmup = Results()
        asyncio.run(run_cases(port, fuzzer.warmup(WARMUP_REQUESTS), warmup))
        assert warmup.problems == [] and set(warmup.statuses) == {"200"}, warmup.statuses

        # The 10 MiB bodies go first: parsing one allocates up to millions of objects at
        # once, and the allocator's high-water mark they leave is not what the RSS check is
        # after, so the baseline is taken after them.
        started = time.monotonic()
        asyncio.run(run_cases(port, fuzzer.heavy(), results))
        elapsed = time.monotonic() - started
        baseline = settled_rss_mb(agent.pid)
        started = time.monotonic()
        asyncio.run(run_cases(port, fuzzer.cases(), results))
        elapsed += time.monotonic() - started
        right_after = rss_mb(agent.pid)

        health = httpx.get(agent.url + "/health", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        reply = httpx.post(
            agent.url + "/asap",
            json=asap_send(
                "task.request",
                {"conversation_id": "c", "skill_id": "echo", "input": {"m": "still alive"}},
                sender=SENDER,
                recipient=AGENT_ID,
                request_id="after-fuzz",
            ),
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        payload = reply.json()["result"]["envelope"]["payload"]
        assert payload["status"] == "completed"
        assert payload["result"] == {"echoed": {"m": "still alive"}}

        final = settled_rss_mb(agent.pid)
    finally:
        exit_code = agent.stop()

    entries, logged = read_log(log_path)
    print(
        f"\nfuzz: {results.count} inputs in {elapsed:.1f} s "
        f"({results.count / elapsed:.0f}/s, {CONCURRENCY} connections, seed {SEED:#x})"
    )
    print(f"fuzz: statuses {dict(sorted(results.statuses.items()))}")
    for kind, statuses in sorted(results.by_kind.items()):
        print(f"fuzz:   {kind:<12} {dict(sorted(statuses.items()))}")
    print(
        f"fuzz: RSS baseline {baseline:.1f} MB, right after {right_after:.1f} MB, "
        f"settled {final:.1f} MB (margin {RSS_MARGIN_MB} MB); {len(entries)} log lines"
    )

    assert results.count >= MIN_INPUTS
    assert results.problems == [], "\n".join(results.problems[:30])
    assert logged == [], "\n".join(logged[:20])
    # uvicorn ends a graceful SIGTERM shutdown by raising the signal again: -15 is clean
    assert exit_code in (0, -signal.SIGTERM), f"the agent did not stop cleanly: {exit_code}"
    assert any(entry.get("event") == "Application shutdown complete." for entry in entries)
    assert final <= baseline + RSS_MARGIN_MB, (
        f"RSS grew from {baseline:.1f} MB to {final:.1f} MB after {results.count} inputs"
    )

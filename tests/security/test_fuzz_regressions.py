"""What the fuzzer (``test_fuzz.py``) found, pinned down without a running agent."""

from __future__ import annotations

import gzip
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from asap.errors import HTTPError, ParseError
from asap.models import payloads
from asap.models.envelope import Envelope
from asap.models.payloads import normalize_payload_type
from asap.transport import codec


def test_long_payload_types_are_normalized_without_being_cached() -> None:
    """Every payload type used to be cached (1024 of them), keyed by the caller's text: each
    request could pin up to 10 MiB in the agent's memory. Only short ones are cached now."""
    cache = payloads._normalize_cached
    before = cache.cache_info().currsize
    for index in range(50):
        long_type = f"task.request-{index}-" + "x" * 100_000
        assert normalize_payload_type(long_type) == f"taskrequest{index}" + "x" * 100_000
        Envelope.model_validate(
            {
                "asap_version": "0.1",
                "sender": "urn:asap:agent:a",
                "recipient": "urn:asap:agent:b",
                "payload_type": long_type,
                "payload": {},
            }
        )
    assert cache.cache_info().currsize == before
    assert normalize_payload_type("Task.Request") == "taskrequest"
    assert cache.cache_info().currsize <= before + 1


def test_normalization_keeps_what_the_spec_rule_keeps() -> None:
    """Lowercase, then drop every character but ``a-z`` and ``0-9`` (spec 1.4), however long
    the text; characters whose lowercase is ASCII (the Kelvin sign, dotted capital I) count."""
    rule = re.compile(r"[^a-z0-9]")
    samples = [
        "task.request",
        "TaskRequest",
        "task_request",
        "TASK..REQUEST\x00",
        "\u212a\u0130\u00df\ufb00\u1e9e\U0001f600\u00e9\uff21\u2160",
        "ta\u015fk.request",
        "\ud800x",
        "",
    ]
    for sample in samples + [sample * 5_000 for sample in samples]:
        assert normalize_payload_type(sample) == rule.sub("", sample.lower()), repr(sample[:40])


def nests(depth: int, count: int) -> bytes:
    nest = b"[" * depth + b"]" * depth
    return b"[" + b",".join([nest] * count) + b"]"


def test_nesting_depth_is_measured_on_the_text() -> None:
    """The depth check walked the parsed value: 10 MiB of many 127-deep arrays kept the
    event loop busy for ~6 s, 2.6 million empty objects for ~1 s. It reads the text now."""
    assert len(codec.loads(nests(127, 2))) == 2  # 128 levels: accepted
    for body in (nests(128, 2), b'{"a":' * 128 + b"[]" + b"}" * 128):
        with pytest.raises(ParseError) as raised:
            codec.loads(body)
        assert raised.value.data == {"error": "Invalid JSON: nesting deeper than 128 levels"}
    # brackets and escapes inside strings do not count
    quoted = b'{"a":"' + b"[{" * 500 + b'\\\\", "\\"[[[": ' + nests(126, 1) + b"}"
    codec.loads(quoted)
    started = time.perf_counter()
    for body in (nests(126, 10 * 1024 * 1024 // 254), b"[" + b",".join([b"{}"] * 2_600_000) + b"]"):
        assert codec._too_deep(body, codec.MAX_DEPTH) is False
    assert time.perf_counter() - started < 2  # was ~7 s on a 2-core machine


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail, instead of hanging, when the block loops past ``seconds`` (main thread, Unix)."""

    def expired(signum: int, frame: Any) -> None:
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_bytes_after_a_large_gzip_member_end_the_decoding() -> None:
    """A gzip member inflating past 64 KiB followed by anything (136 bytes in all) kept the
    agent's event loop spinning for good: zlib left the bytes after the member in
    ``unconsumed_tail`` and every later call returned nothing. Members are now read one after
    another, as ``gzip.decompress`` does, and other trailing bytes are a 400."""
    limit = 10 * 1024 * 1024
    first = b" " * 100_000 + b"{}"
    with deadline(5):
        with pytest.raises(HTTPError) as raised:
            codec.decompress(gzip.compress(first) + b"x", "gzip", limit)
        assert raised.value.status_code == 400
        assert "trailing bytes" in raised.value.detail
        two = gzip.compress(first) + gzip.compress(b"[1]")
        assert codec.decompress(two, "gzip", limit) == gzip.decompress(two)
        with pytest.raises(HTTPError) as raised:  # a bomb in the second member
            codec.decompress(gzip.compress(b"{}") + gzip.compress(bytes(limit)), "gzip", limit)
        assert raised.value.status_code == 413


def test_an_unknown_payload_type_is_not_echoed_at_any_length() -> None:
    from asap.errors import HandlerNotFoundError

    error = HandlerNotFoundError("x" * 1_000_000)
    assert len(error.message) < 300 and error.details["payload_type"].endswith("…")
    assert HandlerNotFoundError("Task.Nope").details == {"payload_type": "Task.Nope"}

"""Who may call an agent: bearer tokens mapped to the agent URN each may speak as (spec 3.12).

Tokens come from ``ASAP_AUTH_TOKENS`` and/or the file ``ASAP_AUTH_TOKENS_FILE``, in either
form:

- ``urn=token`` pairs, one per line or separated by commas (``#`` starts a comment line);
- a JSON object mapping a URN to a token or to a list of tokens (several tokens per URN let
  an operator rotate one without downtime).

Presented tokens are compared in constant time against the SHA-256 of every configured
token, so neither the comparison nor the table lookup reveals how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

from asap.errors import ConfigurationError, InvalidParamsError, InvalidRequestError
from asap.models.envelope import validate_agent_urn
from asap.observability.logging import protect

__all__ = ["Authenticator", "MIN_TOKEN_LENGTH", "parse_tokens", "sender_mismatch"]

MIN_TOKEN_LENGTH = 16
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
"""Token characters: those of RFC 6750 ``b64token``, which also survive JSON log lines
unescaped (so the log scrubber finds them)."""


def parse_tokens(text: str, source: str = "ASAP_AUTH_TOKENS") -> dict[str, str]:
    """``text`` as a token -> URN mapping; :class:`ConfigurationError` names what is wrong
    (never the token itself)."""
    text = text.strip()
    pairs: list[tuple[str, str]] = []
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{source} is not valid JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise ConfigurationError(f"{source} as JSON must map URNs to tokens")
        for urn, tokens in raw.items():
            listed = [tokens] if isinstance(tokens, str) else tokens
            if not isinstance(listed, list):
                raise ConfigurationError(f"{source}: tokens of {urn} must be strings")
            for token in listed:
                if not isinstance(token, str):
                    raise ConfigurationError(f"{source}: tokens of {urn} must be strings")
                pairs.append((urn, token))
    else:
        for line in text.replace(",", "\n").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            urn, sep, token = line.partition("=")
            if not sep:
                raise ConfigurationError(f"{source}: an entry for {urn!r} is not urn=token")
            pairs.append((urn.strip(), token.strip()))
    table: dict[str, str] = {}
    for urn, token in pairs:
        try:
            validate_agent_urn(urn)
        except ValueError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None
        if len(token) < MIN_TOKEN_LENGTH or not _TOKEN.match(token):
            raise ConfigurationError(
                f"{source}: the token of {urn} must be at least {MIN_TOKEN_LENGTH} characters "
                "of A-Z a-z 0-9 . _ ~ + / = -"
            )
        if table.setdefault(token, urn) != urn:
            raise ConfigurationError(f"{source}: one token is given to two agents")
    return table


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Turns an ``Authorization`` header into the URN its token speaks for."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._entries = [(_digest(token), urn) for token, urn in tokens.items()]

    @classmethod
    def from_settings(cls, inline: str | None, file: str | None) -> Authenticator | None:
        """The authenticator ``ASAP_AUTH_TOKENS`` / ``ASAP_AUTH_TOKENS_FILE`` describe, or
        None when neither is set (authentication off)."""
        tokens: dict[str, str] = {}
        if file:
            try:
                text = Path(file).read_text()
            except OSError as exc:
                raise ConfigurationError(
                    f"ASAP_AUTH_TOKENS_FILE: cannot read {file!r}: {exc.strerror}"
                ) from None
            tokens.update(parse_tokens(text, "ASAP_AUTH_TOKENS_FILE"))
        if inline:
            for token, urn in parse_tokens(inline).items():
                if tokens.setdefault(token, urn) != urn:
                    raise ConfigurationError("ASAP_AUTH_TOKENS: one token is given to two agents")
        if not tokens and (inline or file):
            raise ConfigurationError("ASAP_AUTH_TOKENS: no tokens configured")
        protect(tokens)  # never in a log line, whatever logs them
        return cls(tokens) if tokens else None

    @property
    def tokens(self) -> int:
        """How many tokens are configured."""
        return len(self._entries)

    def identify(self, authorization: str | None) -> str:
        """The URN of the bearer token in ``authorization``; the spec 3.12 errors otherwise."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidRequestError({"error": "Authentication required", "status_code": 401})
        presented = _digest(token.strip())
        found = None
        for digest, urn in self._entries:  # every entry, so the time does not tell which
            if hmac.compare_digest(digest, presented):
                found = urn
        if found is None:
            raise InvalidRequestError({"error": "Invalid authentication token", "status_code": 401})
        return found


def sender_mismatch() -> InvalidParamsError:
    """The reply when the envelope's ``sender`` is not the authenticated agent (spec 3.12)."""
    return InvalidParamsError(
        {"error": "Sender does not match authenticated identity", "status_code": 403}
    )

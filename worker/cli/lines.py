"""JSON Lines input of plugin bodies: bounded reading and per-line validation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from worker.contract import (
    MAX_BODY_BYTES,
    Kind,
    PluginRequest,
    VerificationResult,
    kind_of,
    parse_request,
)
from worker.core import Reason, Rejected


def read_lines(stream: BinaryIO) -> Iterator[bytes | None]:
    """Yield each line without its newline, or None for a line longer than any valid body.

    Reading is bounded: an overlong line is skipped in chunks, never held in memory whole.
    """
    limit = MAX_BODY_BYTES + 2
    while True:
        line = stream.readline(limit)
        if not line:
            return
        if len(line) == limit and not line.endswith(b"\n"):
            while True:
                rest = stream.readline(limit)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line.rstrip(b"\r\n")


@dataclass(frozen=True)
class ParsedLine:
    """One input line: a valid request, or the rejection it earned."""

    body: dict[str, Any] | None
    request: PluginRequest | None
    rejection: VerificationResult | None
    kind: Kind | None
    key_id: str | None


def parse_line(raw: bytes | None) -> ParsedLine:
    """Validate one line against the plugin contract."""
    if raw is None:
        return ParsedLine(
            None,
            None,
            _rejected(
                None, None, Reason.INVALID_REQUEST, f"line is longer than {MAX_BODY_BYTES} bytes"
            ),
            None,
            None,
        )
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return ParsedLine(
            None,
            None,
            _rejected(None, None, Reason.INVALID_REQUEST, "line is not valid JSON"),
            None,
            None,
        )
    kind = kind_of(body) if isinstance(body, dict) else None
    key_id = body.get("keyId") if isinstance(body, dict) else None
    key_id = key_id if isinstance(key_id, str) and len(key_id) <= 128 else None
    try:
        request = parse_request(body)
    except Rejected as exc:
        return ParsedLine(None, None, _rejected(kind, key_id, exc.reason, exc.detail), kind, key_id)
    return ParsedLine(body, request, None, kind, key_id)


def _rejected(
    kind: Kind | None, key_id: str | None, reason: Reason, detail: str
) -> VerificationResult:
    return VerificationResult.rejection(kind=kind, key_id=key_id, reason=reason, detail=detail)

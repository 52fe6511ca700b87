"""API keys: only their SHA-256 hashes are kept, and a presented key is checked against all of
them in constant time. With no key configured, every request is refused (fail closed).

Keys are configured as ``name:key`` (the name is what verdicts record as their submitter and
logs may show) or as a bare key, which is then known by a fingerprint of its hash. A bare key of
an earlier release that happens to look like ``name:key`` keeps working: such an entry accepts
the whole entry as well as the part after the name, as the same caller.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from pydantic import SecretStr

from producer.batching import Owner

_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,48}")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class Caller:
    """An authenticated API key: its name, its hash (for per-key accounting) and the owner
    identity its jobs are sealed and recorded under."""

    name: str
    digest: bytes = field(repr=False)
    owner: Owner = field(repr=False)


def parse_key(entry: str) -> tuple[str | None, str]:
    """Split a configured entry into (name or None, key): ``name:key`` when the part before
    the first colon is a name (letters, digits, ``._-``, up to 48), else the entry is a key."""
    name, sep, key = entry.partition(":")
    if sep and key and _NAME.fullmatch(name):
        return name, key
    return None, entry


class ApiKeys:
    """The configured API keys, as hashes."""

    def __init__(self, keys: Iterable[SecretStr]) -> None:
        accepted: list[tuple[bytes, Caller]] = []
        names: set[str] = set()
        for entry in keys:
            text = entry.get_secret_value()
            name, key = parse_key(text)
            # An empty key would let an empty bearer token in; it is ignored, not accepted.
            if not key:
                continue
            digest = _digest(key)
            name = name or f"key-{hashlib.sha256(b'fingerprint' + digest).hexdigest()[:12]}"
            if name in names:
                raise ValueError(f"API key name {name!r} is configured twice")
            names.add(name)
            caller = Caller(name, digest, Owner.from_secret(name, digest))
            accepted.append((digest, caller))
            if key != text:
                # The whole entry, for callers that were given it as a bare key.
                accepted.append((_digest(text), caller))
        self._accepted = tuple(accepted)
        self._count = len(names)

    def __len__(self) -> int:
        return self._count

    def match(self, presented: str | None) -> Caller | None:
        """The caller whose key ``presented`` is, or None when it is none of them.

        Compares against every stored hash without stopping at a match, so the time taken
        reveals neither which key matched nor how many are configured before it.
        """
        digest = _digest(presented or "")
        found: Caller | None = None
        for stored, caller in self._accepted:
            if hmac.compare_digest(digest, stored):
                found = caller
        # A missing or empty key hashes like any other and matches nothing: empty keys are
        # never stored.
        return found

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys (compared as ``match`` does)."""
        return self.match(presented) is not None

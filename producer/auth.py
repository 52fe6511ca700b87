"""API keys: only their SHA-256 hashes are kept, and a presented key is checked against all of
them in constant time. With no key configured, every request is refused (fail closed)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pydantic import SecretStr


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The configured API keys, as hashes."""

    def __init__(self, keys: Iterable[SecretStr]) -> None:
        # An empty key would let an empty bearer token in; it is ignored, not accepted.
        self._digests = tuple(
            _digest(key.get_secret_value()) for key in keys if key.get_secret_value()
        )

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, presented: str | None) -> bytes | None:
        """The stored hash of the key ``presented`` is, or None when it is none of them.

        Compares against every stored hash without stopping at a match, so the time taken
        reveals neither which key matched nor how many are configured before it. The hash
        identifies the key for per-key accounting (rate limits) without keeping the key.
        """
        digest = _digest(presented or "")
        found: bytes | None = None
        for stored in self._digests:
            if hmac.compare_digest(digest, stored):
                found = stored
        # A missing or empty key hashes like any other and matches nothing: empty keys are
        # never stored.
        return found

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys (compared as ``match`` does)."""
        return self.match(presented) is not None

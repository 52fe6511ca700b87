"""Apple's fraud-metric service: the token it wants and the exchange of a receipt.

``AppleToken`` makes the ES256 JWT Apple's DeviceCheck services accept and reuses it for about
half an hour (Apple refuses a token older than an hour, and asks that one not be made for
every call). ``ReceiptExchange`` posts a stored receipt and maps Apple's answer to a typed
outcome; it never raises for an HTTP status, only for a programming error.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from worker.core.refreshed import APPLE_DATA_DEVELOPMENT_URL, APPLE_DATA_URL

__all__ = [
    "APPLE_DATA_DEVELOPMENT_URL",
    "APPLE_DATA_URL",
    "AppleToken",
    "Exchange",
    "ExchangeOutcome",
    "ReceiptExchange",
]

# A token is reused this long, and never sent older than Apple's one hour.
TOKEN_REUSE: Final = timedelta(minutes=30)
TOKEN_MAX_AGE: Final = timedelta(hours=1)
# A receipt is about 4 KiB; anything much longer is not one.
_MAX_ANSWER_BYTES: Final = 256 * 1024
_P256_COORDINATE: Final = 32


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class AppleToken:
    """The JWT for Apple's DeviceCheck services, from the team's ``.p8`` P-256 key.

    Header ``{"alg": "ES256", "kid": key_id}``, claims ``{"iss": team_id, "iat": now}``, the
    signature as JOSE r||s. ``token(now)`` returns the cached token while it is younger than
    ``reuse`` (30 minutes) and makes a new one otherwise; thread-safe. Raises ``ValueError`` at
    construction for a key that is not P-256, a key id that is not 10 characters or an empty
    team id.
    """

    def __init__(
        self,
        *,
        team_id: str,
        key_id: str,
        private_key: ec.EllipticCurvePrivateKey,
        reuse: timedelta = TOKEN_REUSE,
    ) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("the DeviceCheck key must be a P-256 key")
        if len(key_id) != 10 or not key_id.isalnum():
            raise ValueError("the DeviceCheck key id has 10 letters and digits")
        if not team_id:
            raise ValueError("the team id is required")
        if not timedelta(0) < reuse < TOKEN_MAX_AGE:
            raise ValueError("a token is reused for less than an hour")
        self.team_id = team_id
        self.key_id = key_id
        self._key = private_key
        self._reuse = reuse
        self._lock = threading.Lock()
        self._cached: tuple[datetime, str] | None = None

    @classmethod
    def from_p8(cls, *, team_id: str, key_id: str, pem: bytes) -> AppleToken:
        """Load the ``.p8`` file's PEM (PKCS#8); raises ``ValueError`` if it is not a P-256
        private key."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the .p8 file does not hold an elliptic-curve private key")
        return cls(team_id=team_id, key_id=key_id, private_key=key)

    def token(self, now: datetime) -> str:
        """A token issued at most ``reuse`` before ``now``."""
        with self._lock:
            if self._cached is not None:
                issued, token = self._cached
                if issued <= now < issued + self._reuse:
                    return token
            token = self._sign(now)
            self._cached = (now, token)
            return token

    def invalidate(self) -> None:
        """Forget the cached token (after Apple refused it)."""
        with self._lock:
            self._cached = None

    def _sign(self, now: datetime) -> str:
        header = {"alg": "ES256", "kid": self.key_id}
        claims = {"iss": self.team_id, "iat": int(now.timestamp())}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        # JOSE wants the two integers as fixed-width big-endian, not the DER that OpenSSL gives.
        raw = r.to_bytes(_P256_COORDINATE, "big") + s.to_bytes(_P256_COORDINATE, "big")
        return signing_input + "." + _b64url(raw)


class ExchangeOutcome(StrEnum):
    """What one exchange came to. Stable codes: they are stored and reported."""

    REFRESHED = "refreshed"  # 200: a new receipt (still to be verified)
    TOO_EARLY = "too_early"  # 304: before the receipt's not-before
    BAD_REQUEST = "bad_request"  # 400: bad payload or wrong environment
    UNAUTHORIZED = "unauthorized"  # 401: the token was refused (configuration error)
    NO_DATA = "no_data"  # 404: Apple no longer holds data for the key
    RETRY_LATER = "retry_later"  # 429, 5xx, timeouts, connection errors


@dataclass(frozen=True)
class Exchange:
    """The answer to one exchange: its outcome, the new receipt for ``REFRESHED``, and a
    human detail (the status, the transport error)."""

    outcome: ExchangeOutcome
    receipt: bytes | None = None
    detail: str = ""
    retry_after: float | None = None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 86_400 else None


def _bounded_body(response: httpx.Response) -> bytes | None:
    """The answer's body, read no further than ``_MAX_ANSWER_BYTES``: None when it is longer
    (a receipt is about 4 KiB; whatever answers is never let fill the memory)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > _MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class ReceiptExchange:
    """Posts receipts to Apple's fraud-metric service over one pooled HTTP client.

    Takes the token maker, the production and development URLs, a timeout in seconds and the
    clock. Thread-safe (httpx's client is), so an I/O pool of threads can share one. Close it
    with ``close()``.
    """

    def __init__(
        self,
        *,
        token: AppleToken,
        production_url: str = APPLE_DATA_URL,
        development_url: str = APPLE_DATA_DEVELOPMENT_URL,
        timeout: float = 10.0,
        max_connections: int = 32,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._token = token
        self._urls = {"production": production_url, "development": development_url}
        self._clock = clock
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def exchange(self, receipt: bytes, environment: str) -> Exchange:
        """Trade ``receipt`` of a key in ``environment`` (production or development)."""
        url = self._urls.get(environment)
        if url is None:
            raise ValueError(f"unknown environment {environment!r}")
        try:
            with self._client.stream(
                "POST",
                url,
                content=base64.b64encode(receipt),
                headers={
                    "Authorization": self._token.token(self._clock()),
                    "Content-Type": "application/octet-stream",
                },
            ) as response:
                body = _bounded_body(response)
        except httpx.HTTPError as exc:
            return Exchange(ExchangeOutcome.RETRY_LATER, detail=f"{type(exc).__name__}: {exc}")
        return self._outcome(response, body)

    def _outcome(self, response: httpx.Response, body: bytes | None) -> Exchange:
        status = response.status_code
        if status == 200:
            if body is None:
                return Exchange(ExchangeOutcome.RETRY_LATER, detail="answer is too large")
            try:
                raw = base64.b64decode(body.strip(), validate=True)
            except (binascii.Error, ValueError):
                return Exchange(ExchangeOutcome.RETRY_LATER, detail="answer is not base64")
            return Exchange(ExchangeOutcome.REFRESHED, receipt=raw, detail="200")
        if status == 304:
            return Exchange(ExchangeOutcome.TOO_EARLY, detail="304")
        if status == 400:
            return Exchange(ExchangeOutcome.BAD_REQUEST, detail="400")
        if status == 401:
            self._token.invalidate()
            return Exchange(ExchangeOutcome.UNAUTHORIZED, detail="401")
        if status == 404:
            return Exchange(ExchangeOutcome.NO_DATA, detail="404")
        return Exchange(
            ExchangeOutcome.RETRY_LATER, detail=str(status), retry_after=_retry_after(response)
        )

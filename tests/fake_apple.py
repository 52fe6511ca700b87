"""A local fake of Apple's fraud-metric service, for tests and benchmarks.

``FakeApple`` is a real HTTP server on 127.0.0.1 in a thread. It checks what Apple checks: the
JWT (ES256, the expected ``kid`` and ``iss``, the signature with the public half of the test
``.p8`` key, not older than an hour), the environment (the path: ``/production/...`` or
``/development/...``), and the receipt sent: signed under the test receipt CA and either an
ATTEST receipt or a RECEIPT this fake issued. It answers 200 with a fresh DER RECEIPT under
that CA (risk metric ``risk_metric``, not-before a day later), 304 when the receipt sent is
before its not-before, or whatever status ``force`` asks for. ``forge`` replaces the receipt
of a 200 answer, for the forged-answer tests; ``body`` replaces a 200 answer's body outright
(malformed answers). Like Apple, it enforces a rate limit when ``rate_limit`` is set: more
than that many requests within one second are answered 429. 429 and 5xx answers carry
``Retry-After: retry_after``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.factory import ReceiptCA, make_receipt
from worker.core.reasons import Rejected
from worker.core.receipt import Receipt, ReceiptTrustStore, verify_receipt

TEAM_ID = "TEAMID1234"
KEY_ID = "KEYID12345"


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class FakeApple:
    """The fake service's configuration and what it saw; see the module docstring."""

    ca: ReceiptCA
    public_key: ec.EllipticCurvePublicKey
    team_id: str = TEAM_ID
    key_id: str = KEY_ID
    risk_metric: int = 1
    not_before_delay: timedelta = timedelta(days=1)
    latency: float = 0.0
    rate_limit: int | None = None
    retry_after: str = "1"
    body: bytes | None = None
    arrivals: list[float] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    force_always: int | None = None
    forge: Callable[[Receipt, datetime], bytes] | None = None
    statuses: Counter[int] = field(default_factory=Counter)
    tokens: set[str] = field(default_factory=set)
    issued: set[bytes] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def url(self, environment: str) -> str:
        """The exchange URL of ``environment`` on this fake."""
        return f"http://127.0.0.1:{self.port}/{environment}/v1/attestationData"

    def force(self, *statuses: int) -> None:
        """Answer the next calls with these statuses, in order, whatever they send."""
        with self.lock:
            self.forced.extend(statuses)

    def answer(self, path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        """The status and body for one request."""
        if self.latency:
            time.sleep(self.latency)
        with self.lock:
            now_s = time.monotonic()
            self.arrivals.append(now_s)
            if self.rate_limit is not None:
                recent = [t for t in self.arrivals[-(self.rate_limit + 1) :] if t > now_s - 1.0]
                if len(recent) > self.rate_limit:
                    return 429, b""
            if self.forced:
                return self.forced.pop(0), b""
            if self.force_always is not None:
                return self.force_always, b""
        environment = path.split("/")[1] if path.count("/") >= 3 else ""
        if environment not in ("production", "development") or not path.endswith(
            "/v1/attestationData"
        ):
            return 404, b""
        if not self._token_ok(headers.get("Authorization", "")):
            return 401, b""
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return 400, b""
        now = datetime.now(UTC)
        try:
            sent = verify_receipt(
                receipt=raw, trust=ReceiptTrustStore.replacing_apple_root(self.ca.root_pem), now=now
            )
        except Rejected:
            return 400, b""
        expected_env = "production" if environment == "production" else "sandbox"
        if (sent.environment or "production") != expected_env:
            return 400, b""
        if sent.receipt_type == "RECEIPT":
            with self.lock:
                if hashlib.sha256(raw).digest() not in self.issued:
                    return 400, b""
            if sent.not_before is not None and now < sent.not_before:
                return 304, b""
        fresh = (
            self.forge(sent, now)
            if self.forge is not None
            else make_receipt(
                ca=self.ca,
                app_id=sent.app_id,
                credential_certificate_der=sent.credential_certificate,
                client_hash=b"\x00" * 8,  # Apple mangles field 4 in refreshed receipts
                receipt_type="RECEIPT",
                environment=sent.environment,
                creation_time=now,
                not_before=now + self.not_before_delay,
                expiration_time=now + timedelta(days=90),
                risk_metric=self.risk_metric,
                token=sent.token,
                der=True,
            )
        )
        with self.lock:
            self.issued.add(hashlib.sha256(fresh).digest())
            if self.body is not None:
                return 200, self.body
        return 200, base64.b64encode(fresh)

    def busiest_second(self) -> int:
        """The most requests that arrived within any one second."""
        with self.lock:
            times = sorted(self.arrivals)
        most, start = 0, 0
        for end, at in enumerate(times):
            while times[start] <= at - 1.0:
                start += 1
            most = max(most, end - start + 1)
        return most

    def _token_ok(self, token: str) -> bool:
        parts = token.split(".")
        if len(parts) != 3 or token.lower().startswith("bearer"):
            return False
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error):
            return False
        if header != {"alg": "ES256", "kid": self.key_id} or set(claims) != {"iss", "iat"}:
            return False
        if claims["iss"] != self.team_id or not isinstance(claims["iat"], int):
            return False
        if not 0 <= time.time() - claims["iat"] <= 3600 or len(signature) != 64:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self.public_key.verify(
                der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            return False
        with self.lock:
            self.tokens.add(token)
        return True


@contextmanager
def running(fake: FakeApple) -> Iterator[FakeApple]:
    """Serve ``fake`` on 127.0.0.1 for the length of the block."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            status, answer = fake.answer(self.path, self.headers, body)
            with fake.lock:
                fake.statuses[status] += 1
            self.send_response(status)
            if status == 429 or status >= 500:
                self.send_header("Retry-After", fake.retry_after)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

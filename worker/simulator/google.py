"""A local stand-in for Google's two Play Integrity endpoints, served over real HTTP: the
tests and benchmarks use it (as ``tests.fake_google``), and ``appattest simulate --android``
runs Android devices against a service pointed at it. Built from Google's public protocol.

- ``POST /token``: the OAuth 2.0 token endpoint a service account signs in at. It checks the
  JWT assertion's RS256 signature with the test service account's public key, its key id,
  issuer, audience (Google's token endpoint, as Google checks it, or this one), scope and
  lifetime, and hands out random access tokens.
- ``POST /v1/{packageName}:decodeIntegrityToken``: checks the bearer token and the package, and
  answers the payload the test registered for the integrity token (400 for a token it does not
  know, 403 for a token of another package), or the statuses queued with ``fail_next``, after
  ``latency`` seconds.

``service_account_file`` writes the credentials JSON (with ``token_uri`` pointing here) that
``PlayIntegrityClient`` reads.
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from worker.core.integrity import request_hash
from worker.queue.play_integrity import SCOPE

CLIENT_EMAIL = "verifier@appattest-test.iam.gserviceaccount.com"
# google-auth names Google's token endpoint as the audience of its JWT assertion whatever the
# credentials' token_uri says (the request itself goes to token_uri), and Google accepts that.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@functools.cache
def _service_account_key() -> rsa.RSAPrivateKey:
    # One test service account per test process: generating RSA keys is slow.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _open_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(raw: bytes) -> str:
    """Base64url without padding, as Google writes certificate digests."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def payload(
    *,
    package_name: str,
    signed_text: str,
    certificate_digest: bytes,
    at: datetime,
    app_recognition: str = "PLAY_RECOGNIZED",
    device_labels: tuple[str, ...] = ("MEETS_BASIC_INTEGRITY", "MEETS_DEVICE_INTEGRITY"),
    licensing: str = "LICENSED",
    version_code: int = 42,
    activity: str | None = "LEVEL_1",
    request_package_name: str | None = None,
) -> dict[str, Any]:
    """A ``decodeIntegrityToken`` answer for a token the app requested at ``at`` over the
    challenge or payload ``signed_text``, shaped as Google's (int64 fields as strings)."""
    device: dict[str, Any] = {"deviceRecognitionVerdict": list(device_labels)}
    if activity is not None:
        device["recentDeviceActivity"] = {"deviceActivityLevel": activity}
    return {
        "tokenPayloadExternal": {
            "requestDetails": {
                "requestPackageName": request_package_name or package_name,
                "requestHash": request_hash(signed_text),
                "timestampMillis": str(int(at.timestamp() * 1000)),
            },
            "appIntegrity": {
                "appRecognitionVerdict": app_recognition,
                "packageName": package_name,
                "certificateSha256Digest": [b64url(certificate_digest)],
                "versionCode": str(version_code),
            },
            "deviceIntegrity": device,
            "accountDetails": {"appLicensingVerdict": licensing},
            "environmentDetails": {"playProtectVerdict": "NO_ISSUES"},
        }
    }


@dataclass
class FakeGoogle:
    """The fake's state; tests change it while the server runs."""

    url: str = ""
    key: rsa.RSAPrivateKey = field(default_factory=lambda: _service_account_key())
    key_id: str = field(default_factory=lambda: secrets.token_hex(20))
    expires_in: int = 3600
    latency: float = 0.0
    tokens: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    access_tokens: set[str] = field(default_factory=set)
    failures: deque[int] = field(default_factory=deque)
    token_requests: int = 0
    decode_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Cleared by ``hold``: decode calls wait until ``release`` (Google slow for as long as a
    # test needs, without a timed guess).
    gate: threading.Event = field(default_factory=lambda: _open_event())

    def hold(self) -> None:
        """Make decode calls wait until ``release``."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account_file(self, directory: Path, name: str = "service-account.json") -> Path:
        """Write the test service account's credentials JSON; return its path."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path = directory / name
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "appattest-test",
                    "private_key_id": self.key_id,
                    "private_key": pem,
                    "client_email": CLIENT_EMAIL,
                    "client_id": "1234567890",
                    "token_uri": self.token_uri,
                }
            )
        )
        return path

    def add_token(self, package_name: str, answer: dict[str, Any]) -> str:
        """Register a fresh integrity token for ``package_name`` that decodes to ``answer``."""
        token = secrets.token_urlsafe(48)
        with self.lock:
            self.tokens[token] = (package_name, answer)
        return token

    def fail_next(self, *statuses: int) -> None:
        """Answer the next decode calls with these statuses, in order."""
        with self.lock:
            self.failures.extend(statuses)

    def revoke_access_tokens(self) -> None:
        with self.lock:
            self.access_tokens.clear()

    # The endpoints -------------------------------------------------------------------------

    def token_endpoint(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.token_requests += 1
        if form.get("grant_type") != [_JWT_BEARER] or len(form.get("assertion", [])) != 1:
            return 400, {"error": "unsupported_grant_type"}
        problem = self._jwt_problem(form["assertion"][0])
        if problem is not None:
            return 400, {"error": "invalid_grant", "error_description": problem}
        access = secrets.token_urlsafe(32)
        with self.lock:
            self.access_tokens.add(access)
        return 200, {"access_token": access, "expires_in": self.expires_in, "token_type": "Bearer"}

    def _jwt_problem(self, assertion: str) -> str | None:
        try:
            head, body, signature = assertion.split(".")
            header = json.loads(_b64url_decode(head))
            claims = json.loads(_b64url_decode(body))
            self.key.public_key().verify(
                _b64url_decode(signature),
                f"{head}.{body}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, InvalidSignature) as exc:
            return f"bad assertion: {type(exc).__name__}"
        now = time.time()
        checks = {
            "alg": header.get("alg") == "RS256",
            "kid": header.get("kid") == self.key_id,
            "iss": claims.get("iss") == CLIENT_EMAIL,
            "aud": claims.get("aud") in (GOOGLE_TOKEN_AUDIENCE, self.token_uri),
            "scope": claims.get("scope") == SCOPE,
            "iat": isinstance(claims.get("iat"), int) and claims["iat"] <= now + 60,
            "exp": isinstance(claims.get("exp"), int) and now < claims["exp"] <= now + 3700,
        }
        failed = [name for name, ok in checks.items() if not ok]
        return f"wrong {', '.join(failed)}" if failed else None

    def decode_endpoint(
        self, package_name: str, authorization: str | None, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.decode_requests += 1
            failure = self.failures.popleft() if self.failures else None
            latency = self.latency
        if latency:
            time.sleep(latency)
        self.gate.wait(timeout=120)
        bearer = (authorization or "").removeprefix("Bearer ")
        with self.lock:
            authorized = bearer in self.access_tokens
        if not authorized:
            return _error(401, "Request had invalid authentication credentials.")
        if failure is not None:
            return _error(failure, "failure asked for by the test")
        try:
            token = json.loads(body)["integrityToken"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "Invalid JSON payload received.")
        with self.lock:
            known = self.tokens.get(token)
        if known is None:
            return _error(400, "Integrity token cannot be decoded due to invalid arguments.")
        if known[0] != package_name:
            return _error(403, "You are not authorized to decode the requested integrity token.")
        return 200, known[1]


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {
        "error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "")}
    }


def _handler(fake: FakeGoogle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/token":
                status, answer = fake.token_endpoint(parse_qs(body.decode()))
            elif self.path.startswith("/v1/") and self.path.endswith(":decodeIntegrityToken"):
                package = unquote(self.path.removeprefix("/v1/").split(":")[0])
                status, answer = fake.decode_endpoint(
                    package, self.headers.get("Authorization"), body
                )
            else:
                status, answer = 404, {"error": {"code": 404, "message": "no such route"}}
            data = json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a test of timeouts)

    return Handler


def load_service_account(path: Path) -> tuple[rsa.RSAPrivateKey, str, int]:
    """The key, key id and port of a service-account file ``service_account_file`` wrote
    (its ``token_uri`` names the port). Raises ``ValueError`` for anything else."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        key = serialization.load_pem_private_key(document["private_key"].encode(), None)
        port = urlsplit(document["token_uri"]).port
        key_id = document["private_key_id"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a simulated service account: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or port is None or not isinstance(key_id, str):
        raise ValueError(f"{path} is not a simulated service account")
    return key, key_id, port


@contextmanager
def fake_google(
    key: rsa.RSAPrivateKey | None = None, *, key_id: str | None = None, port: int = 0
) -> Iterator[FakeGoogle]:
    """Serve a ``FakeGoogle`` on 127.0.0.1 (``port``, or a free one) for the duration of the
    block; its service account has ``key`` (and ``key_id``), or this process's one."""
    fake = FakeGoogle() if key is None else FakeGoogle(key=key)
    if key_id is not None:
        fake.key_id = key_id
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="fake-google", daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        fake.release()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

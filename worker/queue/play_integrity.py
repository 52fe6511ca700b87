"""Google's side of Play Integrity: a service account's access token and ``decodeIntegrityToken``.

An Android job's token can only be decoded by Google. This client signs in as the configured
service account (the ``google-auth`` library builds and signs the JWT assertion; its requests
go through our own pooled httpx client, to the ``token_uri`` the credentials file names),
keeps the access token until shortly before it expires, and asks Google to decode tokens with
bounded, jittered retries. It is thread-safe: one client serves all the threads of a process.

Two outcomes besides a decoded payload, kept apart so that neither can become an accept:
``TokenRefused`` (Google looked at the token and will not decode it: a rejection of the
request) and ``GoogleUnavailable`` (Google could not be asked, after the retries: the request
was not judged).
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import google.auth.exceptions
import google.auth.transport
import httpx
from google.oauth2 import service_account

from worker.core.integrity import GoogleUnavailable, TokenRefused

log = logging.getLogger(__name__)

__all__ = [
    "PLAY_INTEGRITY_URL",
    "SCOPE",
    "GoogleUnavailable",
    "PlayIntegrityClient",
    "TokenRefused",
]

PLAY_INTEGRITY_URL: Final = "https://playintegrity.googleapis.com"
SCOPE: Final = "https://www.googleapis.com/auth/playintegrity"
# Statuses worth asking again: quota exceeded and Google's own failures.
_RETRYABLE: Final = frozenset({429, 500, 502, 503, 504})
# Google's answer to a token it will not decode: 400 INVALID_ARGUMENT (not a token it can
# read: truncated, altered, expired or of another format) and 403 PERMISSION_DENIED ("not
# authorized to decode the requested integrity token": a token of another app or Cloud
# project). 403 is also what a service account without access to the app gets; every token is
# then refused, which fails closed and is logged as a warning.
_REFUSED: Final = frozenset({400, 403})
_MAX_ANSWER_BYTES: Final = 256 * 1024


class _Response(google.auth.transport.Response):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def data(self) -> bytes:
        return self._response.content


class _Request(google.auth.transport.Request):
    """google-auth's transport interface over our httpx client: the service-account sign-in
    goes through the same pool, timeouts and proxies as the decode calls."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Response:
        try:
            response = self._client.request(
                method,
                url,
                content=body,
                headers=dict(headers or {}),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise google.auth.exceptions.TransportError(str(exc)) from exc  # type: ignore[no-untyped-call]
        return _Response(response)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class PlayIntegrityClient:
    """Decodes Play Integrity tokens with a service account's credentials.

    Takes the service-account JSON file (its ``token_uri`` is where the client signs in), the
    API's base URL, the timeout of one HTTP call, how many attempts a decode makes (429, 5xx,
    network errors and a rejected access token are tried again, with full-jitter exponential
    backoff from ``backoff_seconds`` up to ``max_backoff_seconds``, or Google's Retry-After
    when it is shorter than that bound) and the size of the connection pool.
    """

    def __init__(
        self,
        *,
        credentials_file: Path,
        base_url: str = PLAY_INTEGRITY_URL,
        timeout_seconds: float = 10.0,
        attempts: int = 4,
        backoff_seconds: float = 0.25,
        max_backoff_seconds: float = 5.0,
        max_connections: int = 100,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        try:
            self._credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(credentials_file), scopes=[SCOPE]
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(
                f"{credentials_file} is not a readable Google service-account JSON file: {exc}"
            ) from exc
        self._base_url = base_url.rstrip("/")
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._sleep = sleep
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 5.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._transport = _Request(self._http)
        self._lock = threading.Lock()
        self.token_refreshes = 0

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> PlayIntegrityClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _access_token(self, *, stale: str | None = None) -> str:
        """The service account's access token: the cached one until google-auth deems it near
        expiry (or Google rejected it: ``stale``), then a new one, fetched by one thread."""
        with self._lock:
            current = self._credentials.token
            if not self._credentials.valid or (stale is not None and current == stale):
                try:
                    self._credentials.refresh(self._transport)
                except google.auth.exceptions.GoogleAuthError as exc:
                    raise GoogleUnavailable(f"signing in to Google failed: {exc}") from exc
                self.token_refreshes += 1
            token = self._credentials.token
        if not isinstance(token, str) or not token:
            raise GoogleUnavailable("Google's token endpoint answered no access token")
        return token

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        bound = min(self._max_backoff, self._backoff * 2**attempt)
        hinted = _retry_after(response) if response is not None else None
        if hinted is not None:
            return min(hinted, self._max_backoff)
        return random.uniform(0, bound)  # noqa: S311 - jitter, not a secret

    def decode(self, *, package_name: str, token: str) -> dict[str, Any]:
        """Ask Google to decode one integrity token for ``package_name``; return its JSON.

        Raises ``TokenRefused`` when Google refuses the token (400, 403) and
        ``GoogleUnavailable`` when it could not be asked after the retries.
        """
        url = f"{self._base_url}/v1/{quote(package_name, safe='')}:decodeIntegrityToken"
        problem = "no attempt was made"
        stale: str | None = None
        for attempt in range(self._attempts):
            response: httpx.Response | None = None
            access = self._access_token(stale=stale)
            stale = None
            try:
                response = self._http.post(
                    url,
                    json={"integrityToken": token},
                    headers={"Authorization": f"Bearer {access}"},
                )
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 200:
                    return self._payload(response)
                if status in _REFUSED:
                    detail = _error_message(response)
                    if status == 403:
                        log.warning("Google refused to decode a token (403): %s", detail)
                    raise TokenRefused(status, detail)
                if status == 401:
                    # The access token was revoked or expired early: sign in again.
                    stale = access
                elif status not in _RETRYABLE:
                    raise GoogleUnavailable(f"Google answered {status}: {_error_message(response)}")
                problem = f"Google answered {status}"
            if attempt + 1 < self._attempts:
                self._sleep(self._delay(attempt, response))
        raise GoogleUnavailable(f"{problem} after {self._attempts} attempts")

    @staticmethod
    def _payload(response: httpx.Response) -> dict[str, Any]:
        if len(response.content) > _MAX_ANSWER_BYTES:
            raise GoogleUnavailable("Google's answer is too large")
        try:
            document = json.loads(response.content)
        except ValueError as exc:
            raise GoogleUnavailable("Google's answer is not JSON") from exc
        if not isinstance(document, dict):
            raise GoogleUnavailable("Google's answer is not a JSON object")
        return document


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        message = error.get("message") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        message = None
    return str(message or response.reason_phrase)[:200]

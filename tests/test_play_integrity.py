"""The Google client against the local fake of Google's token and decode endpoints, over HTTP:
the service-account sign-in, token reuse, retries, and the two kinds of failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fake_google import FakeGoogle, fake_google, payload
from worker.queue.play_integrity import GoogleUnavailable, PlayIntegrityClient, TokenRefused

PACKAGE = "com.example.app"


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    with fake_google() as fake:
        yield fake


class _Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _client(google: FakeGoogle, tmp_path: Path, **options: Any) -> PlayIntegrityClient:
    options.setdefault("sleep", _Sleeps())
    return PlayIntegrityClient(
        credentials_file=google.service_account_file(tmp_path), base_url=google.url, **options
    )


def _token(google: FakeGoogle, package: str = PACKAGE) -> tuple[str, dict[str, Any]]:
    answer = payload(
        package_name=package,
        signed_text="challenge",
        certificate_digest=b"\x01" * 32,
        at=datetime.now(UTC),
    )
    return google.add_token(package, answer), answer


def test_signs_in_once_and_reuses_the_access_token(google: FakeGoogle, tmp_path: Path) -> None:
    token, answer = _token(google)
    with _client(google, tmp_path) as client:
        for _ in range(3):
            assert client.decode(package_name=PACKAGE, token=token) == answer
    # The fake verified the JWT assertion's signature, key id, issuer, audience and scope.
    assert google.token_requests == 1 and google.decode_requests == 3


def test_a_token_near_expiry_is_renewed_before_use(google: FakeGoogle, tmp_path: Path) -> None:
    google.expires_in = 30  # inside google-auth's refresh margin: renewed before each use
    token, _ = _token(google)
    with _client(google, tmp_path) as client:
        client.decode(package_name=PACKAGE, token=token)
        client.decode(package_name=PACKAGE, token=token)
    assert google.token_requests == 2


def test_a_revoked_access_token_is_replaced(google: FakeGoogle, tmp_path: Path) -> None:
    token, answer = _token(google)
    with _client(google, tmp_path) as client:
        client.decode(package_name=PACKAGE, token=token)
        google.revoke_access_tokens()  # Google answers 401 to the cached token
        assert client.decode(package_name=PACKAGE, token=token) == answer
    assert google.token_requests == 2


def test_a_key_google_does_not_know_cannot_sign_in(google: FakeGoogle, tmp_path: Path) -> None:
    path = google.service_account_file(tmp_path)
    document = json.loads(path.read_text())
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with fake_google(other_key) as impostor:  # another service account's key, same email
        document["private_key"] = json.loads(impostor.service_account_file(tmp_path).read_text())[
            "private_key"
        ]
    path.write_text(json.dumps(document))
    token, _ = _token(google)
    client = PlayIntegrityClient(credentials_file=path, base_url=google.url)
    with client, pytest.raises(GoogleUnavailable, match="signing in"):
        client.decode(package_name=PACKAGE, token=token)
    assert google.decode_requests == 0


@pytest.mark.parametrize("statuses", [(429,), (500, 503), (429, 502, 500)])
def test_quota_and_outages_are_retried(
    google: FakeGoogle, tmp_path: Path, statuses: tuple[int, ...]
) -> None:
    token, answer = _token(google)
    google.fail_next(*statuses)
    sleeps = _Sleeps()
    with _client(google, tmp_path, sleep=sleeps, max_backoff_seconds=2.0) as client:
        assert client.decode(package_name=PACKAGE, token=token) == answer
    assert google.decode_requests == len(statuses) + 1
    assert len(sleeps) == len(statuses) and all(0 <= s <= 2.0 for s in sleeps)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_google_down_after_the_retries_is_unavailable(
    google: FakeGoogle, tmp_path: Path, status: int
) -> None:
    token, _ = _token(google)
    google.fail_next(*[status] * 10)
    client = _client(google, tmp_path, attempts=3)
    with client, pytest.raises(GoogleUnavailable, match=f"{status} after 3 attempts"):
        client.decode(package_name=PACKAGE, token=token)
    assert google.decode_requests == 3


def test_google_unreachable_is_unavailable(google: FakeGoogle, tmp_path: Path) -> None:
    with fake_google() as gone:
        dead_url = gone.url  # a port nothing listens on once the block ends
    client = PlayIntegrityClient(
        credentials_file=google.service_account_file(tmp_path),
        base_url=dead_url,
        attempts=2,
        sleep=_Sleeps(),
    )
    with client, pytest.raises(GoogleUnavailable, match=r"ConnectError.* after 2 attempts"):
        client.decode(package_name=PACKAGE, token="t")


@pytest.mark.parametrize(("status", "package_of_token"), [(400, None), (403, "com.example.other")])
def test_a_token_google_refuses_is_not_retried(
    google: FakeGoogle, tmp_path: Path, status: int, package_of_token: str | None
) -> None:
    token = _token(google, package_of_token)[0] if package_of_token else "forged token"
    with _client(google, tmp_path) as client, pytest.raises(TokenRefused) as refused:
        client.decode(package_name=PACKAGE, token=token)
    assert refused.value.status == status
    assert google.decode_requests == 1


def test_an_unexpected_status_is_unavailable_not_a_verdict(
    google: FakeGoogle, tmp_path: Path
) -> None:
    token, _ = _token(google)
    google.fail_next(404)
    with _client(google, tmp_path) as client, pytest.raises(GoogleUnavailable, match="404"):
        client.decode(package_name=PACKAGE, token=token)


def test_threads_share_one_client_and_one_sign_in(google: FakeGoogle, tmp_path: Path) -> None:
    google.latency = 0.05
    tokens = [_token(google) for _ in range(24)]
    with _client(google, tmp_path, max_connections=8) as client:

        def decode(item: tuple[str, dict[str, Any]]) -> bool:
            return client.decode(package_name=PACKAGE, token=item[0]) == item[1]

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(decode, tokens))
    assert google.token_requests == 1 and google.decode_requests == 24


def test_a_missing_credentials_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="service-account JSON"):
        PlayIntegrityClient(credentials_file=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="service-account JSON"):
        PlayIntegrityClient(credentials_file=tmp_path / "bad.json")

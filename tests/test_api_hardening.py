"""The API against callers that try to spend its memory, time and connections (issue 10).

Body and connection cases run against the documented deployment, ``appattest api`` in a
process of its own, over raw sockets: what matters there is what the server holds while a
client sends slowly or sends a lot, and its memory is measured apart from the test's. The
rest runs the app in a real uvicorn server in this process (``tests.faults.serve_app``). Tests
assert status codes, error codes and counts; the only clock is the deadline of a wait.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr

from producer import create_app
from producer.batching import new_batch_id, seal_job_id
from tests.faults import HOST, free_port, serve_app
from tests.stack import Stack, key_owner
from worker.queue.ledger import LEDGER_KEY
from worker.settings import Settings

KEY_A = "key-a"
KEY_B = "key-b"
MIB = 1024 * 1024
BODY_ROUTES = [
    "/v1/challenges",
    "/v1/attestations",
    "/v1/assertions",
    "/v1/jobs",
    "/v1/jobs/status",
]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def settings(stack: Stack) -> Settings:
    return stack.settings.model_copy(update={"api_keys": [SecretStr(KEY_A), SecretStr(KEY_B)]})


@contextmanager
def _served(settings: Settings, **changes: Any) -> Iterator[str]:
    with serve_app(create_app(settings.model_copy(update=changes))) as url:
        yield url


# The documented deployment: `appattest api` in a process of its own ---------------------------


@dataclass
class Deployed:
    """``appattest api`` running on ``port``."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def peak_rss(self) -> int:
        """The process's peak resident memory so far, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        return int(line.split()[1]) * 1024


@contextmanager
def deployed(stack: Stack, tmp_path: Path, **env: str) -> Iterator[Deployed]:
    """Run ``appattest api`` with the stack's settings, two API keys and ``env``."""
    port = free_port()
    log_path = tmp_path / f"api-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "appattest", "api", "--host", HOST, "--port", str(port)],
            env={**stack.env, "APPATTEST_API_KEYS": f"{KEY_A},{KEY_B}", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Deployed(process, port)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"appattest api did not start:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# Raw HTTP over sockets ----------------------------------------------------------------------


def _head(
    path: str,
    *,
    length: int | None = None,
    key: str | None = KEY_A,
    method: str = "POST",
    content_type: str | None = "application/json",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


@dataclass
class Answer:
    """What the server sent on one connection, until it closed it or the reader gave up."""

    raw: bytes = b""
    closed: bool = False
    arrived: threading.Event = field(default_factory=threading.Event)

    @property
    def status(self) -> int | None:
        if not self.raw.startswith(b"HTTP/1.1 "):
            return None
        return int(self.raw.split(b" ", 2)[1])

    @property
    def code(self) -> str:
        _, _, body = self.raw.partition(b"\r\n\r\n")
        return str(json.loads(body)["error"]["code"])


def _read(sock: socket.socket, answer: Answer, timeout: float) -> None:
    """Read what the server sends until it closes the connection or ``timeout`` passes."""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            answer.raw += chunk
            answer.arrived.set()
        answer.closed = True
    except (ConnectionResetError, BrokenPipeError):
        answer.closed = True
    except TimeoutError:
        pass
    answer.arrived.set()


@contextmanager
def _connection(port: int, timeout: float = 20) -> Iterator[tuple[socket.socket, Answer]]:
    """A connection with a thread reading its answer as it comes."""
    sock = socket.create_connection((HOST, port), timeout=10)
    answer = Answer()
    reader = threading.Thread(target=_read, args=(sock, answer, timeout), daemon=True)
    reader.start()
    try:
        yield sock, answer
    finally:
        reader.join(timeout + 5)
        sock.close()


# 5: memory, time and connections ------------------------------------------------------------


def _upload(port: int, body_size: int, chunk: bytes) -> tuple[Answer, int]:
    """POST a ``body_size``-byte batch without a key, as fast as the server takes it; return
    the answer and how many body bytes the server took before it answered."""
    with _connection(port) as (sock, answer):
        sock.sendall(_head("/v1/jobs", length=body_size, key=None))
        sent = 0
        try:
            while sent < body_size and not answer.arrived.is_set():
                sent += sock.send(chunk[: body_size - sent])
        except (BrokenPipeError, ConnectionResetError):
            pass
    return answer, sent


def test_unauthenticated_uploads_are_refused_before_their_body(
    stack: Stack, tmp_path: Path
) -> None:
    """12 connections without a key, each sending a 32 MiB batch (the largest a batch may
    be): each is answered 401 before its body is read, and the server's memory does not grow
    by what they send (the issue saw ~445 MiB)."""
    with deployed(stack, tmp_path) as server:
        # Warm up the paths the flood takes, so that the peak measures the flood alone.
        assert httpx.post(f"{server.url}/v1/jobs", json={}).status_code == 401
        before = server.peak_rss()
        chunk = b" " * MIB
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: _upload(server.port, 32 * MIB, chunk), range(12)))
        grown = server.peak_rss() - before
    print(f"peak RSS {before / MIB:.0f} MiB before, +{grown / MIB:.1f} MiB during the flood")
    assert [answer.status for answer, _ in results] == [401] * 12
    assert {answer.code for answer, _ in results} == {"unauthorized"}
    # The answer came before the client had sent its body (what it did send sits in socket
    # buffers), and the connection was closed rather than drained.
    assert all(sent < 32 * MIB for _, sent in results), [sent for _, sent in results]
    assert all(answer.closed for answer, _ in results)
    assert grown < 48 * MIB


def test_slow_bodies_and_heads_are_cut_at_their_deadlines(stack: Stack, tmp_path: Path) -> None:
    """Partial requests are answered 408 ``request_timeout`` and closed once their deadline
    passes (2 s here), whether the body or the head is slow; an idle new connection is
    closed too. Without deadlines the server held them as long as the client liked."""
    env = {"APPATTEST_BODY_TIMEOUT_SECONDS": "2", "APPATTEST_HEADER_TIMEOUT_SECONDS": "2"}
    with deployed(stack, tmp_path, **env) as server:
        with (
            _connection(server.port) as (slow_body, body_answer),
            _connection(server.port) as (slow_head, head_answer),
            _connection(server.port) as (_idle, idle_answer),
        ):
            slow_body.sendall(_head("/v1/attestations", length=1000) + b'{"platform": ')
            slow_head.sendall(b"POST /v1/attestations HTTP/1.1\r\nHost: x\r\n")
        # Each reader gives up after 20 s; a closed connection with an answer is the pass.
        assert body_answer.closed and body_answer.status == 408
        assert body_answer.code == "request_timeout"
        assert head_answer.closed and head_answer.status == 408
        assert head_answer.code == "request_timeout"
        assert idle_answer.closed and idle_answer.raw == b""
        # The server still answers whoever is quick.
        response = httpx.post(
            f"{server.url}/v1/challenges", json={"purpose": "registration"}, headers=_auth(KEY_A)
        )
        assert response.status_code == 201


def test_request_heads_are_bounded_and_pipelined_requests_are_answered(
    stack: Stack, tmp_path: Path
) -> None:
    """Under ``appattest api``: a head of 12 KiB of headers is served; one past 16 KiB is
    answered 431 ``invalid_request`` and its connection closed, even when it comes a little
    at a time (the parser would otherwise buffer it until the head deadline); two requests
    sent at once on one connection are answered in order on it."""
    with deployed(stack, tmp_path) as server:
        padded = _head("/healthz", method="GET", content_type=None, key=None)
        big_but_fine = padded.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * 12_000 + b"\r\n\r\n")
        with _connection(server.port, timeout=5) as (sock, fine):
            sock.sendall(big_but_fine)
            fine.arrived.wait(5)
        assert fine.status == 200

        with _connection(server.port) as (sock, refused):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(40):  # 40 x 1 KiB header lines, one by one
                    sock.sendall(b"X-Pad: " + b"b" * 1017 + b"\r\n")
                    if refused.arrived.is_set():
                        break
                    time.sleep(0.005)
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert refused.status == 431 and refused.code == "invalid_request"
        assert refused.closed

        with _connection(server.port, timeout=5) as (sock, pipelined):
            sock.sendall(
                _head("/healthz", method="GET", content_type=None, key=None)
                + _head("/healthz", method="GET", content_type=None, key=None)
            )
            deadline = time.monotonic() + 5
            while pipelined.raw.count(b"HTTP/1.1 200") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert pipelined.raw.count(b"HTTP/1.1 200") == 2, pipelined.raw

        # A request sent behind another whose body comes a moment later: both answered.
        body = json.dumps({"purpose": "registration"}).encode()
        with _connection(server.port, timeout=5) as (sock, behind):
            sock.sendall(
                _head("/healthz", method="GET", content_type=None, key=None)
                + _head("/v1/challenges", length=len(body))
            )
            time.sleep(0.05)
            sock.sendall(body)
            deadline = time.monotonic() + 5
            while b"HTTP/1.1 201" not in behind.raw and time.monotonic() < deadline:
                time.sleep(0.01)
        assert b"HTTP/1.1 200" in behind.raw and b"HTTP/1.1 201" in behind.raw, behind.raw

        # Two requests with 100 KB bodies sent at once: reads that end one body and start
        # the next head and body are not taken for framing.
        padded_body = json.dumps({"purpose": "registration", "pad": "x" * 100_000}).encode()
        one = _head("/v1/challenges", length=len(padded_body)) + padded_body
        with _connection(server.port, timeout=5) as (sock, two):
            sock.sendall(one + one)
            deadline = time.monotonic() + 5
            while two.raw.count(b"HTTP/1.1 ") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", two.raw)
        assert len(statuses) == 2 and b"431" not in statuses, two.raw[:300]


def test_pipelined_traffic_is_not_taken_for_an_oversized_head(stack: Stack, tmp_path: Path) -> None:
    """Reads shared by many requests: 2,000 pipelined GETs and 200 pipelined 10 KB POSTs, sent
    in pieces that end inside heads and bodies, are all answered (none 431); a head of 400
    empty header fields is refused (431) instead of kept field by field."""
    with deployed(stack, tmp_path) as server:
        get = _head("/healthz", method="GET", content_type=None, key=None)
        body = json.dumps({"purpose": "registration"}).encode() + b" " * 10_000
        post = _head("/v1/challenges", length=len(body)) + body
        for stream, count in ((get * 2000, 2000), (post * 200, 200)):
            with _connection(server.port, timeout=30) as (sock, answer):
                for start in range(0, len(stream), 1000):
                    sock.sendall(stream[start : start + 1000])
                deadline = time.monotonic() + 30
                while answer.raw.count(b"HTTP/1.1 ") < count and time.monotonic() < deadline:
                    time.sleep(0.02)
            statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer.raw)
            assert len(statuses) == count and set(statuses) <= {b"200", b"201"}, set(statuses)

        with _connection(server.port, timeout=10) as (sock, answer):
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + b"a:\r\n" * 400 + b"\r\n")
        assert answer.status == 431 and answer.closed


def _flood(sock: socket.socket, answer: Answer, start: bytes, pieces: int = 200) -> int:
    """Send ``start``, then 1 KiB pieces of one value until the server answers or closes;
    return how many pieces it took."""
    sent = 0
    try:
        sock.sendall(start)
        while sent < pieces and not answer.arrived.is_set():
            sock.sendall(b"v" * 1024)
            sent += 1
            time.sleep(0.002)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_a_head_or_trailer_grown_behind_a_request_is_bounded(stack: Stack, tmp_path: Path) -> None:
    """The head of a request sent behind another (pipelined) and the trailers of a chunked
    body are held to the same 16 KiB: a header or trailer value that keeps growing is cut
    (the connection closed, 431 when no other answer is being written) long before the
    200 KiB sent here, instead of buffered until the head or body deadline."""
    with deployed(stack, tmp_path) as server:
        behind = _head("/healthz", method="GET", content_type=None, key=None)
        with _connection(server.port, timeout=10) as (sock, answer):
            sent = _flood(sock, answer, behind + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
            deadline = time.monotonic() + 5
            while not answer.closed and time.monotonic() < deadline:
                time.sleep(0.01)
        assert answer.closed and sent < 100, (sent, answer.raw[:200])
        assert answer.raw.startswith(b"HTTP/1.1 200")

        chunked = (
            b"POST /v1/challenges HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {KEY_A}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"2\r\n{}\r\n0\r\nX-T: "
        )
        with _connection(server.port, timeout=10) as (sock, answer):
            sent = _flood(sock, answer, chunked)
            deadline = time.monotonic() + 5
            while not answer.closed and time.monotonic() < deadline:
                time.sleep(0.01)
        assert answer.closed and sent < 100, (sent, answer.raw[:200])
        assert answer.status == 431 and answer.code == "invalid_request"


def test_connections_per_client_address_are_bounded(stack: Stack, tmp_path: Path) -> None:
    """Under ``appattest api``, one address holds at most max_connections_per_client open
    connections: one more is answered 429 ``too_many_connections`` and closed; once the
    others close, the address is served again."""
    env = {"APPATTEST_MAX_CONNECTIONS_PER_CLIENT": "4", "APPATTEST_BODY_TIMEOUT_SECONDS": "30"}
    with deployed(stack, tmp_path, **env) as server:
        held = [socket.create_connection((HOST, server.port), timeout=10) for _ in range(4)]
        try:
            for sock in held:
                sock.sendall(_head("/v1/attestations", length=1000) + b"{")
            with _connection(server.port) as (extra, answer):
                extra.sendall(_head("/v1/challenges", method="GET", content_type=None))
            assert answer.status == 429 and answer.code == "too_many_connections"
            assert answer.closed
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{server.url}/healthz").status_code) == 429:
            assert time.monotonic() < deadline, "the closed connections were never released"
            time.sleep(0.05)
        assert status == 200


def test_requests_in_progress_per_client_address_are_bounded(settings: Settings) -> None:
    """Under any ASGI server, the app's guard admits at most max_connections_per_client
    requests of one address at once: the next is 429 ``too_many_connections``."""
    with _served(settings, max_connections_per_client=3, body_timeout_seconds=30) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection((HOST, port), timeout=10) for _ in range(3)]
        try:
            for sock in held:
                sock.sendall(_head("/v1/attestations", length=1000) + b"{")
            # The slow requests reach the app a moment after they were sent.
            deadline = time.monotonic() + 10
            while (response := httpx.get(f"{url}/healthz")).status_code == 200:
                assert time.monotonic() < deadline, "a fourth request was admitted"
                time.sleep(0.05)
            assert response.status_code == 429
            assert response.json()["error"]["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{url}/healthz").status_code) == 429:
            assert time.monotonic() < deadline, "the finished requests were never released"
            time.sleep(0.05)
        assert status == 200


def test_body_bytes_held_at_once_are_bounded(settings: Settings) -> None:
    """Bodies held by one process are bounded by max_body_bytes_in_flight: while a slow upload
    of 600 KiB (declared) is held, with a budget of 1 MiB, another 600 KiB body is 503
    ``service_unavailable`` with Retry-After, while a small body still fits; once the upload
    ends, the large body is served. A single body larger than the budget is admitted when
    nothing else is held."""
    large = {"purpose": "registration", "pad": "x" * (600 * 1024)}
    small = {"purpose": "registration"}
    with _served(
        settings, max_body_bytes=MIB, max_body_bytes_in_flight=MIB, body_timeout_seconds=30
    ) as url:
        port = int(url.rsplit(":", 1)[1])
        held = socket.create_connection((HOST, port), timeout=10)
        try:
            held.sendall(_head("/v1/attestations", length=600 * 1024) + b"{")
            deadline = time.monotonic() + 10
            while (
                answer := httpx.post(f"{url}/v1/challenges", json=large, headers=_auth(KEY_A))
            ).status_code != 503:
                # The held upload reaches the app a moment after it was sent.
                assert answer.status_code == 422, answer.text
                assert time.monotonic() < deadline, "the held body was never counted"
                time.sleep(0.05)
            assert answer.json()["error"]["code"] == "service_unavailable"
            assert answer.headers["Retry-After"] == "1"
            fits = httpx.post(f"{url}/v1/challenges", json=small, headers=_auth(KEY_A))
            assert fits.status_code == 201, fits.text
        finally:
            held.close()
        deadline = time.monotonic() + 10
        while (
            answer := httpx.post(f"{url}/v1/challenges", json=large, headers=_auth(KEY_A))
        ).status_code == 503:
            assert time.monotonic() < deadline, "the ended upload was never released"
            time.sleep(0.05)
        # Read whole and refused by the schema (an unknown field), not by the budget.
        assert answer.status_code == 422, answer.text
    with _served(settings, max_body_bytes=4 * MIB, max_body_bytes_in_flight=MIB) as url:
        big = {"purpose": "registration", "pad": "x" * (2 * MIB)}
        answer = httpx.post(f"{url}/v1/challenges", json=big, headers=_auth(KEY_A))
        assert answer.status_code == 422, answer.text


# 6: status polling is charged for what it costs -------------------------------------------------


def _pending_ids(settings: Settings, key: str, count: int) -> list[str]:
    """Ids of jobs accepted for ``key`` and still on their way (their batch is in the ledger
    and no worker has it), so that a wait on them lasts its whole time."""
    owner = key_owner(key)
    batch_id = new_batch_id()
    client = redis.Redis.from_url(settings.broker_url)
    try:
        client.zadd(LEDGER_KEY, {batch_id: time.time()})
    finally:
        client.close()
    return [seal_job_id(owner, batch_id, i) for i in range(count)]


def _status_wait(settings: Settings, url: str, key: str, ids: int, wait: float) -> httpx.Response:
    body = {"jobIds": _pending_ids(settings, key, ids)}
    return httpx.post(
        f"{url}/v1/jobs/status",
        params={"wait": wait},
        json=body,
        headers=_auth(key),
        timeout=wait + 30,
    )


def test_status_reads_cost_one_token_per_id(settings: Settings) -> None:
    """Key B floods ``POST /v1/jobs/status?wait`` with 1,000 random ids each: its bucket of
    2,000 tokens pays for two such requests, the rest are 429 ``rate_limited``; key A, polling
    meanwhile, is served every time. (The issue saw all 300 of B's requests served for 300
    tokens.)"""
    with _served(settings, rate_limit_per_second=10, rate_limit_burst=2000) as url:
        with ThreadPoolExecutor(16) as pool:
            flood = [pool.submit(_status_wait, settings, url, KEY_B, 1000, 2) for _ in range(30)]
            polls = [pool.submit(_status_wait, settings, url, KEY_A, 10, 0.5) for _ in range(20)]
            b = Counter(f.result().status_code for f in flood)
            a = Counter(f.result().status_code for f in polls)
        refused = [f.result() for f in flood if f.result().status_code == 429]
    assert b == {200: 2, 429: 28}, b
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limited"}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert a == {200: 20}, a


def test_waits_per_key_are_bounded(settings: Settings) -> None:
    """With a rate limit that B cannot exhaust, B's concurrent waits still hold at most
    max_waits_per_key job ids: of six waits on 1,000 ids (for 8 s), one is admitted and five are 429
    ``too_many_waits``, as is a single-job wait of B meanwhile; key A's waits are admitted
    alongside."""
    changes = {
        "rate_limit_per_second": 1e6,
        "rate_limit_burst": 1_000_000,
        "max_waits_per_key": 1000,
    }
    with _served(settings, **changes) as url, ThreadPoolExecutor(12) as pool:
        flood = [pool.submit(_status_wait, settings, url, KEY_B, 1000, 8) for _ in range(6)]
        # B's admitted wait lasts 8 s (its ids never finish); these come while it waits.
        time.sleep(1)
        [b_job] = _pending_ids(settings, KEY_B, 1)
        single = httpx.get(f"{url}/v1/jobs/{b_job}", params={"wait": 1}, headers=_auth(KEY_B))
        polls = [pool.submit(_status_wait, settings, url, KEY_A, 300, 1) for _ in range(3)]
        b = Counter(f.result().status_code for f in flood)
        a = Counter(f.result().status_code for f in polls)
        refused = [f.result() for f in flood if f.result().status_code == 429]
        # Once B's wait is over, its budget is free again.
        after = httpx.get(f"{url}/v1/jobs/{b_job}", params={"wait": 0.1}, headers=_auth(KEY_B))
    assert b == {200: 1, 429: 5}, b
    assert {r.json()["error"]["code"] for r in refused} == {"too_many_waits"}
    assert single.status_code == 429 and single.json()["error"]["code"] == "too_many_waits"
    assert a == {200: 3}, a
    assert after.status_code == 200


# 8: one rule for bodies -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_url(settings: Settings) -> Iterator[str]:
    with _served(settings) as url:
        yield url


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "application/json; charset=latin-1",
    ],
)
def test_bodies_other_than_json_are_unsupported_media_type(
    api_url: str, path: str, content_type: str | None
) -> None:
    headers = _auth(KEY_A) | ({} if content_type is None else {"Content-Type": content_type})
    response = httpx.post(f"{api_url}{path}", content=b"{}", headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", [b"{oops", b"", b"\xff\xfe", b'{"a": 1} x', b"[" * 100_000])
def test_bodies_that_are_not_json_are_invalid_json(api_url: str, path: str, body: bytes) -> None:
    headers = _auth(KEY_A) | {"Content-Type": "application/json"}
    response = httpx.post(f"{api_url}{path}", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=UTF-8"])
def test_json_that_is_not_the_schema_is_invalid_request(
    api_url: str, path: str, content_type: str
) -> None:
    headers = _auth(KEY_A) | {"Content-Type": content_type}
    response = httpx.post(f"{api_url}{path}", content=b'{"unexpected": 1}', headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def test_other_methods_are_left_to_the_router(api_url: str) -> None:
    """The media-type rule is for the routes' POST bodies: another method is still 405."""
    for path in BODY_ROUTES:
        for method in ("PUT", "PATCH", "DELETE"):
            response = httpx.request(method, f"{api_url}{path}", content=b"x", headers=_auth(KEY_A))
            assert response.status_code == 405, (method, path)
            assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_key_is_checked_before_the_media_type(api_url: str) -> None:
    for path in BODY_ROUTES:
        response = httpx.post(
            f"{api_url}{path}", content=b"x", headers={"Content-Type": "text/plain"}
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_openapi_documents_the_refusals(api_url: str) -> None:
    paths = httpx.get(f"{api_url}/openapi.json").json()["paths"]
    for path in BODY_ROUTES:
        assert {"400", "401", "408", "413", "415", "422", "429"} <= set(
            paths[path]["post"]["responses"]
        )


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    monkeypatch.setenv("APPATTEST_BODY_TIMEOUT_SECONDS", "3.5")
    monkeypatch.setenv("APPATTEST_HEADER_TIMEOUT_SECONDS", "4")
    monkeypatch.setenv("APPATTEST_MAX_CONNECTIONS_PER_CLIENT", "7")
    monkeypatch.setenv("APPATTEST_MAX_WAITS_PER_KEY", "9")
    loaded = load_settings()
    assert (loaded.body_timeout_seconds, loaded.header_timeout_seconds) == (3.5, 4)
    assert (loaded.max_connections_per_client, loaded.max_waits_per_key) == (7, 9)

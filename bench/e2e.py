"""End to end: bursts of generated registrations and assertions through the HTTP API and the
Python client to Celery workers on Redis and PostgreSQL, and through the embedded default.

What one run does (``run_e2e``, used by ``bench/run.py``; also runnable alone):

1. creates a fresh PostgreSQL database on the server of ``--pg-url`` and leases a pair of
   Redis databases (broker, results) the way the test suite does (``tests.stack``), so that a
   benchmark never empties the queue of a test session running beside it;
2. mints N devices under a throwaway test CA (``tests.factory``), issues N registration
   challenges and 5 assertion challenges per device with ``new_challenge`` and stores them in one
   transaction (each assertion's payload is its own issued challenge, bound to the device's
   keyId), and builds every plugin body: N registrations, then 5 N assertions in rounds (every
   device's first assertion, then every device's second, ...), so that the assertions of one
   device are N jobs apart and reach the workers in counter order. None of this is timed;
3. serves the producer in a subprocess (uvicorn, as ``appattest api`` does, except that the
   per-key rate limit is lifted, since one benchmark key stands for every client, and the
   access log is off) and starts 2 ``appattest worker --concurrency 1``;
4. for each way in, restores the store (keys, verdicts and challenges emptied, the same issued
   challenges put back) and bursts the N registrations, waits for every verdict, then bursts
   the 5 N assertions:

   * ``http_bulk``: ``POST /v1/jobs`` in chunks of 200 (one batch message each) from 2
     pipelined submitters, and ``GET /v1/jobs/{id}`` for every verdict: the first job of a
     chunk with ``?wait=20``, the others after it (they were decided in the same batch);
   * ``http_status``: the same submissions, and one ``POST /v1/jobs/status?wait=20`` per
     chunk for its 200 verdicts (again while a verdict is missing);
   * ``http_single``: one ``POST /v1/attestations?wait=20`` (or ``/v1/assertions``) per job
     over 64 concurrent keep-alive connections; the producer coalesces them into batches.
     At under 300 jobs/s here, this row runs on the first 2,000 devices (quick: 250), their
     registrations and their 5 assertions each, in rounds as above;
   * ``challenges``, ``device_flow``, ``light``: the caller's path, see ``bench/caller.py``
     (challenge issuance by 32 callers; challenge then assertion with ``?wait`` by 64
     callers; single assertions at 20/s, whose latency is the row's point);
   * ``python_client``: ``AsyncAppAttestClient.submit_many`` and ``wait_many`` per chunk;
   * ``scaling``: the bulk submission alone, with the decisions counted in the store's verdict
     table (no verdict reads compete for the CPU), in four rounds: both workers consuming,
     then only the first (the second's consumer is cancelled through Celery's remote control;
     its processes stay), again only the first, then both (ABBA, so that a drift of a shared
     machine's load hits both alike); the ratio of the mean decided/s, per kind;

5. samples the workers' memory (VmRSS of each worker and its pool processes) every half second
   across the 2-worker rows, to report it at the start and after 10,000 and 100,000 jobs
   (``--quick``: after 1,000 and 10,000);
6. runs the same kind of burst (first 1,000 devices, 2 assertions each; quick: 200) against
   ``appattest serve`` in a subprocess with a temporary data folder (SQLite store, broker and
   results), in requests of at most a quarter of the devices, so that one device's two
   assertions are never in the worker at the same time.

Every verdict is checked: a registration must be ``ok`` for its keyId with counter 0, an
assertion ``ok`` for its keyId with exactly its counter; anything else counts as wrong (with
its reason) and a job without a verdict by the deadline as lost. For the HTTP and client rows
the verdicts are the API's answers; for the scaling rows they are the store's records.

Measured per burst: jobs/s from the first submission to the last verdict the client saw;
decided/s from the first submission to the last decision recorded in the store (both clocks
are this machine's); latency from a job's submission (the moment its request was sent) to
its verdict reaching the client, p50/p95/p99 (in a burst this includes the time the job
queued behind the others); CPU seconds spent by this client process, the API process, the
worker processes and the PostgreSQL backends of the benchmark's database during the burst
(Redis is shared with other sessions, so it is left out); and the ratio of jobs/s to the
in-process core rate on the same cores: 2 x the single-process rate of ``verify_attestation``
(cache on) or ``verify_assertion`` (65-byte point) measured in the same run, since the
2 workers are 2 processes on 2 cores.

Run it from the repository root, with PostgreSQL and Redis running::

    python bench/e2e.py --quick          # 1,000 devices, 6,000 jobs per row
    python bench/e2e.py                  # 10,000 devices, 60,000 jobs per row
    python bench/e2e.py --json out.json  # also write the results as JSON
    python bench/e2e.py --quick --rows http_bulk --profile prof/  # py-spy profiles (raw)

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import Engine, create_engine, func, insert, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.factory import APP_ID, Device, TestCA  # noqa: E402
from tests.stack import (  # noqa: E402
    Stack,
    flush_redis,
    fresh_database,
    server_versions,
    service_stack,
)
from worker.store.challenges import (  # noqa: E402
    Purpose,
    challenge_digest,
    new_challenge,
    store_challenges,
)
from worker.store.db import create_store_engine, session_factory, upgrade  # noqa: E402
from worker.store.models import Challenge, Verdict  # noqa: E402

ROWS = (
    "http_bulk",
    "http_status",
    "http_single",
    "challenges",
    "device_flow",
    "light",
    "python_client",
    "scaling",
    "embedded",
)
SCALING_ORDER = "ABBA"  # A: 2 workers consuming, B: 1
DEFAULT_PG_URL = os.environ.get(
    "APPATTEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
API_KEY = "bench-" + uuid.uuid4().hex
CHALLENGE_TTL = timedelta(hours=2)  # outlives the longest run
SERVER_WAIT = 20.0  # seconds one ?wait= request asks for (the server allows up to 30)
CHUNK = 200  # jobs per bulk request: the producer's batch size, so one message per request
SUBMITTERS = 2  # concurrent bulk requests in flight
COLLECTORS = 6  # chunks whose verdicts are being read at once
SINGLE_CONNECTIONS = 64  # concurrent single submissions
SAMPLE_SECONDS = 0.5  # RSS sampling period
START_TIMEOUT = 60.0  # for a server to answer /healthz
STOP_TIMEOUT = 20.0  # for a server to exit after SIGTERM, before SIGKILL
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Sizes:
    """How much work one run does."""

    devices: int
    assertions_per_device: int
    single_devices: int  # the single-submission row runs on the first of the devices
    embedded_devices: int
    embedded_assertions_per_device: int
    rss_checkpoints: tuple[int, int]
    challenges: int  # the challenge-issuance row
    flow_devices: int  # the device-flow row: devices, 2 flows each
    light_requests: int  # the light-load rows: requests at 20/s (also on the embedded default)

    @property
    def jobs_per_row(self) -> int:
        return self.devices * (1 + self.assertions_per_device)


QUICK = Sizes(
    devices=1000,
    assertions_per_device=5,
    single_devices=250,
    embedded_devices=200,
    embedded_assertions_per_device=2,
    rss_checkpoints=(1_000, 10_000),
    challenges=1000,
    flow_devices=150,
    light_requests=60,
)
FULL = Sizes(
    devices=10_000,
    assertions_per_device=5,
    single_devices=2000,
    embedded_devices=1000,
    embedded_assertions_per_device=2,
    rss_checkpoints=(10_000, 100_000),
    challenges=10_000,
    flow_devices=2000,
    light_requests=400,
)


# --- the workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One plugin body and the verdict it must get."""

    type: str  # "attestation" or "assertion", as the bulk endpoint names them
    body: dict[str, str]
    key_id: str
    counter: int

    @property
    def kind(self) -> str:
        return "registration" if self.type == "attestation" else "assertion"


@dataclass
class Workload:
    """Every body of a run, and the issued challenges they use, to restore between rows."""

    registrations: list[Job]
    assertions: list[Job]  # in rounds: every device's first assertion, then its second, ...
    challenges: list[dict[str, Any]]
    devices: int
    minted: list[Device] = field(default_factory=list)  # the devices, their counters as minted

    def subset(self, devices: int, rounds: int) -> tuple[list[Job], list[Job]]:
        """The first ``devices`` registrations and their first ``rounds`` assertions each,
        still in rounds."""
        regs = self.registrations[:devices]
        asserts = [
            self.assertions[r * self.devices + d] for r in range(rounds) for d in range(devices)
        ]
        return regs, asserts

    def challenge_rows(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        wanted = {
            challenge_digest(
                job.body["challenge"] if job.type == "attestation" else job.body["payload"]
            )
            for job in jobs
        }
        return [row for row in self.challenges if row["digest"] in wanted]


def mint_workload(store_url: str, ca: TestCA, devices: int, rounds: int) -> Workload:
    """Issue the challenges in the store (one transaction) and mint every body."""
    now = datetime.now(UTC)
    minted = [Device(ca) for _ in range(devices)]
    engine = create_store_engine(store_url)
    try:
        issued_registration = [
            new_challenge(purpose=Purpose.REGISTRATION, key_id=None, ttl=CHALLENGE_TTL, now=now)
            for _ in minted
        ]
        issued_assertion = [
            [
                new_challenge(
                    purpose=Purpose.ASSERTION, key_id=device.key_id_b64, ttl=CHALLENGE_TTL, now=now
                )
                for device in minted
            ]
            for _ in range(rounds)
        ]
        with session_factory(engine)() as session, session.begin():
            store_challenges(
                session, [*issued_registration, *(c for r in issued_assertion for c in r)]
            )
    finally:
        engine.dispose()
    registration = [c.challenge for c in issued_registration]
    assertion = [[c.challenge for c in round_] for round_ in issued_assertion]
    regs = [
        Job("attestation", device.registration_body(challenge, now=now), device.key_id_b64, 0)
        for device, challenge in zip(minted, registration, strict=True)
    ]
    asserts = [
        Job("assertion", device.assertion_body(payload), device.key_id_b64, device.counter)
        for round_ in assertion
        for device, payload in zip(minted, round_, strict=True)
    ]
    rows = [
        {
            "digest": challenge_digest(text_),
            "purpose": purpose.value,
            "key_id": key_id,
            "issued_at": now,
            "expires_at": now + CHALLENGE_TTL,
            "used_at": None,
            "used_by_job": None,
        }
        for text_, purpose, key_id in [
            *((c, Purpose.REGISTRATION, None) for c in registration),
            *(
                (c, Purpose.ASSERTION, device.key_id_b64)
                for round_ in assertion
                for device, c in zip(minted, round_, strict=True)
            ),
        ]
    ]
    return Workload(regs, asserts, rows, devices, minted)


def reset_store(engine: Engine, challenges: list[dict[str, Any]]) -> None:
    """Empty keys, verdicts and challenges, and put the issued challenges back unused.

    TRUNCATE rather than DELETE: deleted rows would stay behind as dead tuples in the tables
    and their indexes, and make every later row of the benchmark slower than the one before.
    """
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE device_keys, verdicts, challenges"))
        for start in range(0, len(challenges), 5000):
            conn.execute(insert(Challenge), challenges[start : start + 5000])


# --- processes ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()  # fields from the state (3rd) on


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """User plus system CPU seconds of each live process."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            out[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return out


def rss_kib(pids: Sequence[int]) -> int:
    """The summed resident set size of these processes, in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_KIB
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base_url}/healthz", timeout=1) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server did not answer /healthz within {START_TIMEOUT} s; see {log}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of ``proc`` (started in its own session), SIGKILL if slow."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    sweep_group(proc.pid)


def sweep_group(pgid: int) -> None:
    """SIGKILL whatever is left in a process group whose leader has exited: an orphan, such
    as a worker process of ``appattest serve`` stuck in its exit handlers (seen here)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@contextmanager
def server(command: list[str], env: dict[str, str], log: Path, base_url: str) -> Iterator[int]:
    """Run a server subprocess until the block ends; yield its pid once it is healthy."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_healthy(base_url, proc, log)
        yield proc.pid
    finally:
        stop_group(proc)


def serve_api(port: int) -> None:
    """The producer as ``appattest api`` serves it (its bounded HTTP protocol), without the
    per-key rate limit and the access log (run in the API subprocess)."""
    import inspect

    import uvicorn

    from producer.app import create_app
    from worker.settings import load_settings

    extra: dict[str, Any] = {}
    if "rate_limiter" in inspect.signature(create_app).parameters:
        from producer.ratelimit import RateLimiter

        extra["rate_limiter"] = RateLimiter(rate=1e9, burst=10**9)
    settings = load_settings()
    app = create_app(settings, **extra)
    try:
        from producer.server import server_config
    except ImportError:  # a checkout from before the bounded server
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        return
    config = server_config(app, settings, host="127.0.0.1", port=port, log_level="warning")
    config.access_log = False
    uvicorn.Server(config).run()


# --- a lean HTTP/1.1 client --------------------------------------------------------------------
#
# The benchmark's own client must not eat the cores it measures: these few lines send requests
# prepared ahead and read answers on keep-alive connections, a fraction of what a full client
# library costs per request. The Python client row measures ``producer.client`` itself.


class ApiFailure(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            try:
                self.writer.write(head + body)
                await self.writer.drain()
                return await self._answer(self.reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self.close()
                # A keep-alive connection the server closed while idle: the request never
                # reached it, so it is sent again once on a new connection.
                partial = getattr(exc, "partial", b"")
                if attempt or partial:
                    raise
        raise AssertionError("unreachable")

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = b""
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body


Verdict_ = tuple[bool, str | None, str | None, int | None, str | None]  # ok kind key counter reason


def _verdict(result: dict[str, Any]) -> Verdict_:
    return (
        bool(result.get("ok")),
        result.get("kind"),
        result.get("keyId"),
        result.get("counter"),
        result.get("reason"),
    )


class Api(Protocol):
    """What a burst needs from a way into the service."""

    rate_limited: int

    async def submit_chunk(self, jobs: Sequence[Job], prepared: bytes | None) -> list[str | None]:
        """Queue these jobs in one request; a job id per job, None for one refused."""

    async def verdict(self, job_id: str, *, wait: bool) -> Verdict_ | None:
        """The job's verdict, or None while it is pending."""

    async def verdicts(self, job_ids: Sequence[str]) -> list[Verdict_ | None]:
        """The verdicts of many jobs in one request, waiting up to ``SERVER_WAIT`` for all;
        None for a job still pending."""


class RawApi:
    """The HTTP API through ``_Connection``s: prepared bodies, JSON answers."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self._prefix = f"Host: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n".encode()
        self._pool: asyncio.LifoQueue[_Connection] = asyncio.LifoQueue()
        self._all = [_Connection(host, port) for _ in range(connections)]
        for conn in self._all:
            self._pool.put_nowait(conn)
        self.rate_limited = 0
        self.requests = 0

    def close(self) -> None:
        for conn in self._all:
            conn.close()

    @staticmethod
    def prepare_chunk(jobs: Sequence[Job]) -> bytes:
        return json.dumps({"jobs": [{"type": j.type, "body": j.body} for j in jobs]}).encode()

    async def call(self, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
        head = f"{method} {target} HTTP/1.1\r\n".encode() + self._prefix
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        head += b"\r\n"
        conn = await self._pool.get()
        try:
            while True:
                self.requests += 1
                status, headers, data = await conn.request(head, body)
                if status != 429:
                    break
                self.rate_limited += 1
                await asyncio.sleep(float(headers.get("retry-after", "1")))
        finally:
            self._pool.put_nowait(conn)
        if status >= 300 and status != 202:
            raise ApiFailure(status, data)
        return status, json.loads(data)

    async def submit_chunk(self, jobs: Sequence[Job], prepared: bytes | None) -> list[str | None]:
        _, answer = await self.call("POST", "/v1/jobs", prepared or self.prepare_chunk(jobs))
        return [item.get("jobId") for item in answer["jobs"]]

    async def submit_one(self, job: Job, prepared: bytes) -> tuple[str | None, Verdict_ | None]:
        path = "/v1/attestations" if job.type == "attestation" else "/v1/assertions"
        status, answer = await self.call("POST", f"{path}?wait={SERVER_WAIT:g}", prepared)
        if status == 200:
            return answer["jobId"], _verdict(answer["result"])
        return answer["jobId"], None

    async def verdict(self, job_id: str, *, wait: bool) -> Verdict_ | None:
        target = f"/v1/jobs/{job_id}?wait={SERVER_WAIT:g}" if wait else f"/v1/jobs/{job_id}"
        _, answer = await self.call("GET", target)
        result = answer.get("result")
        return None if result is None else _verdict(result)

    async def verdicts(self, job_ids: Sequence[str]) -> list[Verdict_ | None]:
        body = json.dumps({"jobIds": list(job_ids)}).encode()
        _, answer = await self.call("POST", f"/v1/jobs/status?wait={SERVER_WAIT:g}", body)
        return [
            None if item.get("result") is None else _verdict(item["result"])
            for item in answer["jobs"]
        ]


class ClientApi:
    """The HTTP API through ``producer.client.AsyncAppAttestClient``."""

    def __init__(self, base_url: str) -> None:
        from producer.client import AsyncAppAttestClient

        self.client = AsyncAppAttestClient(base_url, API_KEY, server_wait=SERVER_WAIT)
        self.rate_limited = 0  # the client raises on 429; none is expected with no limit

    async def submit_chunk(self, jobs: Sequence[Job], prepared: bytes | None) -> list[str | None]:
        answer = await self.client.submit_many([(j.type, j.body) for j in jobs])
        return [item.job_id if item.accepted else None for item in answer]

    async def verdict(self, job_id: str, *, wait: bool) -> Verdict_ | None:
        if wait:
            try:
                result = await self.client.wait(job_id, timeout=SERVER_WAIT)
            except TimeoutError:
                return None
        else:
            status = await self.client.get_job(job_id)
            result = status.result
        if result is None:
            return None
        return (result.ok, result.kind, result.key_id, result.counter, result.reason)

    async def verdicts(self, job_ids: Sequence[str]) -> list[Verdict_ | None]:
        try:
            found = await self.client.wait_many(job_ids, timeout=SERVER_WAIT)
        except TimeoutError:
            found = {
                status.job_id: status.result
                for status in await self.client.get_jobs(job_ids)
                if status.result is not None
            }
        return [
            None
            if (r := found.get(job_id)) is None
            else (r.ok, r.kind, r.key_id, r.counter, r.reason)
            for job_id in job_ids
        ]


# --- bursts ------------------------------------------------------------------------------------


@dataclass
class Burst:
    """What one burst recorded, per job."""

    jobs: Sequence[Job]
    sent: list[float] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)
    verdicts: list[Verdict_ | None] = field(default_factory=list)
    job_ids: list[str | None] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    start: float = 0.0
    start_wall: float = 0.0
    submitted: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.jobs)
        self.sent, self.seen = [math.nan] * n, [math.nan] * n
        self.verdicts, self.job_ids = [None] * n, [None] * n

    def begin(self) -> None:
        self.start, self.start_wall = time.perf_counter(), time.time()

    def record(self, index: int, verdict: Verdict_) -> None:
        self.seen[index] = time.perf_counter()
        self.verdicts[index] = verdict


async def _read_verdict(api: Api, job_id: str, *, first: bool, deadline: float) -> Verdict_ | None:
    verdict = await api.verdict(job_id, wait=first)
    while verdict is None and time.perf_counter() < deadline:
        verdict = await api.verdict(job_id, wait=True)
    return verdict


async def chunked_burst(
    api: Api,
    burst: Burst,
    *,
    prepared: list[bytes] | None,
    collect: str,
    timeout: float,
    chunk_size: int = CHUNK,
    rounds_of: int | None = None,
) -> None:
    """Submit the jobs in chunks from ``SUBMITTERS`` pipelined requests, and read the verdicts
    meanwhile: with ``collect="each"`` job by job (the first job of a chunk waits on the
    server, the rest are read after it), with ``"many"`` a chunk's verdicts in one request,
    with ``"none"`` not at all. With ``rounds_of``, the jobs are rounds of that many (each
    device at most once in a round), and a round is submitted once every verdict of the
    rounds before it is in."""
    jobs = burst.jobs
    starts = list(range(0, len(jobs), chunk_size))
    pending = iter(range(len(starts)))
    ready: asyncio.Queue[tuple[int, list[str | None]] | None] = asyncio.Queue()

    async def earlier_rounds_decided(first: int) -> None:
        if not rounds_of:
            return
        done = first // rounds_of * rounds_of
        while time.perf_counter() < deadline and any(
            burst.job_ids[i] is not None and burst.verdicts[i] is None for i in range(done)
        ):
            await asyncio.sleep(0.002)

    async def submit() -> None:
        for number in pending:
            first = starts[number]
            await earlier_rounds_decided(first)
            chunk = jobs[first : first + chunk_size]
            now = time.perf_counter()
            for index in range(first, first + len(chunk)):
                burst.sent[index] = now
            ids = await api.submit_chunk(chunk, prepared[number] if prepared else None)
            for offset, job_id in enumerate(ids):
                burst.job_ids[first + offset] = job_id
                if job_id is None:
                    burst.refused["refused at submission"] += 1
            ready.put_nowait((first, ids))

    async def collector() -> None:
        while (item := await ready.get()) is not None:
            first, ids = item
            if collect == "many":
                await collect_many(first, ids)
                continue
            waited = False
            for offset, job_id in enumerate(ids):
                if job_id is None or time.perf_counter() > deadline:
                    continue
                verdict = await _read_verdict(api, job_id, first=not waited, deadline=deadline)
                waited = True
                if verdict is not None:
                    burst.record(first + offset, verdict)

    async def collect_many(first: int, ids: list[str | None]) -> None:
        pending = [(offset, job_id) for offset, job_id in enumerate(ids) if job_id is not None]
        while pending and time.perf_counter() < deadline:
            found = await api.verdicts([job_id for _, job_id in pending])
            still = []
            for (offset, job_id), verdict in zip(pending, found, strict=True):
                if verdict is None:
                    still.append((offset, job_id))
                else:
                    burst.record(first + offset, verdict)
            pending = still

    deadline = time.perf_counter() + timeout
    burst.begin()
    count = 0 if collect == "none" else COLLECTORS
    collectors = [asyncio.create_task(collector()) for _ in range(count)]
    try:
        await asyncio.gather(*(submit() for _ in range(SUBMITTERS)))
        burst.submitted = time.perf_counter()
        for _ in collectors:
            ready.put_nowait(None)
        await asyncio.gather(*collectors)
    finally:
        for task in collectors:
            task.cancel()


async def single_burst(api: RawApi, burst: Burst, prepared: list[bytes], timeout: float) -> None:
    """One request per job over ``SINGLE_CONNECTIONS`` connections, each waiting for its
    verdict in the request (then reading the job if the verdict took longer)."""
    pending = iter(range(len(burst.jobs)))

    async def connection() -> None:
        for index in pending:
            if time.perf_counter() > deadline:
                return
            burst.sent[index] = time.perf_counter()
            job_id, verdict = await api.submit_one(burst.jobs[index], prepared[index])
            burst.job_ids[index] = job_id
            if verdict is None and job_id is not None:
                verdict = await _read_verdict(api, job_id, first=True, deadline=deadline)
            if verdict is not None:
                burst.record(index, verdict)

    deadline = time.perf_counter() + timeout
    burst.begin()
    await asyncio.gather(*(connection() for _ in range(SINGLE_CONNECTIONS)))
    burst.submitted = max(burst.sent)


def store_decisions(engine: Engine, kind: str) -> tuple[int, datetime | None]:
    with engine.connect() as conn:
        count, last = conn.execute(
            select(func.count(), func.max(Verdict.decided_at)).where(Verdict.kind == kind)
        ).one()
    return int(count), last


def wait_for_store(engine: Engine, kind: str, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store_decisions(engine, kind)[0] >= expected:
            return
        time.sleep(0.05)


def verdicts_from_store(engine: Engine, burst: Burst) -> None:
    """Fill the burst's verdicts from the store's verdict table (the ``workers_*`` rows)."""
    where = {job_id: index for index, job_id in enumerate(burst.job_ids) if job_id}
    with engine.connect() as conn:
        rows = conn.execute(
            select(Verdict.job_id, Verdict.result, Verdict.decided_at).where(
                Verdict.kind == burst.jobs[0].kind
            )
        ).all()
    for job_id, result, decided_at in rows:
        index = where.get(job_id)
        if index is not None:
            burst.verdicts[index] = _verdict(result)
            burst.seen[index] = burst.start + (decided_at.timestamp() - burst.start_wall)


# --- accounting --------------------------------------------------------------------------------


@dataclass
class Meters:
    """CPU meters of every process of the service, read before and after a burst."""

    api_pid: int | None
    workers: Callable[[], list[int]]
    pg_engine: Engine | None
    database: str | None

    def _pg_pids(self) -> list[int]:
        if self.pg_engine is None:
            return []
        with self.pg_engine.connect() as conn:
            rows = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = :db"), {"db": self.database}
            )
            return [int(pid) for (pid,) in rows]

    def read(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "client": usage.ru_utime + usage.ru_stime,
            "api": cpu_seconds(process_tree(self.api_pid)) if self.api_pid else {},
            "workers": cpu_seconds([p for w in self.workers() for p in process_tree(w)]),
            "postgresql": cpu_seconds(self._pg_pids()),
        }

    @staticmethod
    def spent(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        out = {"client": after["client"] - before["client"]}
        for name in ("api", "workers", "postgresql"):
            out[name] = sum(v - before[name].get(pid, 0.0) for pid, v in after[name].items())
        return {k: round(v, 2) for k, v in out.items()}


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(
    burst: Burst,
    *,
    key: str,
    label: str,
    workers: int,
    reference: float | None,
    cpu: dict[str, float],
    core_ms: float | None = None,
    decided: tuple[int, datetime | None] | None,
    rate_limited: int,
    latency: bool = True,
) -> dict[str, Any]:
    """One row of results from a finished burst."""
    jobs = burst.jobs
    correct, wrong, lost = 0, Counter[str](), 0
    for job, verdict in zip(jobs, burst.verdicts, strict=True):
        if verdict is None:
            lost += 1
            continue
        ok, kind, key_id, counter, reason = verdict
        if ok and kind == job.kind and key_id == job.key_id and counter == job.counter:
            correct += 1
        else:
            wrong[str(reason) if not ok else "wrong kind, key or counter"] += 1
    seen = [t for t in burst.seen if not math.isnan(t)]
    elapsed = (max(seen) - burst.start) if seen else math.nan
    rate = len(seen) / elapsed if seen else 0.0
    latencies = sorted(
        (s - t) * 1000
        for s, t in zip(burst.seen, burst.sent, strict=True)
        if not math.isnan(s) and not math.isnan(t)
    )
    row: dict[str, Any] = {
        "key": key,
        "label": label,
        "kind": jobs[0].kind,
        "workers": workers,
        "jobs": len(jobs),
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(rate, 1),
        "correct": correct,
        "wrong": sum(wrong.values()),
        "lost": lost,
        "wrong_reasons": dict(wrong),
        "refused_at_submission": sum(burst.refused.values()),
        "rate_limited_429": rate_limited,
        "submit_seconds": round(burst.submitted - burst.start, 3),
        "cpu_seconds": cpu,
        "cpu_ms_per_job": {k: round(v * 1000 / len(jobs), 3) for k, v in cpu.items()},
    }
    if latency:
        row.update(
            {
                "latency_ms_p50": round(percentile(latencies, 50), 1),
                "latency_ms_p95": round(percentile(latencies, 95), 1),
                "latency_ms_p99": round(percentile(latencies, 99), 1),
                "latency_ms_max": round(latencies[-1], 1) if latencies else math.nan,
            }
        )
    if decided is not None:
        count, last = decided
        if last is not None:
            decided_s = last.timestamp() - burst.start_wall
            row["decided"] = count
            row["decided_per_s"] = round(count / decided_s, 1) if decided_s > 0 else math.nan
    if reference:
        row["in_process_ref_per_s"] = round(reference, 1)
        row["over_in_process"] = round(rate / reference, 3)
    if core_ms and "client" in cpu:
        # CPU the service spent per job against what the core alone costs per operation: the
        # ratio the rate would have on cores of its own, whatever else the machine runs.
        service_ms = sum(v for k, v in cpu.items() if k != "client") * 1000 / len(jobs)
        row["service_cpu_ms_per_job"] = round(service_ms, 3)
        row["core_ms_per_op"] = round(core_ms, 3)
        row["over_in_process_cpu"] = round(core_ms / service_ms, 3) if service_ms else math.nan
    return row


# --- profiles ----------------------------------------------------------------------------------


@contextmanager
def profiled(directory: Path | None, name: str, pids: dict[str, list[int]]) -> Iterator[None]:
    """With a directory, record py-spy profiles (collapsed stacks, ``--format raw``) of these
    processes for the length of the block; without one, do nothing."""
    if directory is None:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    command = str(spy) if spy.exists() else "py-spy"
    directory.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for role, group in pids.items():
            for number, pid in enumerate(group):
                out = directory / f"{name}_{role}{number}.txt"
                procs.append(
                    subprocess.Popen(
                        [
                            command,
                            "record",
                            "--pid",
                            str(pid),
                            "--format",
                            "raw",
                            "--output",
                            str(out),
                            "--rate",
                            "200",
                            "--nonblocking",
                            "--gil",
                            "--subprocesses",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        time.sleep(0.5)  # py-spy attaches
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# --- memory ------------------------------------------------------------------------------------


class RssSampler:
    """Samples the workers' RSS every ``SAMPLE_SECONDS`` in a thread, with the number of jobs
    the workers had decided by then (completed bursts plus the running burst's verdicts)."""

    def __init__(self, workers: Callable[[], list[int]]) -> None:
        self.workers = workers
        self.samples: list[tuple[float, int, int]] = []  # (seconds, jobs, rss KiB)
        self.base = 0
        self.burst: Burst | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def jobs(self) -> int:
        burst = self.burst
        running = sum(v is not None for v in burst.verdicts) if burst is not None else 0
        return self.base + running

    def sample(self) -> None:
        rss = rss_kib([p for w in self.workers() for p in process_tree(w)])
        self.samples.append((time.perf_counter() - self._t0, self.jobs(), rss))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def report(self, checkpoints: tuple[int, int]) -> dict[str, Any]:
        def at(jobs: int) -> dict[str, Any] | None:
            for _, done, rss in self.samples:
                if done >= jobs:
                    return {"jobs": done, "rss_mib": round(rss / 1024, 1)}
            return None

        first, last = self.samples[0], self.samples[-1]
        low, high = at(checkpoints[0]), at(checkpoints[1])
        out: dict[str, Any] = {
            "start": {"jobs": first[1], "rss_mib": round(first[2] / 1024, 1)},
            f"after_{checkpoints[0]}": low,
            f"after_{checkpoints[1]}": high,
            "end": {"jobs": last[1], "rss_mib": round(last[2] / 1024, 1)},
            "peak_mib": round(max(s[2] for s in self.samples) / 1024, 1),
            "samples": len(self.samples),
        }
        if low and high:
            out["growth_high_over_low"] = round(high["rss_mib"] / low["rss_mib"], 4)
        return out


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Reference:
    """In-process core rates, single process, from the same run."""

    attestation_per_s: float
    assertion_per_s: float
    processes: int = 2

    def for_kind(self, kind: str) -> float:
        """The in-process rate on the same cores: ``processes`` times one process's."""
        return self.single(kind) * self.processes

    def single(self, kind: str) -> float:
        return self.attestation_per_s if kind == "registration" else self.assertion_per_s


def measure_core_reference(quick: bool) -> Reference:
    """The core rates, measured here (for ``e2e.py`` run alone) with ``bench/core.py``."""
    import core  # bench/core.py, beside this file

    settings = core.QUICK if quick else core.DEFAULT
    rows, _, _ = core.build_rows(settings)
    core.run(settings, rows)
    by_key = {row.key: row.median_rate for row in rows}
    return Reference(by_key["attestation_cache_on"], by_key["assertion_point"])


def _log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs the rows against one stack and collects their results."""

    def __init__(
        self,
        *,
        stack: Stack,
        engine: Engine,
        admin_engine: Engine,
        database: str,
        workload: Workload,
        reference: Reference,
        api_pid: int,
        port: int,
        timeout: float,
    ) -> None:
        self.stack = stack
        self.engine = engine
        self.workload = workload
        self.reference = reference
        self.port = port
        self.timeout = timeout
        self.rows: list[dict[str, Any]] = []
        self.meters = Meters(api_pid, self.worker_pids, admin_engine, database)
        self.sampler: RssSampler | None = None
        self.profile_dir: Path | None = None
        self._api_pid = api_pid

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.stack.workers if w.poll() is None]

    def reset(self) -> None:
        reset_store(self.engine, self.workload.challenges)
        flush_redis(int(self.stack.settings.result_backend.rsplit("/", 1)[1]))

    def row(
        self,
        way: str,
        label: str,
        *,
        workers: int,
        jobs: tuple[list[Job], list[Job]] | None = None,
        key: str | None = None,
    ) -> None:
        """Registrations, then assertions, one way in; a result row for each."""
        self.reset()
        regs, asserts = jobs or (self.workload.registrations, self.workload.assertions)
        for kind, batch in (("registration", regs), ("assertion", asserts)):
            _log(f"{label}: {len(batch):,} {kind}s")
            burst = Burst(batch)
            # Request bodies are built before the meters start: they are not the client's work.
            if way == "http_single":
                prepared = [json.dumps(job.body).encode() for job in batch]
            else:
                prepared = [
                    RawApi.prepare_chunk(batch[s : s + CHUNK]) for s in range(0, len(batch), CHUNK)
                ]
            if self.sampler is not None:
                self.sampler.burst = burst
            targets = {"api": [self._api_pid], "worker": self.worker_pids()}
            with profiled(self.profile_dir, f"{key or way}_{kind}", targets):
                before = self.meters.read()
                rate_limited = asyncio.run(self._burst(way, burst, prepared))
                if way.startswith("workers"):
                    wait_for_store(self.engine, kind, len(batch), self.timeout)
                cpu = Meters.spent(before, self.meters.read())
            if way.startswith("workers"):
                verdicts_from_store(self.engine, burst)
            if self.sampler is not None:
                self.sampler.base += sum(v is not None for v in burst.verdicts)
                self.sampler.burst = None
            result = summarize(
                burst,
                key=f"{key or way}_{kind}",
                label=f"{label}, {kind}s",
                workers=workers,
                reference=self.reference.for_kind(kind),
                cpu=cpu,
                core_ms=1000 / self.reference.single(kind),
                decided=store_decisions(self.engine, kind),
                rate_limited=rate_limited,
                latency=not way.startswith("workers"),
            )
            self.rows.append(result)
            _log(
                f"  {result['jobs_per_s']:.0f} jobs/s, {result['correct']}/{result['jobs']} "
                f"correct, cpu {cpu}"
            )

    async def _burst(self, way: str, burst: Burst, prepared: list[bytes]) -> int:
        if way == "python_client":
            api = ClientApi(f"http://127.0.0.1:{self.port}")
            try:
                await chunked_burst(api, burst, prepared=None, collect="many", timeout=self.timeout)
            finally:
                await api.client.aclose()
            return api.rate_limited
        single = way == "http_single"
        raw = RawApi(
            "127.0.0.1", self.port, SINGLE_CONNECTIONS if single else COLLECTORS + SUBMITTERS
        )
        try:
            if single:
                await single_burst(raw, burst, prepared, self.timeout)
            else:
                collect = {"http_bulk": "each", "http_status": "many"}.get(way, "none")
                await chunked_burst(
                    raw, burst, prepared=prepared, collect=collect, timeout=self.timeout
                )
        finally:
            raw.close()
        return raw.rate_limited

    def scaling(self, consumers: Sequence[str], order: str) -> dict[str, Any]:
        """The bulk submission counted in the store, with both workers consuming (``A``) and
        with only the first (``B``, the second's consumer cancelled), in ``order`` (ABBA by
        default, so that a drift of the shared machine's load hits both alike). Returns the
        ratio of the mean rates, per kind."""
        rates: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
        for number, phase in enumerate(order):
            workers = 2 if phase == "A" else 1
            set_consuming(self.stack, consumers[1], consume=phase == "A")
            key = f"workers_{workers}_r{number + 1}"
            self.row(
                key,
                f"HTTP bulk, {workers} worker{'s' * (workers > 1)}, store #{number + 1}",
                workers=workers,
                key=key,
            )
            for row in self.rows[-2:]:
                rates[phase].setdefault(row["kind"], []).append(row.get("decided_per_s", 0.0))
        set_consuming(self.stack, consumers[1], consume=True)
        return {
            kind: round(statistics.fmean(rates["A"][kind]) / statistics.fmean(rates["B"][kind]), 3)
            for kind in rates["A"]
            if rates["B"].get(kind) and statistics.fmean(rates["B"][kind]) > 0
        }


def set_consuming(stack: Stack, hostname: str, *, consume: bool) -> None:
    """Make the worker ``hostname`` consume the job queue, or stop it (its processes stay)."""
    from worker.queue.app import create_celery_app
    from worker.queue.messaging import QUEUE

    app = create_celery_app(stack.settings)
    try:
        control = app.control.add_consumer if consume else app.control.cancel_consumer
        replies = control(QUEUE, destination=[hostname], reply=True, timeout=5)
        if not replies:
            raise RuntimeError(f"worker {hostname} did not answer the consumer change")
    finally:
        app.close()


def _caller_module() -> Any:
    """``bench/caller.py``, importing this very module as ``e2e`` (run as a script, it is
    ``__main__``; a second copy would have another API key)."""
    sys.modules.setdefault("e2e", sys.modules[__name__])
    import caller

    return caller


def run_embedded(
    workload: Workload, ca: TestCA, sizes: Sizes, workdir: Path, timeout: float, *, light: bool
) -> list[dict[str, Any]]:
    """The same kind of burst against ``appattest serve`` with its SQLite files."""
    regs, asserts = workload.subset(sizes.embedded_devices, sizes.embedded_assertions_per_device)
    # The light load after the bursts: the next round's assertions of the first devices.
    light_round = sizes.embedded_assertions_per_device
    light_jobs = [
        workload.assertions[light_round * workload.devices + d]
        for d in range(min(sizes.light_requests, sizes.embedded_devices))
    ]
    # The assertions are rounds (each device once per round), a round submitted once the one
    # before it is decided: two of one device's assertions in flight at once could be decided
    # in either order, and a later counter committed first makes the earlier one a replay,
    # which is right, and not what this burst measures (seen once in 3 runs when a round
    # followed the one before it by 4 requests, trusting timing to order them).
    chunk = max(1, min(CHUNK, sizes.embedded_devices // 4))
    data_dir = workdir / "embedded"
    root = workdir / "root.pem"
    root.write_bytes(ca.root_pem)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    env.update(
        {
            "APPATTEST_API_KEYS": API_KEY,
            # Lifts the per-key rate limit where the settings know it; 429s are counted.
            "APPATTEST_RATE_LIMIT_PER_SECOND": "1000000000",
            "APPATTEST_RATE_LIMIT_BURST": "1000000000",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        }
    )
    command = [
        sys.executable,
        "-m",
        "appattest",
        "serve",
        f"--port={port}",
        f"--data-dir={data_dir}",
        f"--app-id={APP_ID}",
        f"--root-ca={root}",
    ]
    rows = []
    with server(command, env, workdir / "serve.log", f"http://127.0.0.1:{port}") as pid:
        engine = create_store_engine(f"sqlite:///{data_dir / 'keys.db'}")
        try:
            upgrade(engine)  # already done by serve; a no-op that makes the order explicit
            with engine.begin() as conn:
                conn.execute(
                    insert(Challenge), workload.challenge_rows([*regs, *asserts, *light_jobs])
                )
            meters = Meters(pid, lambda: [], None, None)  # the workers are in the serve tree
            for kind, jobs in (("registration", regs), ("assertion", asserts)):
                _log(f"embedded: {len(jobs):,} {kind}s")
                burst = Burst(jobs)
                prepared = [
                    RawApi.prepare_chunk(jobs[s : s + chunk]) for s in range(0, len(jobs), chunk)
                ]
                before = meters.read()
                # A device's next assertion is submitted once its last one is decided.
                rounds_of = sizes.embedded_devices if kind == "assertion" else None
                rate_limited = asyncio.run(
                    _embedded_burst(port, burst, prepared, chunk, timeout, rounds_of)
                )
                cpu = Meters.spent(before, meters.read())
                cpu["service"] = cpu.pop("api")  # API and workers: one process tree
                del cpu["workers"], cpu["postgresql"]
                result = summarize(
                    burst,
                    key=f"embedded_{kind}",
                    label=f"embedded (appattest serve), {kind}s",
                    workers=2,
                    reference=None,
                    cpu=cpu,
                    decided=store_decisions(engine, kind),
                    rate_limited=rate_limited,
                )
                rows.append(result)
                _log(f"  {result['jobs_per_s']:.0f} jobs/s, {result['correct']}/{len(jobs)}")
            if light:
                caller = _caller_module()

                rows.append(caller.embedded_light(port, light_jobs, meters, timeout))
        finally:
            engine.dispose()
    return rows


async def _embedded_burst(
    port: int,
    burst: Burst,
    prepared: list[bytes],
    chunk: int,
    timeout: float,
    rounds_of: int | None,
) -> int:
    raw = RawApi("127.0.0.1", port, COLLECTORS + SUBMITTERS)
    try:
        await chunked_burst(
            raw,
            burst,
            prepared=prepared,
            collect="many",
            timeout=timeout,
            chunk_size=chunk,
            rounds_of=rounds_of,
        )
    finally:
        raw.close()
    return raw.rate_limited


def run_e2e(
    *,
    quick: bool,
    pg_url: str,
    reference: Reference,
    rows_wanted: Sequence[str] = ROWS,
    profile_dir: Path | None = None,
    pool: str = "prefork",
    api_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every end-to-end row; returns the results as a JSON-ready dictionary. ``pool`` is the
    workers' Celery pool (each worker runs one process of it); ``api_env`` adds settings
    (``APPATTEST_...``) to the API process's environment."""
    sizes = QUICK if quick else FULL
    timeout = 120.0 if quick else 600.0  # per burst; a job without a verdict by then is lost
    setup: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    rss: dict[str, Any] = {}
    scaling: dict[str, Any] = {}
    worker_groups: list[int] = []  # each worker runs in a session of its own
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="appattest-e2e-") as tmp,
        fresh_database(pg_url, "appattest_bench") as store_url,
    ):
        workdir = Path(tmp)
        ca = TestCA.create()
        database = make_url(store_url).database
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        engine = create_store_engine(store_url)
        try:
            with service_stack(
                store_url=store_url, root_pem=ca.root_pem, workdir=workdir, app_ids=APP_ID
            ) as stack:
                versions = server_versions(admin)
                t = time.perf_counter()
                _log(f"minting {sizes.devices:,} devices and their bodies")
                workload = mint_workload(store_url, ca, sizes.devices, sizes.assertions_per_device)
                setup["mint_s"] = round(time.perf_counter() - t, 2)

                port = free_port()
                env = {**stack.env, **(api_env or {}), "APPATTEST_API_KEYS": API_KEY}
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p
                )
                command = [sys.executable, str(Path(__file__).resolve()), "--serve-api", str(port)]
                t = time.perf_counter()
                with server(
                    command, env, workdir / "api.log", f"http://127.0.0.1:{port}"
                ) as api_pid:
                    for _ in range(2):
                        worker_groups.append(
                            stack.start_worker(concurrency=1, pool=pool, name="bench").pid
                        )
                    consumers = [f"bench{n}@{socket.gethostname()}" for n in range(2)]
                    setup["start_api_and_2_workers_s"] = round(time.perf_counter() - t, 2)
                    runner = Runner(
                        stack=stack,
                        engine=engine,
                        admin_engine=admin,
                        database=database or "",
                        workload=workload,
                        reference=reference,
                        api_pid=api_pid,
                        port=port,
                        timeout=timeout,
                    )
                    runner.profile_dir = profile_dir
                    runner.sampler = RssSampler(runner.worker_pids)
                    runner.sampler.start()
                    try:
                        if "http_bulk" in rows_wanted:
                            runner.row("http_bulk", "HTTP POST /v1/jobs + GET each", workers=2)
                        if "http_status" in rows_wanted:
                            runner.row("http_status", "HTTP POST /v1/jobs + POST status", workers=2)
                        if "http_single" in rows_wanted:
                            subset = workload.subset(
                                sizes.single_devices, sizes.assertions_per_device
                            )
                            runner.row(
                                "http_single", "HTTP POST one job ?wait", workers=2, jobs=subset
                            )
                        if {"challenges", "device_flow", "light"} & set(rows_wanted):
                            caller = _caller_module()

                            if "challenges" in rows_wanted:
                                runner.rows.append(caller.challenges(runner, sizes.challenges))
                            if "light" in rows_wanted:
                                regs, asserts = workload.subset(sizes.light_requests, 1)
                                runner.rows.append(caller.light(runner, regs, asserts))
                            if "device_flow" in rows_wanted:
                                # After every row that uses minted assertions: the flows sign
                                # new ones with the devices' later counters.
                                devices = workload.minted[: sizes.flow_devices]
                                regs = workload.registrations[: sizes.flow_devices]
                                runner.rows.append(caller.device_flow(runner, devices, regs, 2))
                        if "python_client" in rows_wanted:
                            runner.row(
                                "python_client", "AsyncAppAttestClient, wait_many", workers=2
                            )
                        if "scaling" in rows_wanted:
                            scaling = runner.scaling(consumers, SCALING_ORDER)
                    finally:
                        runner.sampler.stop()
                    rss = runner.sampler.report(sizes.rss_checkpoints)
                rows.extend(runner.rows)
            if "embedded" in rows_wanted:
                t = time.perf_counter()
                rows.extend(
                    run_embedded(
                        workload, ca, sizes, workdir, timeout, light="light" in rows_wanted
                    )
                )
                setup["embedded_s"] = round(time.perf_counter() - t, 2)
        finally:
            for pgid in worker_groups:  # stopped by the stack; this catches stragglers
                sweep_group(pgid)
            engine.dispose()
            admin.dispose()
    return {
        "benchmark": "bench/e2e.py",
        "mode": "quick" if quick else "full",
        "sizes": {
            "devices": sizes.devices,
            "registrations_per_row": sizes.devices,
            "assertions_per_row": sizes.devices * sizes.assertions_per_device,
            "single_registrations": sizes.single_devices,
            "single_assertions": sizes.single_devices * sizes.assertions_per_device,
            "embedded_registrations": sizes.embedded_devices,
            "embedded_assertions": sizes.embedded_devices * sizes.embedded_assertions_per_device,
            "embedded_chunk": max(1, min(CHUNK, sizes.embedded_devices // 4)),
            "chunk": CHUNK,
            "single_connections": SINGLE_CONNECTIONS,
            "scaling_order": SCALING_ORDER,
            "challenges": sizes.challenges,
            "flow_devices": sizes.flow_devices,
            "flows": sizes.flow_devices * 2,
            "light_requests": sizes.light_requests,
        },
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            **versions,
        },
        "in_process_reference": {
            "attestation_per_s_1_process": round(reference.attestation_per_s, 1),
            "assertion_per_s_1_process": round(reference.assertion_per_s, 1),
            "processes": reference.processes,
            "method": "2 x the single-process core rate measured in the same run",
        },
        "rows": rows,
        "scaling_2_over_1_workers": scaling,
        "worker_rss": rss,
        "setup_seconds": setup,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


# --- report ------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table(data: dict[str, Any]) -> str:
    """The end-to-end results as plain text."""
    head = (
        f"{'row':<46}{'jobs':>7}{'jobs/s':>8}{'x core':>8}{'x cpu':>7}{'decid/s':>9}"
        f"{'p50':>7}{'p95':>7}"
        f"{'p99 ms':>8}{'correct':>11}   {'cpu ms/job c/api/w/pg':>22}"
    )
    lines = [head, "-" * len(head)]
    for row in data["rows"]:
        cpu = row["cpu_ms_per_job"]
        parts = [cpu.get(k) for k in ("client", "api", "workers", "postgresql")]
        if "service" in cpu:
            parts = [cpu["client"], cpu["service"], None, None]
        cpu_text = "/".join(_fmt(p, ".2f") for p in parts)
        lines.append(
            f"{row['label']:<46}{row['jobs']:>7}{_fmt(row['jobs_per_s'], '.0f'):>8}"
            f"{_fmt(row.get('over_in_process'), '.3f'):>8}"
            f"{_fmt(row.get('over_in_process_cpu'), '.3f'):>7}"
            f"{_fmt(row.get('decided_per_s'), '.0f'):>9}"
            f"{_fmt(row.get('latency_ms_p50'), '.0f'):>7}"
            f"{_fmt(row.get('latency_ms_p95'), '.0f'):>7}"
            f"{_fmt(row.get('latency_ms_p99'), '.0f'):>8}"
            f"{row['correct']:>7}/{row['jobs']:<7}{cpu_text:>22}"
        )
        if row["wrong"] or row["lost"] or row["rate_limited_429"]:
            lines.append(
                f"    wrong {row['wrong']} {row['wrong_reasons']}, lost {row['lost']}, "
                f"429s {row['rate_limited_429']}"
            )
    ref = data["in_process_reference"]
    lines += [
        "",
        f"x core: jobs/s over {ref['processes']} x the single-process core rate of this run "
        f"({ref['attestation_per_s_1_process']:.0f} attestations/s, "
        f"{ref['assertion_per_s_1_process']:.0f} assertions/s).",
        "x cpu: the core's CPU time per operation over the service's CPU time per job (API +",
        "workers + PostgreSQL): what x core would be with the cores to itself, whatever else runs.",
        "jobs/s: first submission -> last verdict seen by the client; decid/s: first "
        "submission -> last decision in the store; latency: submission -> verdict at the client.",
        "cpu ms/job: CPU of this client / the API process (embedded: the whole serve tree) / "
        "the worker processes / PostgreSQL backends, per job.",
    ]
    scaling = data["scaling_2_over_1_workers"]
    if scaling:
        lines.append(
            "2 workers over 1 (decided/s): "
            + ", ".join(f"{kind}s {ratio:.2f}x" for kind, ratio in scaling.items())
        )
    rss = data["worker_rss"]
    if rss:
        points = [
            f"{name} {point['rss_mib']} MiB ({point['jobs']:,} jobs)"
            for name, point in rss.items()
            if isinstance(point, dict)
        ]
        growth = rss.get("growth_high_over_low")
        lines.append(
            "worker RSS (2 workers with their pool processes): "
            + "; ".join(points)
            + (f"; growth {growth:.3f}x" if growth else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1,000 devices instead of 10,000")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server (admin URL)")
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated rows to run (default: all of {','.join(ROWS)})",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of the API and the workers during each burst into DIR",
    )
    parser.add_argument(
        "--pool",
        choices=("prefork", "solo"),
        default="prefork",
        help="the workers' Celery pool (default: prefork, as `appattest worker` runs)",
    )
    parser.add_argument(
        "--api-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the API process, e.g. APPATTEST_BATCHES_IN_FLIGHT=0 (repeatable)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--serve-api", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_api:
        serve_api(args.serve_api)
        return 0
    install_sigterm()
    _log("measuring the in-process core rates")
    reference = measure_core_reference(args.quick)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    data = run_e2e(
        quick=args.quick,
        pg_url=args.pg_url,
        reference=reference,
        rows_wanted=rows,
        profile_dir=args.profile,
        pool=args.pool,
        api_env=dict(setting.partition("=")[::2] for setting in args.api_setting),
    )
    print(table(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


def install_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that every ``finally`` stops its subprocesses and
    releases its database and Redis lease."""

    def stop(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())

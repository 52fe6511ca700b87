"""A worker survives its broker's death and its own, and ``appattest serve`` leaves no orphan.

Everything runs real processes: ``appattest worker`` (a supervisor and its Celery worker),
``appattest serve``, private ``redis-server`` processes (``tests/faults.py``) that are killed
under load, and, for the supervisor's own rules, small child programs that crash, exit or
wait for signals as told. Process trees are read from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from sqlalchemy.orm import Session, sessionmaker

from producer.jobs import JobQueue, QueueUnavailable, check_request
from tests.factory import APP_ID, Device, TestCA
from tests.faults import RedisServer, ServerUnavailable, free_port, redis_server
from tests.stack import Stack, service_stack
from worker.queue.app import create_celery_app
from worker.store.challenges import Purpose, new_challenge, store_challenges
from worker.store.db import create_store_engine, session_factory

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc"),
]

# How long the broker waits before it hands a held message of a dead worker to another.
VISIBILITY_TIMEOUT = 3
# Restart delays short enough for tests: 0.5 s, 1 s, 2 s, 2 s, ...
FAST_RESTARTS = ["--restart-delay=0.5", "--restart-delay-max=2", "--healthy-after=60"]


# Processes ----------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process; None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid``, each with its start time (a pid can be reused)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, started) in parents.items():
            if ppid == parent and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def alive(processes: dict[int, int]) -> set[int]:
    """Those of ``processes`` (pid: start time) still running."""
    return {
        pid
        for pid, started in processes.items()
        if (stat := _stat(pid)) is not None and stat[1] == started
    }


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def celery_main(supervisor: int) -> int | None:
    """The pid of the Celery worker a supervisor runs now (its only child), if any."""
    children = [
        pid
        for pid in descendants(supervisor)
        if (stat := _stat(pid)) is not None and stat[0] == supervisor
    ]
    return children[0] if len(children) == 1 else None


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# Jobs -----------------------------------------------------------------------------------------


@contextmanager
def sessions_for(url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_store_engine(url)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def registrations(ca: TestCA, sessions: sessionmaker[Session], count: int) -> list[tuple[Any, str]]:
    """``count`` valid registration requests on fresh challenges, each with its keyId."""
    now = datetime.now(UTC)
    issued = [
        new_challenge(purpose=Purpose.REGISTRATION, key_id=None, ttl=timedelta(minutes=30), now=now)
        for _ in range(count)
    ]
    with sessions() as session, session.begin():
        store_challenges(session, issued)
    challenges = [i.challenge for i in issued]
    devices = [Device(ca=ca) for _ in range(count)]
    return [
        (check_request(d.registration_body(c, now=now)), d.key_id_b64)
        for d, c in zip(devices, challenges, strict=True)
    ]


def verdicts(queue: JobQueue, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """The verdict of every job that has one within ``timeout`` seconds."""
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(job_ids) and time.monotonic() < deadline:
        pending = [j for j in job_ids if j not in results]
        try:
            for start in range(0, len(pending), 500):
                chunk = pending[start : start + 500]
                for job_id, status in zip(chunk, queue.statuses(chunk), strict=True):
                    if status.status == "done" and status.result is not None:
                        results[job_id] = status.result.to_json_dict()
        except QueueUnavailable:
            pass
        time.sleep(0.2)
    return results


def assert_every_job_registered(
    results: dict[str, dict[str, Any]], expected: dict[str, str]
) -> None:
    """Every job got its verdict, and each is the registration of its own key."""
    missing = set(expected) - set(results)
    assert not missing, f"{len(missing)} of {len(expected)} accepted jobs got no verdict"
    wrong = {
        j: r.get("reason")
        for j, r in results.items()
        if not (r["ok"] and r["kind"] == "registration" and r["keyId"] == expected[j])
    }
    assert not wrong, wrong


# 1. The crash itself: kombu's Redis transport after Redis died ----------------------------


@pytest.mark.parametrize("transport", ["kombu", "appattest"])
def test_closing_a_connection_after_redis_died_with_a_message_held(transport: str) -> None:
    """The sequence that ended workers with ``Unrecoverable error: AttributeError("'NoneType'
    object has no attribute 'hostname'")``, step by step as Celery's consumer runs it: a
    channel holds an unacknowledged message while it and another channel wait for messages
    (BRPOP in flight); Redis is killed; the consumer calls ``collect()``, then ``close()``.

    kombu's transport raises the AttributeError (when this stops, kombu fixed it and
    ``worker/queue/redis_transport.py`` can go). The worker's transport closes without an error,
    and the held message is not lost: it comes back once its visibility timeout passed."""
    with ExitStack() as cleanup:
        try:
            server = cleanup.enter_context(redis_server(persistent=True))
        except ServerUnavailable as exc:
            pytest.skip(str(exc))
        name = None if transport == "kombu" else "worker.queue.redis_transport:Transport"
        # Redelivered 1 s after delivery, looked for at every poll that finds nothing.
        options = {"visibility_timeout": 1, "unacked_restore_throttle": 1}
        connection = Connection(server.url(0), transport=name, transport_options=options)
        queue = Queue("jobs", Exchange("jobs"), "jobs")
        held: list[Any] = []
        channel = connection.default_channel
        Producer(channel).publish(
            {"job": 1}, exchange=queue.exchange, routing_key="jobs", declare=[queue]
        )
        Consumer(channel, [queue], callbacks=[lambda _, m: held.append(m)]).consume()
        connection.drain_events(timeout=5)
        assert len(held) == 1 and not held[0].acknowledged
        other = connection.channel()
        idle = Queue("idle", Exchange("idle"), "idle")
        Consumer(other, [idle], callbacks=[lambda _, m: None]).consume()
        poller = connection.transport.cycle
        poller._register_BRPOP(channel)
        poller._register_BRPOP(other)
        assert channel._in_poll and other._in_poll

        server.stop(kill=True)
        connection.collect(socket_timeout=1)
        if transport == "kombu":
            with pytest.raises(AttributeError, match="hostname"):
                connection.close()
            return
        connection.close()

        server.start()
        with Connection(server.url(0), transport_options=options) as again:
            back: list[Any] = []
            consumer = Consumer(again, [queue], callbacks=[lambda b, m: back.append((b, m))])
            with consumer:
                deadline = time.monotonic() + 20
                while not back and time.monotonic() < deadline:
                    # The transport restores messages past their visibility timeout as it
                    # polls.
                    with suppress(TimeoutError):
                        again.drain_events(timeout=0.5)
            assert [body for body, _ in back] == [{"job": 1}]
            back[0][1].ack()


# 2. The supervisor's rules, with small child programs -----------------------------------------

CHILD = """
import signal, sys, time
mode = sys.argv[1]
if mode == "crash":  # as Celery does on an unrecoverable error, after a while
    time.sleep(float(sys.argv[2]))
    print("2026-12-01 00:00:00,000 CRITICAL MainProcess Unrecoverable error: "
          "AttributeError(\\"'NoneType' object has no attribute 'hostname'\\")",
          file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "clean":
    sys.exit(0)
# "wait": run until a stop signal; report each signal received, then exit 0.
received = []
def on_signal(signum, frame):
    received.append(signum)
    print(f"child got {signal.Signals(signum).name}", file=sys.stderr, flush=True)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, on_signal)
print("child ready", file=sys.stderr, flush=True)
while not received:
    time.sleep(0.05)
time.sleep(1)  # time for a duplicate signal to arrive, if one were sent
sys.exit(0)
"""

SUPERVISOR = """
import logging, sys
from worker.queue.supervise import Backoff, Supervisor
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
first, cap, healthy = (float(x) for x in sys.argv[1:4])
backoff = Backoff(first=first, cap=cap, healthy_after=healthy)
sys.exit(Supervisor([sys.executable, *sys.argv[4:]], backoff=backoff).run())
"""


@contextmanager
def supervisor(
    tmp_path: Path, backoff: tuple[float, float, float], *child: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A supervisor process running ``CHILD`` with these arguments; its log's path."""
    (tmp_path / "child.py").write_text(CHILD)
    log_path = tmp_path / "supervisor.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SUPERVISOR,
                *(str(x) for x in backoff),
                str(tmp_path / "child.py"),
                *child,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, log_path
    finally:
        tree = descendants(process.pid)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        for pid in alive(tree):
            os.kill(pid, signal.SIGKILL)


_RESTART = re.compile(
    r"worker process \d+ (exited with status \d+|was killed by \w+) after [\d.]+ s; "
    r"restarting it in ([\d.]+) s \(failure (\d+) in a row\)(.*)"
)


def restarts(log_path: Path) -> list[tuple[str, float, int, str]]:
    """(how the child ended, the delay, failures in a row, the rest) per logged restart."""
    return [
        (how, float(delay), int(failures), rest)
        for how, delay, failures, rest in _RESTART.findall(_log(log_path))
    ]


def test_a_crashing_worker_is_restarted_with_capped_exponential_backoff(tmp_path: Path) -> None:
    """A child that exits with status 1 (Celery's unrecoverable error) is started again after
    0.2 s, 0.4 s, 0.8 s, then 0.8 s each time (the cap); every restart is logged with the
    reason, the child's last CRITICAL line. SIGTERM during a delay stops the supervisor, with
    no further start."""
    with supervisor(tmp_path, (0.2, 0.8, 60), "crash", "0.05") as (process, log_path):
        wait_until(lambda: len(restarts(log_path)) >= 5, 60, "five restarts")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 1
    logged = restarts(log_path)
    assert [delay for _, delay, _, _ in logged[:5]] == [0.2, 0.4, 0.8, 0.8, 0.8]
    assert [failures for _, _, failures, _ in logged] == list(range(1, len(logged) + 1))
    for how, _, _, rest in logged:
        assert how == "exited with status 1"
        assert "Unrecoverable error: AttributeError" in rest and "hostname" in rest


def test_a_worker_that_ran_long_enough_restarts_after_the_first_delay_again(
    tmp_path: Path,
) -> None:
    """Failures of a child that ran at least ``healthy_after`` seconds do not add up: each is
    the first in a row, restarted after the first delay."""
    with supervisor(tmp_path, (0.2, 5, 0.5), "crash", "0.8") as (process, log_path):
        wait_until(lambda: len(restarts(log_path)) >= 3, 60, "three restarts")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    assert [(delay, failures) for _, delay, failures, _ in restarts(log_path)[:3]] == [(0.2, 1)] * 3


def test_a_worker_that_exits_cleanly_is_not_restarted(tmp_path: Path) -> None:
    with supervisor(tmp_path, (0.2, 1, 60), "clean") as (process, log_path):
        assert process.wait(timeout=30) == 0
    log = _log(log_path)
    assert "stopped (status 0); not restarting" in log
    assert log.count(" started") == 1 and not restarts(log_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_reaches_the_worker_once_and_ends_supervision(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT sent to the supervisor's whole process group (as a terminal's Ctrl+C
    is) reaches the worker exactly once, forwarded by the supervisor, which then exits with
    the worker's status and does not restart it."""
    with supervisor(tmp_path, (0.2, 1, 60), "wait") as (process, log_path):
        wait_until(lambda: "child ready" in _log(log_path), 30, "the child started")
        child = celery_main(process.pid)
        assert child is not None
        os.killpg(process.pid, sig)
        assert process.wait(timeout=20) == 0
        assert _stat(child) is None
    log = _log(log_path)
    assert log.count("child got") == 1 and f"child got {sig.name}" in log
    assert not restarts(log_path) and log.count("child ready") == 1


ORPHAN = """
import os, sys, time
from worker.queue.supervise import stop_with_parent
parent = int(sys.argv[1])
print(os.getpid(), flush=True)
while os.getppid() == parent:  # its parent exits meanwhile
    time.sleep(0.05)
stop_with_parent(parent, poll=0.1)
time.sleep(60)
"""


def test_a_process_whose_parent_died_before_it_watched_it_stops(tmp_path: Path) -> None:
    """The race the kernel's parent-death signal leaves open (the parent died before the
    child asked for the signal) is closed by the parent watch, which is also the whole
    mechanism where the kernel has no such signal: the process gets SIGTERM."""
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; "
            "subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())])",
            ORPHAN,
        ],
        stdout=subprocess.PIPE,
    )
    assert starter.stdout is not None
    with starter.stdout:
        orphan = int(starter.stdout.readline())
    starter.wait(timeout=30)
    started = _stat(orphan)
    try:
        wait_until(lambda: _stat(orphan) is None, 30, "the orphan stopped")
    finally:
        if (stat := _stat(orphan)) is not None and started is not None and stat[1] == started[1]:
            os.kill(orphan, signal.SIGKILL)


# 3. Real workers: killed under load, Redis killed under load ----------------------------------


@pytest.fixture
def stack(ca: TestCA, pg_url: str, tmp_path: Path) -> Iterator[Stack]:
    """A stack on the shared Redis (a leased pair of databases) and a fresh database."""
    env = {"APPATTEST_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT)}
    with service_stack(
        store_url=pg_url, root_pem=ca.root_pem, workdir=tmp_path, app_ids=APP_ID, extra_env=env
    ) as stack:
        yield stack


def worker_log(stack: Stack) -> Path:
    [path] = stack.workdir.glob("worker-*.log")
    return path


def test_a_killed_worker_is_restarted_and_every_job_gets_its_verdict(
    ca: TestCA, stack: Stack
) -> None:
    """``appattest worker`` under load: its Celery worker (main process and pool) is killed
    with SIGKILL three times, each time soon after it came back. The supervisor starts it
    again after 0.5 s, 1 s and 2 s, logging that it was killed; every accepted job gets its
    verdict. SIGTERM then stops the supervisor and its worker, with no restart and no
    process left."""
    supervisor_process = stack.start_worker(supervise=True, concurrency=2, args=FAST_RESTARTS)
    log_path = worker_log(stack)
    queue = JobQueue(create_celery_app(stack.settings), max_batch=10)
    with sessions_for(stack.settings.store_url) as sessions:
        jobs = registrations(ca, sessions, 300)
    expected: dict[str, str] = {}
    try:
        for round_ in range(3):
            batch = jobs[round_ * 100 : (round_ + 1) * 100]
            ids = queue.submit_many([request for request, _ in batch])
            expected.update(zip(ids, (key_id for _, key_id in batch), strict=True))
            wait_until(lambda: celery_main(supervisor_process.pid) is not None, 60, "a worker")
            victim = celery_main(supervisor_process.pid)
            assert victim is not None
            os.killpg(victim, signal.SIGKILL)
            wait_until(
                lambda r=round_: len(restarts(log_path)) > r, 30, f"restart {round_ + 1} logged"
            )
        results = verdicts(queue, list(expected), 120)
    finally:
        queue.close()
        queue.celery_app.close()
    logged = restarts(log_path)
    assert [(how, delay, n) for how, delay, n, _ in logged] == [
        ("was killed by SIGKILL", 0.5, 1),
        ("was killed by SIGKILL", 1.0, 2),
        ("was killed by SIGKILL", 2.0, 3),
    ]
    assert_every_job_registered(results, expected)

    tree = descendants(supervisor_process.pid)
    assert len(tree) >= 3  # the Celery worker and its two pool processes
    os.killpg(supervisor_process.pid, signal.SIGTERM)
    assert supervisor_process.wait(timeout=60) == 0
    wait_until(lambda: not alive(tree), 10, "every worker process gone")
    assert len(restarts(log_path)) == 3


def test_redis_killed_repeatedly_under_load(ca: TestCA, pg_url: str, tmp_path: Path) -> None:
    """Redis (persistent) is killed with SIGKILL ten times while jobs keep coming, and
    restarted each time after up to a second. The worker comes back every time (if its Celery
    worker exits, the supervisor starts it again); every job the queue accepted gets its
    right verdict. A SIGKILL of the supervisor then takes its worker down with it."""
    env = {
        "APPATTEST_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT),
        "APPATTEST_LEDGER_SWEEP_SECONDS": "1",
        "APPATTEST_LEDGER_RESEND_SECONDS": "5",
    }
    with ExitStack() as cleanup:
        try:
            server: RedisServer = cleanup.enter_context(redis_server(persistent=True))
        except ServerUnavailable as exc:
            pytest.skip(str(exc))
        stack = cleanup.enter_context(
            service_stack(
                store_url=pg_url,
                root_pem=ca.root_pem,
                workdir=tmp_path,
                app_ids=APP_ID,
                broker_url=server.url(0),
                result_backend=server.url(1),
                extra_env=env,
            )
        )
        supervisor_process = stack.start_worker(supervise=True, concurrency=2, args=FAST_RESTARTS)
        with sessions_for(pg_url) as sessions:
            jobs = registrations(ca, sessions, 1200)
        queue = JobQueue(create_celery_app(stack.settings), max_batch=5)
        cleanup.callback(queue.celery_app.close)
        cleanup.callback(queue.close)
        expected: dict[str, str] = {}
        refused = 0
        stop = threading.Event()

        def load() -> None:
            nonlocal refused
            for start in range(0, len(jobs), 10):
                if stop.is_set():
                    return
                batch = jobs[start : start + 10]
                try:
                    ids = queue.submit_many([request for request, _ in batch])
                except QueueUnavailable:
                    refused += len(batch)
                    time.sleep(0.05)
                    continue
                expected.update(zip(ids, (key_id for _, key_id in batch), strict=True))
                time.sleep(0.12)

        sender = threading.Thread(target=load, name="load")
        sender.start()
        rng = random.Random(7)
        try:
            for _ in range(10):
                time.sleep(rng.uniform(0.3, 1.5))
                server.stop(kill=True)
                time.sleep(rng.uniform(0.1, 1.0))
                server.start()
        finally:
            stop.set()
            sender.join(timeout=60)
        assert supervisor_process.poll() is None, "the supervisor exited"
        results = verdicts(queue, list(expected), 180)
        log = _log(worker_log(stack))
        print(
            f"\nfault=redis-kills kills=10 accepted={len(expected)} refused={refused} "
            f"verdicts={len(results)} worker-restarts={len(restarts(worker_log(stack)))} "
            f"hostname-errors={log.count('has no attribute ' + repr('hostname'))}"
        )
        assert len(expected) >= 100, "too few jobs were accepted to call this a load"
        assert_every_job_registered(results, expected)
        # The crash this fixes: never again.
        assert "object has no attribute 'hostname'" not in log

        tree = descendants(supervisor_process.pid)
        assert len(tree) >= 3
        os.kill(supervisor_process.pid, signal.SIGKILL)
        supervisor_process.wait(timeout=10)
        wait_until(lambda: not alive(tree), 20, "the worker died with its supervisor")


# 4. appattest serve: no orphan, one server per data directory ------------------------------


def _serve(
    workdir: Path, data_dir: Path, port: int, log_name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    env["APPATTEST_API_KEYS"] = "serve-test-key"
    log_path = workdir / log_name
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appattest",
                "serve",
                "--app-id",
                APP_ID,
                "--root-ca",
                str(workdir / "root.pem"),
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log_path


def _wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, _log(log_path)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve did not become ready: " + _log(log_path)
        time.sleep(0.2)


def test_serve_killed_leaves_no_worker_and_a_data_dir_serves_one_at_a_time(
    ca: TestCA, tmp_path: Path
) -> None:
    """While ``appattest serve`` runs, a second one on its data directory exits with status
    1 and says why. SIGKILL of the first (its process alone) takes its worker (supervisor,
    Celery worker, pool) down within seconds, and the data directory is free again: a new
    serve starts on it."""
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    data_dir = tmp_path / "data"
    port = free_port()
    first, first_log = _serve(tmp_path, data_dir, port, "first.log")
    processes = [first]
    try:
        _wait_ready(first, port, first_log)
        wait_until(lambda: len(descendants(first.pid)) >= 4, 60, "serve's worker and pool")
        tree = descendants(first.pid)

        second, second_log = _serve(tmp_path, data_dir, free_port(), "second.log")
        processes.append(second)
        assert second.wait(timeout=60) == 1
        message = _log(second_log)
        assert "is in use by another appattest serve" in message, message
        assert str(data_dir.resolve()) in message
        assert alive(tree) == set(tree) and first.poll() is None

        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        wait_until(lambda: not alive(tree), 20, "serve's worker processes gone")

        port = free_port()
        third, third_log = _serve(tmp_path, data_dir, port, "third.log")
        processes.append(third)
        _wait_ready(third, port, third_log)
        third_tree = descendants(third.pid)
        os.killpg(third.pid, signal.SIGTERM)
        assert third.wait(timeout=60) == 0
        wait_until(lambda: not alive(third_tree), 20, "a stopped serve's worker gone")
    finally:
        for process in processes:
            rest = descendants(process.pid)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            for pid in alive(rest):
                os.kill(pid, signal.SIGKILL)


def test_every_process_publishes_through_the_fixed_redis_transport() -> None:
    """The API's publisher meets the same closed channel after Redis died as the worker's
    consumer: with kombu's transport its publish raised AttributeError (a 500) instead of a
    connection error that kombu's retry recovers from. The app both build uses the fixed
    transport for redis:// (and kombu's own for rediss:// and the other brokers)."""
    from worker.queue import redis_transport
    from worker.queue.app import create_celery_app
    from worker.settings import Settings

    def transport_of(broker_url: str) -> type:
        settings = Settings(broker_url=broker_url, result_backend="redis://127.0.0.1:6379/1")
        with create_celery_app(settings).connection_for_write() as connection:
            return type(connection.transport)

    assert transport_of("redis://127.0.0.1:6379/0") is redis_transport.Transport
    assert transport_of("rediss://127.0.0.1:6379/0") is not redis_transport.Transport
    assert transport_of("amqp://guest:guest@127.0.0.1:5672//") is not redis_transport.Transport

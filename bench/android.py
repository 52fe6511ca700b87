"""Android jobs against the local fake of Google (``tests/fake_google.py``) answering after
100 ms, through a real ``appattest worker`` (its default queues: Apple's with 2 processes,
Android's pool of threads a child of it) on Redis and PostgreSQL.

Prints, from one run:

- Android jobs per second, and CPU milliseconds per Android job of the Android worker's
  process (and of Apple's, which should spend nothing on them);
- iOS registrations per second alone, and while a backlog of Android jobs waits on Google,
  and the ratio of the two (1.0: Apple's throughput does not drop). The iOS bursts run
  alone / beside Android / alone, and the "alone" figure is the mean of the two.

    python bench/android.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from producer.jobs import JobQueue, check_request  # noqa: E402
from tests.factory import APP_ID, Device, TestCA  # noqa: E402
from tests.fake_google import FakeGoogle, fake_google, payload  # noqa: E402
from tests.stack import fresh_database, service_stack  # noqa: E402
from worker.contract import PluginRequest  # noqa: E402
from worker.queue.app import create_celery_app  # noqa: E402
from worker.store.challenges import Purpose, new_challenge, store_challenges  # noqa: E402
from worker.store.db import create_store_engine, session_factory  # noqa: E402
from worker.store.models import Verdict  # noqa: E402

PACKAGE = "com.example.app"
CERT = bytes(range(32))
LATENCY = 0.100
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


def _workers(supervisor: int) -> dict[str, int]:
    """The supervisor's Celery workers: ``apple`` (its child, serving verify) and ``android``
    (that worker's child serving the android queue)."""
    found: dict[str, int] = {}
    for pid in _tree(supervisor):
        fields = _stat(pid)
        if pid == supervisor or fields is None:
            continue
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--queues=android" in arguments:
            found["android"] = pid
        elif int(fields[1]) == supervisor:
            found["apple"] = pid
    return found


def _cpu_of(workers: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each worker's process tree, Apple's without the Android child's."""
    android = _tree(workers["android"])
    apple = [pid for pid in _tree(workers["apple"]) if pid not in set(android)]
    return {"android": _cpu(android), "apple": _cpu(apple)}


def _issue(sessions: sessionmaker[Session], count: int) -> list[str]:
    now = datetime.now(UTC)
    issued = [
        new_challenge(purpose=Purpose.REGISTRATION, key_id=None, ttl=timedelta(hours=1), now=now)
        for _ in range(count)
    ]
    with sessions() as session, session.begin():
        store_challenges(session, issued)
    return [i.challenge for i in issued]


def _android_jobs(google: FakeGoogle, challenges: list[str]) -> list[PluginRequest]:
    jobs = []
    for challenge in challenges:
        token = google.add_token(
            PACKAGE,
            payload(
                package_name=PACKAGE,
                signed_text=challenge,
                certificate_digest=CERT,
                # Requested when the burst runs: a token older than five minutes is stale.
                at=datetime.now(UTC) + timedelta(seconds=30),
            ),
        )
        jobs.append(
            check_request(
                {
                    "platform": "android",
                    "format": "google-play-integrity-standard",
                    "keyId": "android-standard-integrity",
                    "token": token,
                    "challenge": challenge,
                }
            )
        )
    return jobs


def _ios_jobs(ca: TestCA, challenges: list[str]) -> list[PluginRequest]:
    now = datetime.now(UTC)
    return [
        check_request(Device(ca=ca).registration_body(challenge, now=now))
        for challenge in challenges
    ]


def _decided(sessions: sessionmaker[Session], job_ids: list[str]) -> int:
    total = 0
    with sessions() as session:
        for start in range(0, len(job_ids), 5000):
            chunk = job_ids[start : start + 5000]
            total += (
                session.scalar(
                    select(func.count()).select_from(Verdict).where(Verdict.job_id.in_(chunk))
                )
                or 0
            )
    return total


def _wait(sessions: sessionmaker[Session], job_ids: list[str], timeout: float = 600) -> float:
    """Seconds until every job has a verdict row, from now."""
    started = time.monotonic()
    while _decided(sessions, job_ids) < len(job_ids):
        if time.monotonic() - started > timeout:
            raise RuntimeError("jobs not decided in time")
        time.sleep(0.05)
    return time.monotonic() - started


def _ok(sessions: sessionmaker[Session], job_ids: list[str]) -> int:
    with sessions() as session:
        return sum(
            session.scalar(
                select(func.count())
                .select_from(Verdict)
                .where(Verdict.job_id.in_(job_ids[s : s + 5000]), Verdict.ok.is_(True))
            )
            or 0
            for s in range(0, len(job_ids), 5000)
        )


def run(*, quick: bool, pg_url: str) -> dict[str, Any]:
    android_n = 600 if quick else 3000
    ios_n = 300 if quick else 1000
    ca = TestCA.create()
    with (
        tempfile.TemporaryDirectory(prefix="bench-android-") as tmp,
        fresh_database(pg_url, "appattest_bench") as store_url,
        fake_google() as google,
    ):
        workdir = Path(tmp)
        env = {
            "APPATTEST_ANDROID_APPS": json.dumps({PACKAGE: {"certificateDigests": [CERT.hex()]}}),
            "APPATTEST_GOOGLE_CREDENTIALS_FILE": str(google.service_account_file(workdir)),
            "APPATTEST_PLAY_INTEGRITY_URL": google.url,
            "APPATTEST_PLAY_INTEGRITY_TIMEOUT_SECONDS": "30",
        }
        google.latency = LATENCY
        with service_stack(
            store_url=store_url,
            root_pem=ca.root_pem,
            workdir=workdir,
            app_ids=APP_ID,
            extra_env=env,
        ) as stack:
            supervisor = stack.start_worker(
                name="bench", concurrency=2, supervise=True, args=["--android-concurrency=16"]
            )
            deadline = time.monotonic() + 60
            while len(workers := _workers(supervisor.pid)) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the two workers did not start")
                time.sleep(0.2)
            time.sleep(3)  # both Celery workers connected and consuming
            engine = create_store_engine(store_url)
            sessions = session_factory(engine)
            app = create_celery_app(stack.settings)
            queue = JobQueue(app, max_batch=50)
            try:
                # Warm-up: one of each, so that sign-in and connections are not timed.
                warm = queue.submit_many(
                    _android_jobs(google, _issue(sessions, 1)) + _ios_jobs(ca, _issue(sessions, 1))
                )
                _wait(sessions, warm)

                # Android alone.
                android = _android_jobs(google, _issue(sessions, android_n))
                before = _cpu_of(workers)
                started = time.monotonic()
                android_ids = queue.submit_many(android)
                _wait(sessions, android_ids)
                android_wall = time.monotonic() - started
                after = _cpu_of(workers)
                spent = {k: after[k] - before[k] for k in after}
                android_ok = _ok(sessions, android_ids)

                def ios_burst(beside_android: bool) -> float:
                    ios = _ios_jobs(ca, _issue(sessions, ios_n))
                    backlog: list[str] = []
                    if beside_android:
                        backlog = queue.submit_many(
                            _android_jobs(google, _issue(sessions, android_n))
                        )
                    started = time.monotonic()
                    ids = queue.submit_many(ios)
                    _wait(sessions, ids)
                    wall = time.monotonic() - started
                    pending = len(backlog) - _decided(sessions, backlog)
                    if beside_android:
                        print(f"  android jobs still waiting when iOS finished: {pending}")
                        _wait(sessions, backlog)
                    if _ok(sessions, ids) != len(ids):
                        raise RuntimeError("an iOS registration was refused")
                    return len(ids) / wall

                alone_1 = ios_burst(False)
                beside = ios_burst(True)
                alone_2 = ios_burst(False)
            finally:
                queue.close()
                app.close()
                engine.dispose()
    alone = (alone_1 + alone_2) / 2
    return {
        "android_jobs": android_n,
        "android_ok": android_ok,
        "google_latency_ms": LATENCY * 1000,
        "android_jobs_per_s": round(android_n / android_wall, 1),
        "android_cpu_ms_per_job": {k: round(v * 1000 / android_n, 3) for k, v in spent.items()},
        "ios_jobs": ios_n,
        "ios_per_s_alone": [round(alone_1, 1), round(alone_2, 1)],
        "ios_per_s_beside_android": round(beside, 1),
        "ios_beside_over_alone": round(beside / alone, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "APPATTEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(quick=args.quick, pg_url=args.pg_url)
    cpu = result["android_cpu_ms_per_job"]
    print(
        f"android: {result['android_jobs']} jobs ({result['android_ok']} accepted), Google "
        f"{result['google_latency_ms']:.0f} ms: {result['android_jobs_per_s']} jobs/s, "
        f"CPU {cpu.get('android')} ms/job (Android worker), {cpu.get('apple')} ms/job (Apple's)"
    )
    print(
        f"ios: {result['ios_jobs']} registrations: {result['ios_per_s_alone']} jobs/s alone, "
        f"{result['ios_per_s_beside_android']} beside Android jobs waiting on Google: "
        f"ratio {result['ios_beside_over_alone']}"
    )
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

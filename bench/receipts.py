"""Throughput of ``appattest receipts refresh`` against the local fake of Apple's service.

What it does, in one run:

1. creates a fresh PostgreSQL database on the server of ``--pg-url`` and migrates it;
2. stores N registered keys whose receipts the fake accepts (ATTEST receipts signed under a
   throwaway receipt CA; one attestation shared by all keys, which is what a refresh reads);
3. starts the fake (``tests/fake_apple.py``) in this process, answering every exchange after
   ``--latency`` seconds (50 ms by default, about what Apple's service takes), with no rate
   limit of its own;
4. leases a pair of Redis databases as the test suite does (``tests.stack``), starts one
   ``appattest worker --queues receipts`` (a pool of ``--threads`` threads) with a shared
   rate limit far above what the run reaches, and runs ``appattest receipts refresh`` over all
   keys, once per thread count given;
5. prints keys refreshed per second of the run phase (from the run's creation to its last
   decision, as recorded in the store), the CPU seconds the worker process used per refresh
   (user + system, from ``/proc``), and the results as JSON; drops the database.

Every run must end with every key ``refreshed``: a broken refresher cannot pass fast failures
off as throughput. This is a benchmark, not a test: it asserts nothing about speed.

    python bench/receipts.py --quick            # 500 keys
    python bench/receipts.py                    # 3,000 keys, threads 16 and 64
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from tests.factory import (  # noqa: E402
    APP_ID,
    Device,
    ReceiptCA,
    TestCA,
    client_data_hash,
    make_receipt,
)
from tests.fake_apple import KEY_ID, TEAM_ID, FakeApple, running  # noqa: E402
from tests.stack import REDIS_URL, fresh_database, leased_redis_pair  # noqa: E402
from worker.core.attestation import parse_attestation_object  # noqa: E402
from worker.store.db import create_store_engine, session_factory, upgrade  # noqa: E402
from worker.store.models import DeviceKey, ReceiptState, RefreshResult, RefreshRun  # noqa: E402

DEFAULT_PG_URL = os.environ.get(
    "APPATTEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def store_keys(store_url: str, ca: TestCA, receipt_ca: ReceiptCA, count: int) -> None:
    now = datetime.now(UTC)
    device = Device(ca=ca)
    challenge = "bench"
    attestation = device.attestation_object(client_data_hash(challenge), now=now)
    credential = parse_attestation_object(attestation).x5c[0]
    receipt = make_receipt(
        ca=receipt_ca,
        app_id=APP_ID,
        credential_certificate_der=credential,
        client_hash=client_data_hash(challenge),
        creation_time=now - timedelta(minutes=1),
        expiration_time=now + timedelta(days=90),
    )
    keys = [base64.b64encode(os.urandom(32)).decode() for _ in range(count)]
    engine = create_store_engine(store_url)
    upgrade(engine)
    with session_factory(engine)() as session, session.begin():
        session.execute(
            insert(DeviceKey),
            [
                {
                    "key_id": k,
                    "app_id": APP_ID,
                    "environment": "production",
                    "public_key": b"p",
                    "counter": 0,
                    "receipt": receipt,
                    "attestation": attestation,
                    "client_data_hash": client_data_hash(challenge),
                    "verified_at": now,
                    "leaf_fingerprint": b"l",
                    "intermediate_fingerprint": b"i",
                }
                for k in keys
            ],
        )
        session.execute(
            insert(ReceiptState),
            [
                {
                    "key_id": k,
                    "receipt": receipt,
                    "receipt_type": "ATTEST",
                    "created_at": now - timedelta(minutes=1),
                }
                for k in keys
            ],
        )
    engine.dispose()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process ``pid`` (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def wait_for_worker(env: dict[str, str], log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited; see {log}")
        if "ready" in log.read_text():
            return
        time.sleep(0.2)
    raise RuntimeError(f"worker not ready; see {log}")


def run_phase_seconds(store_url: str, run_id: str) -> float:
    engine = create_store_engine(store_url)
    try:
        with session_factory(engine)() as session:
            started = session.scalar(
                select(RefreshRun.created_at).where(RefreshRun.run_id == run_id)
            )
            ended, refreshed = session.execute(
                select(func.max(RefreshResult.decided_at), func.count()).where(
                    RefreshResult.run_id == run_id, RefreshResult.outcome == "refreshed"
                )
            ).one()
            total = session.scalar(select(RefreshRun.total).where(RefreshRun.run_id == run_id))
    finally:
        engine.dispose()
    if refreshed != total or started is None or ended is None:
        raise RuntimeError(f"run {run_id}: {refreshed} of {total} keys refreshed")
    return (ended - started).total_seconds()


def measure(
    env: dict[str, str], store_url: str, workdir: Path, threads: int, keys: int
) -> dict[str, Any]:
    log = workdir / f"worker-{threads}.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli.commands",
                "worker",
                "--no-supervise",
                "--queues=receipts",
                f"--concurrency={threads}",
                "--loglevel=INFO",
                f"--hostname=bench{threads}@%h",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_worker(env, log, worker)
        cpu_before = cpu_seconds(worker.pid)
        run_id = f"bench-{threads}-{uuid.uuid4().hex[:6]}"
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "worker.cli.commands",
                "receipts",
                "refresh",
                "--run-id",
                run_id,
                "--batch-size",
                "20",
                "--report-dir",
                str(workdir / run_id),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"refresh failed: {done.stderr[-2000:]}")
        cpu = cpu_seconds(worker.pid) - cpu_before
        run_seconds = run_phase_seconds(store_url, run_id)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
    return {
        "threads": threads,
        "keys": keys,
        "run_seconds": round(run_seconds, 2),
        "keys_per_second": round(keys / run_seconds, 1),
        "command_seconds": round(wall, 2),
        "worker_cpu_ms_per_refresh": round(cpu / keys * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keys", type=int)
    parser.add_argument("--threads", default=None, help="comma-separated thread counts")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    keys = args.keys or (500 if args.quick else 3000)
    thread_counts = [int(t) for t in (args.threads or ("16" if args.quick else "16,64")).split(",")]
    ca, receipt_ca = TestCA.create(), ReceiptCA.create()
    p8 = ec.generate_private_key(ec.SECP256R1())
    fake = FakeApple(ca=receipt_ca, public_key=p8.public_key(), latency=args.latency)
    rows: list[dict[str, Any]] = []
    with (
        TemporaryDirectory() as tmp,
        running(fake),
        fresh_database(args.pg_url, "appattest_bench") as store_url,
        leased_redis_pair() as (broker_db, backend_db),
    ):
        workdir = Path(tmp)
        (workdir / "AuthKey.p8").write_bytes(
            p8.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (workdir / "receipt-root.pem").write_bytes(receipt_ca.root_pem)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")},
            "APPATTEST_STORE_URL": store_url,
            "APPATTEST_BROKER_URL": f"{REDIS_URL}/{broker_db}",
            "APPATTEST_RESULT_BACKEND": f"{REDIS_URL}/{backend_db}",
            "APPATTEST_APP_IDS": APP_ID,
            "APPATTEST_APPLE_TEAM_ID": TEAM_ID,
            "APPATTEST_APPLE_KEY_ID": KEY_ID,
            "APPATTEST_APPLE_PRIVATE_KEY_FILE": str(workdir / "AuthKey.p8"),
            "APPATTEST_APPLE_DATA_URL": fake.url("production"),
            "APPATTEST_APPLE_DATA_DEVELOPMENT_URL": fake.url("development"),
            "APPATTEST_RECEIPT_ROOT_CA": str(workdir / "receipt-root.pem"),
            "APPATTEST_APPLE_RATE_LIMIT_PER_SECOND": "10000",
            "APPATTEST_APPLE_RATE_LIMIT_BURST": "1000",
        }
        for threads in thread_counts:
            store_keys(store_url, ca, receipt_ca, keys)
            rows.append(measure(env, store_url, workdir, threads, keys))
            # The next round refreshes fresh keys (these are not due for a day).
            engine = create_store_engine(store_url)
            with session_factory(engine)() as session, session.begin():
                session.query(DeviceKey).delete()
                session.query(ReceiptState).delete()
            engine.dispose()
    print(
        f"receipt refresh against the fake, {args.latency * 1000:.0f} ms per call, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'threads':>8} {'keys':>6} {'keys/s':>8} {'run s':>7} {'cmd s':>7} {'CPU ms/refresh':>15}"
    )
    for row in rows:
        print(
            f"{row['threads']:>8} {row['keys']:>6} {row['keys_per_second']:>8} "
            f"{row['run_seconds']:>7} {row['command_seconds']:>7} "
            f"{row['worker_cpu_ms_per_refresh']:>15}"
        )
    result = {"latency_seconds": args.latency, "cpus": os.cpu_count(), "rows": rows}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

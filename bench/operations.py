"""What operating the service costs: the workers' metrics and verdict log lines per job, and
the retention purge's rate, in one run.

What it does:

1. times ``worker.queue.metrics.observe_verdicts`` on batches of 200 verdicts with the metrics in
   multiprocess mode (files, as a worker with a metrics port runs them), per job;
2. times the per-job verdict log line (``worker.queue.tasks._log_verdict``) written to a file, as
   text and as JSON, per job;
3. times one ECDSA P-256 signature verification, the floor of an assertion's cost, and prints
   each cost above as a ratio to it;
4. on a fresh PostgreSQL database of ``--pg-url``'s server, inserts ``--rows`` expired
   challenges and purges them (``worker.store.retention.purge``, 1,000 rows per
   transaction), printing rows per second.

Run it from the repository root with PostgreSQL running::

    python bench/operations.py [--rows 100000]

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, insert, text

from worker.queue.logs import TEXT_FORMAT, JsonFormatter
from worker.queue.metrics import enable_multiprocess, observe_verdicts, worker_metrics
from worker.queue.tasks import _log_verdict
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import Challenge
from worker.store.retention import Cutoffs, purge


def _per_call(action: object, calls: int) -> float:
    assert callable(action)
    started = time.perf_counter()
    for _ in range(calls):
        action()
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    enable_multiprocess(Path(tempfile.mkdtemp(prefix="bench-metrics-")), clear=True)
    metrics = worker_metrics()
    now = datetime.now(UTC)
    batch = [
        {"kind": "assertion", "ok": True, "appId": "A.b", "environment": "production"}
    ] * 150 + [{"kind": "assertion", "ok": False, "reason": "counter_replay"}] * 50
    apps = frozenset({"A.b"})

    def observe() -> None:
        observe_verdicts(metrics, batch, known_apps=apps, seconds=0.1, submitted_at=now, now=now)

    metrics_us = _per_call(observe, 200) / len(batch) * 1e6

    log_us: dict[str, float] = {}
    result = {"ok": True, "kind": "assertion", "appId": "A.b"}
    root = logging.getLogger()
    for name, formatter in (("text", logging.Formatter(TEXT_FORMAT)), ("json", JsonFormatter())):
        root.handlers.clear()
        handler = logging.FileHandler(Path(tempfile.mkdtemp()) / "log.txt")
        handler.setFormatter(formatter)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        job = str(uuid.uuid4())
        log_us[name] = _per_call(lambda j=job: _log_verdict(j, result, "req-1"), 20_000) * 1e6
        handler.close()
    root.handlers.clear()

    key = ec.generate_private_key(ec.SECP256R1())
    signature = key.sign(b"x" * 64, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    ecdsa_us = (
        _per_call(lambda: public.verify(signature, b"x" * 64, ec.ECDSA(hashes.SHA256())), 3000)
        * 1e6
    )
    print(f"ECDSA P-256 verify (an assertion's floor): {ecdsa_us:.1f} us")
    print(f"metrics per job: {metrics_us:.1f} us ({metrics_us / ecdsa_us:.2f} x the floor)")
    for name, cost in log_us.items():
        print(f"verdict line, {name}: {cost:.1f} us per job ({cost / ecdsa_us:.2f} x the floor)")

    admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    name = f"bench_purge_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        engine = create_store_engine(str(admin.url.set(database=name)))
        upgrade(engine)
        expired = now - timedelta(days=2)
        rows = [
            {
                "digest": hashlib.sha256(str(n).encode()).digest(),
                "purpose": "assertion",
                "key_id": None,
                "issued_at": expired,
                "expires_at": expired + timedelta(minutes=5),
            }
            for n in range(args.rows)
        ]
        with engine.begin() as conn:
            conn.execute(insert(Challenge), rows)
        cutoffs = Cutoffs.at(
            now,
            challenge_grace=timedelta(hours=1),
            verdict_retention=timedelta(days=30),
            idempotency_ttl=timedelta(days=1),
        )
        started = time.perf_counter()
        done = purge(session_factory(engine), cutoffs, batch_size=1000)
        elapsed = time.perf_counter() - started
        print(
            f"purge: {done.challenges} expired challenges in {elapsed:.2f} s "
            f"({done.challenges / elapsed:,.0f} rows/s, 1,000 per transaction)"
        )
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()

"""Throughput of ``appattest reverify``: through Celery workers, in one process, and the core.

What it does, in one run:

1. creates a fresh PostgreSQL database on the server of ``--pg-url`` and migrates it;
2. stores N generated keys: devices minted under a throwaway test CA (``tests.factory``), each
   attestation verified once in this process with ``verify_attestation``, exactly as the
   service does at registration, and the rows the service would store bulk-inserted (half are
   production keys of one app, half development keys of another, registered at instants
   spread over a day);
3. measures the core: ``verify_attestation`` on every stored attestation, as re-verification
   calls it (stored object, keyId, clientDataHash, as of the stored instant), in this single
   process with a warm intermediate cache, several passes, median;
4. measures ``appattest reverify --local`` (a subprocess, no worker running);
5. takes a pair of Redis databases for the broker and the result backend, flushed: by default
   a free pair leased as the test suite leases them (``tests.stack``), so that a benchmark never
   empties the queue of a test session running beside it, or the pair ``--redis-dbs`` names;
   starts two ``appattest worker --concurrency 1`` and measures ``appattest reverify``
   distributed over them, then does the same with one ``appattest worker --concurrency 2``;
6. prints a table and the results as JSON, and drops the database.

Every run covers all N keys under the policy they were registered with, and must report all of
them accepted, so a broken verifier cannot pass fast rejections off as throughput. Two rates
are given for each command: the run phase, from the run's creation to the last key's decision
as recorded in the store (what the workers achieve; no interpreter start-up, no report), and
the whole command by the wall clock. With two CPUs, the ideal for the distributed run is about
twice the core's single-process rate, less the coordination (queue, store round trips).

Run it from the repository root, with PostgreSQL and Redis running (the Redis server is
``APPATTEST_TEST_REDIS_URL``, by default ``redis://127.0.0.1:6379``, as for the tests)::

    python bench/reverify.py --quick          # 1,000 keys, about half a minute
    python bench/reverify.py                  # 10,000 keys, about three minutes
    python bench/reverify.py --json out.json  # also write the results as JSON

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import Engine, func, insert, select  # noqa: E402

from tests.factory import APP_ID, Device, TestCA, client_data_hash  # noqa: E402
from tests.stack import (  # noqa: E402
    REDIS_URL,
    Stack,
    flush_redis,
    fresh_database,
    leased_redis_pair,
    server_versions,
)
from worker.core import IntermediateCache, Policy, TrustStore, verify_attestation  # noqa: E402
from worker.settings import load_settings  # noqa: E402
from worker.store.db import create_store_engine, upgrade  # noqa: E402
from worker.store.models import DeviceKey, ReverifyResult, ReverifyRun  # noqa: E402

DEV_APP_ID = "TEAMID1234.com.example.devapp"
DEFAULT_PG_URL = os.environ.get(
    "APPATTEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REGISTERED_FROM = datetime(2026, 11, 1, tzinfo=UTC)
INSERT_CHUNK = 1000
COMMAND_TIMEOUT = 1800


@dataclass
class Measurement:
    """One measured way of re-verifying every stored key, over several rounds."""

    key: str
    label: str
    keys: int
    run_seconds: list[float] = field(default_factory=list)
    command_seconds: list[float] = field(default_factory=list)

    @property
    def run_rate(self) -> float:
        """Keys per second of the median round."""
        return self.keys / statistics.median(self.run_seconds)

    @property
    def run_rates(self) -> list[float]:
        return [self.keys / seconds for seconds in self.run_seconds]

    @property
    def command_rate(self) -> float | None:
        if not self.command_seconds:
            return None
        return self.keys / statistics.median(self.command_seconds)


# --- the store -----------------------------------------------------------------------------------


def registration_policy(ca: TestCA) -> Policy:
    return Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem),
        production_apps=[APP_ID],
        development_apps=[DEV_APP_ID],
    )


def store_keys(engine: Engine, ca: TestCA, count: int) -> None:
    """Mint ``count`` devices, verify each attestation as the service does, and bulk-insert the
    rows the service would store for them."""
    policy = registration_policy(ca)
    cache = IntermediateCache()
    step = timedelta(days=1) / count
    rows: list[dict[str, Any]] = []
    for index in range(count):
        production = index % 2 == 0
        device = Device(
            ca=ca,
            app_id=APP_ID if production else DEV_APP_ID,
            environment="production" if production else "development",
        )
        at = REGISTERED_FROM + index * step
        cdh = client_data_hash(f"bench registration {index}")
        token = device.attestation_object(cdh, now=at)
        verified = verify_attestation(
            attestation_object=token,
            key_id=device.key_id,
            client_data_hash=cdh,
            policy=policy,
            now=at,
            cache=cache,
        )
        rows.append(
            {
                "key_id": device.key_id_b64,
                "app_id": verified.app_id,
                "environment": verified.environment.value,
                "public_key": verified.public_key,
                "counter": 0,
                "receipt": verified.receipt,
                "attestation": token,
                "client_data_hash": cdh,
                "verified_at": at,
                "leaf_fingerprint": verified.leaf_fingerprint,
                "intermediate_fingerprint": verified.intermediate_fingerprint,
            }
        )
        if len(rows) == INSERT_CHUNK or index == count - 1:
            with engine.begin() as conn:
                conn.execute(insert(DeviceKey), rows)
            rows = []


# --- the core ------------------------------------------------------------------------------------


def measure_core(engine: Engine, ca: TestCA, rounds: int) -> Measurement:
    """``verify_attestation`` on every stored attestation, as re-verification calls it: one
    process, a cache warmed by one call; one pass per round."""
    with engine.connect() as conn:
        stored = conn.execute(
            select(
                DeviceKey.attestation,
                DeviceKey.key_id,
                DeviceKey.client_data_hash,
                DeviceKey.verified_at,
            )
        ).all()
    policy = registration_policy(ca)
    cache = IntermediateCache()
    items: list[tuple[bytes, str, bytes, datetime]] = []
    for obj, key_id, cdh, at in stored:
        if cdh is None:  # every key this benchmark stores keeps its clientDataHash
            raise RuntimeError(f"key {key_id} has no clientDataHash")
        items.append((obj, key_id, cdh, at))

    def one_pass() -> float:
        start = time.perf_counter()
        for obj, key_id, cdh, at in items:
            verify_attestation(
                attestation_object=obj,
                key_id=base64.b64decode(key_id, validate=True),
                client_data_hash=cdh,
                policy=policy,
                now=at,
                cache=cache,
            )
        return time.perf_counter() - start

    first = items[0]
    verify_attestation(
        attestation_object=first[0],
        key_id=base64.b64decode(first[1]),
        client_data_hash=first[2],
        policy=policy,
        now=first[3],
        cache=cache,
    )
    return Measurement(
        key="core",
        label="core verify_attestation, 1 process",
        keys=len(items),
        run_seconds=[one_pass() for _ in range(rounds)],
    )


# --- the command ---------------------------------------------------------------------------------


def run_reverify(
    engine: Engine, env: dict[str, str], workdir: Path, measurement: Measurement, args: list[str]
) -> None:
    """Run ``appattest reverify`` on every stored key (a new run), check that it accepted them
    all, and add its times to ``measurement``."""
    key = measurement.key
    run_id = f"bench-{key}-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "worker.cli.commands", "reverify", "--run-id", run_id, *args]
    start = time.perf_counter()
    proc = subprocess.run(
        command,
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stderr}")
    with engine.connect() as conn:
        keys = conn.scalar(select(func.count()).select_from(DeviceKey)) or 0
        created = conn.scalar(select(ReverifyRun.created_at).where(ReverifyRun.run_id == run_id))
        last, accepted = conn.execute(
            select(
                func.max(ReverifyResult.decided_at),
                func.count().filter(ReverifyResult.ok.is_(True)),
            ).where(ReverifyResult.run_id == run_id, ReverifyResult.status == "done")
        ).one()
    if accepted != keys or created is None or last is None:
        raise RuntimeError(f"run {run_id} accepted {accepted} of {keys} keys:\n{proc.stderr}")
    measurement.keys = keys
    measurement.run_seconds.append((last - created).total_seconds())
    measurement.command_seconds.append(elapsed)


@contextmanager
def redis_pair(dbs: tuple[int, int] | None, *, flush: bool) -> Iterator[tuple[int, int]]:
    """The given (broker, results) Redis databases, flushed unless told otherwise, or a free
    pair leased (and flushed) as the test suite does."""
    if dbs is None:
        with leased_redis_pair() as pair:
            yield pair
        return
    if flush:
        flush_redis(*dbs)
    yield dbs


def make_stack(store_url: str, dbs: tuple[int, int], root: Path, workdir: Path) -> Stack:
    """Settings and environment for the worker processes and the commands, as tests/stack.py
    builds them."""
    broker_url = f"{REDIS_URL}/{dbs[0]}"
    result_backend = f"{REDIS_URL}/{dbs[1]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")},
        "APPATTEST_STORE_URL": store_url,
        "APPATTEST_BROKER_URL": broker_url,
        "APPATTEST_RESULT_BACKEND": result_backend,
        "APPATTEST_APP_IDS": APP_ID,
        "APPATTEST_DEV_APP_IDS": DEV_APP_ID,
        "APPATTEST_ROOT_CA": str(root),
        "APPATTEST_TASK_MAX_RETRIES": "3",
        "APPATTEST_TASK_RETRY_BACKOFF_MAX": "2",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        ),
    }
    settings = load_settings(
        store_url=store_url,
        broker_url=broker_url,
        result_backend=result_backend,
        app_ids=[APP_ID],
        dev_app_ids=[DEV_APP_ID],
        root_ca=root,
        task_max_retries=3,
        task_retry_backoff_max=2,
    )
    return Stack(env=env, settings=settings, workdir=workdir)


def measure_distributed(
    stack: Stack,
    engine: Engine,
    workdir: Path,
    *,
    key: str,
    label: str,
    workers: list[int],
    batch: int,
    rounds: int,
) -> Measurement:
    """Start workers with these concurrencies, run the distributed command ``rounds`` times,
    stop them."""
    measurement = Measurement(key=key, label=label, keys=0)
    try:
        for index, concurrency in enumerate(workers):
            stack.start_worker(concurrency=concurrency, name=f"{key}{index}")
        for _ in range(rounds):
            args = ["--batch-size", str(batch), "--stall-timeout", "120"]
            run_reverify(engine, stack.env, workdir, measurement, args)
    finally:
        stack.stop_workers()
    return measurement


# --- report --------------------------------------------------------------------------------------


def results(
    args: argparse.Namespace,
    mode: str,
    rows: list[Measurement],
    setup: dict[str, float],
    server_versions: dict[str, str],
) -> dict[str, Any]:
    """Everything measured, as a JSON-ready dictionary."""
    core = next(row for row in rows if row.key == "core").run_rate
    out_rows = []
    for row in rows:
        entry: dict[str, Any] = {
            "key": row.key,
            "label": row.label,
            "keys": row.keys,
            "keys_per_s": round(row.run_rate, 1),
            "keys_per_s_min": round(min(row.run_rates), 1),
            "keys_per_s_max": round(max(row.run_rates), 1),
            "keys_per_s_rounds": [round(rate, 1) for rate in row.run_rates],
            "over_core": round(row.run_rate / core, 3),
            "run_seconds_median": round(statistics.median(row.run_seconds), 3),
        }
        if row.command_seconds:
            entry["command_seconds_median"] = round(statistics.median(row.command_seconds), 3)
            entry["command_keys_per_s"] = round(row.command_rate or 0.0, 1)
        out_rows.append(entry)
    return {
        "benchmark": "bench/reverify.py",
        "mode": mode,
        "keys": args.keys,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            # Other work on the machine skews every rate; the load averages tell when it did.
            "load_average_at_start": args.load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            **server_versions,
        },
        "rows": out_rows,
        "ratios": {
            f"{row.key}_over_core": round(row.run_rate / core, 3)
            for row in rows
            if row.key != "core"
        },
        "setup_seconds": {k: round(v, 2) for k, v in setup.items()},
    }


def table(data: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    env = data["environment"]
    lines = [
        f"reverify benchmark ({data['mode']}): {data['keys']:,} keys, {data['rounds']} rounds, "
        f"batch size {data['batch_size']}, {env['cpus']} CPUs, Python {env['python']}, "
        f"PostgreSQL {env['postgresql']}, Redis {env['redis']}",
        f"load average (1, 5, 15 min) at start {env['load_average_at_start']}, "
        f"at end {env['load_average_at_end']}",
        "",
        f"{'mode':<38}{'keys/s':>8}{'min':>7}{'max':>7}{'x core':>8}{'run s':>8}"
        f"{'cmd s':>8}{'cmd keys/s':>11}",
    ]
    lines.append("-" * len(lines[-1]))
    for row in data["rows"]:
        command = f"{row['command_seconds_median']:.2f}" if "command_keys_per_s" in row else "-"
        command_rate = f"{row['command_keys_per_s']:.0f}" if "command_keys_per_s" in row else "-"
        lines.append(
            f"{row['label']:<38}{row['keys_per_s']:>8.0f}{row['keys_per_s_min']:>7.0f}"
            f"{row['keys_per_s_max']:>7.0f}{row['over_core']:>8.2f}"
            f"{row['run_seconds_median']:>8.2f}{command:>8}{command_rate:>11}"
        )
    lines += [
        "",
        "keys/s: median round of the run phase (run created -> last decision in the store; for",
        "the core, one pass over the stored attestations). cmd: the whole subprocess by the",
        "wall clock (start-up, snapshot of the run, work, polling, reports). x core: the rate",
        "over the core's single-process rate; with "
        f"{env['cpus']} CPUs the distributed ideal is about {env['cpus']}x,",
        "less the coordination (queue, store round trips; PostgreSQL shares the CPUs).",
        "setup: " + ", ".join(f"{k} {v} s" for k, v in data["setup_seconds"].items()),
    ]
    return "\n".join(lines)


def _db_pair(value: str) -> tuple[int, int]:
    broker, _, results = value.partition(",")
    try:
        return int(broker), int(results)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected two database numbers, e.g. 12,13") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1,000 keys unless --keys is given")
    parser.add_argument("--keys", type=int, help="stored keys (default 10,000)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server (admin URL)")
    parser.add_argument(
        "--redis-dbs",
        type=_db_pair,
        metavar="BROKER,RESULTS",
        help="use these Redis databases (e.g. 12,13) instead of leasing a free pair",
    )
    parser.add_argument(
        "--no-flush", action="store_true", help="with --redis-dbs: do not flush them first"
    )
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument(
        "--rounds", type=int, default=3, help="measure each mode this many times (median)"
    )
    parser.add_argument(
        "--single-config",
        action="store_true",
        help="measure only 2 workers x concurrency 1, not also 1 worker x concurrency 2",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.load_at_start = [round(x, 2) for x in os.getloadavg()]
    args.keys = args.keys or (1000 if args.quick else 10_000)
    if args.keys < 1 or args.rounds < 1:
        parser.error("--keys and --rounds must be positive")

    setup: dict[str, float] = {}
    rows: list[Measurement] = []
    with (
        tempfile.TemporaryDirectory(prefix="appattest-bench-") as tmp,
        fresh_database(args.pg_url, "appattest_bench") as store_url,
    ):
        workdir = Path(tmp)
        engine = create_store_engine(store_url)
        try:
            start = time.perf_counter()
            upgrade(engine)
            ca = TestCA.create()
            root = workdir / "root.pem"
            root.write_bytes(ca.root_pem)
            store_keys(engine, ca, args.keys)
            setup["store_keys"] = time.perf_counter() - start
            versions = server_versions(engine)

            print(f"measuring the core on {args.keys:,} stored keys...", file=sys.stderr)
            rows.append(measure_core(engine, ca, args.rounds))
            with redis_pair(args.redis_dbs, flush=not args.no_flush) as dbs:
                stack = make_stack(store_url, dbs, root, workdir)
                print("measuring reverify --local...", file=sys.stderr)
                local = Measurement(key="local", label="reverify --local", keys=0)
                for _ in range(args.rounds):
                    args_local = ["--local", "--batch-size", str(args.batch_size)]
                    run_reverify(engine, stack.env, workdir, local, args_local)
                rows.append(local)
                configs = [("distributed_2x1", "reverify, 2 workers x concurrency 1", [1, 1])]
                if not args.single_config:
                    configs.append(("distributed_1x2", "reverify, 1 worker x concurrency 2", [2]))
                for key, label, workers in configs:
                    print(f"measuring {label} (Redis dbs {dbs})...", file=sys.stderr)
                    start = time.perf_counter()
                    rows.append(
                        measure_distributed(
                            stack,
                            engine,
                            workdir,
                            key=key,
                            label=label,
                            workers=workers,
                            batch=args.batch_size,
                            rounds=args.rounds,
                        )
                    )
                    setup[f"{key}_all_rounds_with_worker_start"] = time.perf_counter() - start
        finally:
            engine.dispose()

    data = results(args, mode, rows, setup, versions)
    print(table(data))
    print()
    print(json.dumps(data, indent=2))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

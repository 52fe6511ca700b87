"""Where a batch's time goes in the verification service, in one process, on PostgreSQL.

What it does, in one run:

1. creates a fresh PostgreSQL database on the server of ``--pg-url`` and migrates it;
2. mints devices under a throwaway test CA (``tests.factory``), issues their challenges in the
   store, and decides their registrations and then rounds of assertions with
   ``VerificationService.handle_batch`` (issued challenges required, as the workers run it), in
   batches of ``--batch`` jobs, each body checked against the contract first as the worker's
   task does;
3. times each stage of every batch with ``time.perf_counter`` (wall time, so the database's
   share is inside the store stages): the reads (recorded verdicts, challenges, keys, and the
   decoding of each job), the checks (signatures included), the claims of challenges, the key
   inserts, the counter updates and the verdict rows; the commit is what the attempt took
   beyond them;
4. prints microseconds per job for each stage and kind, and the same as JSON.

Every job must be accepted, so a broken verifier cannot pass fast rejections off as speed.
Run it from the repository root with PostgreSQL running::

    python bench/service.py --quick           # 400 devices, a few seconds
    python bench/service.py                   # 2,000 devices, 5 assertions each
    python bench/service.py --json out.json   # also write the results as JSON

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.factory import APP_ID, Device, TestCA  # noqa: E402
from tests.stack import fresh_database  # noqa: E402
from worker.contract import parse_request  # noqa: E402
from worker.core import IntermediateCache, Policy, TrustStore  # noqa: E402
from worker.service import VerificationService, verification  # noqa: E402
from worker.store.challenges import Purpose, new_challenge, store_challenges  # noqa: E402
from worker.store.db import create_store_engine, session_factory, upgrade  # noqa: E402

STAGES = (
    "_read",
    "_check",
    "_consume_challenges",
    "_insert_keys",
    "_advance_counters",
    "_record",
)
DEFAULT_PG_URL = os.environ.get(
    "APPATTEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def timed_stages(totals: dict[str, float]) -> Iterator[None]:
    """Accumulate the wall time of each stage method (and of whole attempts) into ``totals``."""
    cls = verification.VerificationService
    originals = {name: getattr(cls, name) for name in (*STAGES, "_attempt")}

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - started

        return timed

    for name, method in originals.items():
        setattr(cls, name, wrap(name, method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(cls, name, method)


def run(pg_url: str, devices_count: int, rounds: int, batch: int) -> dict[str, Any]:
    ca = TestCA.create()
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    results: dict[str, Any] = {}
    with fresh_database(pg_url, "appattest_bench") as url:
        engine = create_store_engine(url)
        upgrade(engine)
        sessions = session_factory(engine)
        service = VerificationService(
            policy=policy, sessions=sessions, cache=IntermediateCache(), issued_challenges=True
        )
        now = datetime.now(UTC)
        devices = [Device(ca) for _ in range(devices_count)]

        def issue(purpose: Purpose, bound: bool) -> list[str]:
            issued = [
                new_challenge(
                    purpose=purpose,
                    key_id=d.key_id_b64 if bound else None,
                    ttl=timedelta(hours=1),
                    now=now,
                )
                for d in devices
            ]
            with sessions() as session, session.begin():
                store_challenges(session, issued)
            return [i.challenge for i in issued]

        def decide(kind: str, bodies: list[dict[str, str]]) -> None:
            totals: dict[str, float] = {}
            started = time.perf_counter()
            with timed_stages(totals):
                for start in range(0, len(bodies), batch):
                    chunk = bodies[start : start + batch]
                    items = [(str(uuid.uuid4()), parse_request(body)) for body in chunk]
                    verdicts = [v.to_json_dict() for v in service.handle_batch(items)]
                    refused = [v for v in verdicts if not v["ok"]]
                    if refused:
                        raise SystemExit(f"{kind}: {len(refused)} refused, e.g. {refused[0]}")
            elapsed = time.perf_counter() - started
            jobs = len(bodies)
            per_job = {name: round(totals.get(name, 0.0) / jobs * 1e6, 1) for name in STAGES}
            per_job["commit and the rest of the attempt"] = round(
                (totals["_attempt"] - sum(totals.get(name, 0.0) for name in STAGES)) / jobs * 1e6,
                1,
            )
            per_job["contract check, verdict JSON, outside the service"] = round(
                (elapsed - totals["_attempt"]) / jobs * 1e6, 1
            )
            results[kind] = {
                "jobs": jobs,
                "us_per_job": per_job,
                "total_us_per_job": round(elapsed / jobs * 1e6, 1),
            }

        registrations = [
            d.registration_body(c, now=now)
            for d, c in zip(devices, issue(Purpose.REGISTRATION, False), strict=True)
        ]
        decide("registration", registrations)
        assertions: list[dict[str, str]] = []
        for _ in range(rounds):
            assertions += [
                d.assertion_body(c)
                for d, c in zip(devices, issue(Purpose.ASSERTION, True), strict=True)
            ]
        decide("assertion", assertions)
        engine.dispose()
    return results


def table(results: dict[str, Any], batch: int) -> str:
    kinds = list(results)
    names = list(results[kinds[0]]["us_per_job"])
    lines = [
        f"service stages, wall microseconds per job (batches of {batch}, PostgreSQL)",
        f"{'stage':<52}" + "".join(f"{kind:>14}" for kind in kinds),
        "-" * (52 + 14 * len(kinds)),
    ]
    for name in names:
        cells = "".join(f"{results[kind]['us_per_job'][name]:>14.1f}" for kind in kinds)
        lines.append(f"{name.lstrip('_'):<52}{cells}")
    total = "".join(f"{results[kind]['total_us_per_job']:>14.1f}" for kind in kinds)
    lines.append(f"{'total':<52}{total}")
    jobs = "".join(f"{results[kind]['jobs']:>14}" for kind in kinds)
    lines.append(f"{'jobs':<52}{jobs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="400 devices, 2 assertions each")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server (admin URL)")
    parser.add_argument("--batch", type=int, default=200, help="jobs per batch (default 200)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    devices, rounds = (400, 2) if args.quick else (2000, 5)
    results = run(args.pg_url, devices, rounds, args.batch)
    print(table(results, args.batch))
    document = json.dumps({"benchmark": "bench/service.py", "batch": args.batch, **results})
    print(document)
    if args.json:
        args.json.write_text(document + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

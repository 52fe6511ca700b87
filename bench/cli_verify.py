"""`appattest verify FILE` against the bare ECDSA floor: registrations and assertions per second.

What it measures, in one run: the command (``appattest verify FILE --store URL --app-id ...
--root-ca ... --at ...``, its click entry point called in this process, output to a file) on a
file of registrations of distinct fake devices, then on a file of assertions of those devices
(counters increasing, devices interleaved) against the store the first file filled; once on
SQLite (the default store) and, with ``--pg-url``, once on a fresh PostgreSQL database. Every
output line is checked (each registration and assertion must be accepted), so a broken
command cannot report a fast rejection.

A rate excludes the command's fixed start-up (policy, engine and schema check; the imports are
done once for the process): each file is timed against the same command on an empty file on
the same store just before, and the rate is lines / (time of the file - time of the empty
file). The ratio divides by the bare P-384 (registrations) or P-256 (assertions) rate of
``bench/core.py``'s floor calls, measured for 0.3 s just before and just after each file
(the mean of the two), since a shared machine's load drifts within seconds.

Run it from the repository root::

    python bench/cli_verify.py            # 600 registrations, 3,000 assertions
    python bench/cli_verify.py --quick    # 200 registrations, 1,000 assertions
    python bench/cli_verify.py --profile  # also a cProfile of each file, top functions

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.factory import APP_ID, Device, TestCA  # noqa: E402

DEFAULT_PG_URL = os.environ.get(
    "APPATTEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class Sizes:
    registrations: int
    assertions: int


FULL = Sizes(registrations=600, assertions=3000)
QUICK = Sizes(registrations=200, assertions=1000)


@dataclass
class Workload:
    root_pem: bytes
    at: datetime
    registrations: bytes
    assertions: bytes
    sizes: Sizes


def mint(sizes: Sizes) -> Workload:
    """Registrations of distinct devices, then assertions of them round-robin."""
    at = datetime.now(UTC)
    ca = TestCA.create()
    devices = [Device(ca=ca) for _ in range(sizes.registrations)]
    registrations = [d.registration_body(f"cli bench {i}", now=at) for i, d in enumerate(devices)]
    assertions = [
        devices[i % len(devices)].assertion_body(f"cli bench payload {i}")
        for i in range(sizes.assertions)
    ]
    return Workload(
        root_pem=ca.root_pem,
        at=at,
        registrations=_jsonl(registrations),
        assertions=_jsonl(assertions),
        sizes=sizes,
    )


def _jsonl(bodies: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(b) + "\n" for b in bodies).encode()


def _run(
    directory: Path, name: str, data: bytes, store_url: str, workload: Workload, profile: bool
) -> tuple[float, list[dict[str, Any]], str]:
    """Run the command on ``data`` in this process (its imports done, as after start-up); return
    its wall time, its output lines and, with ``profile``, a cProfile summary."""
    import cProfile
    import io
    import pstats

    from worker.cli.commands import main as cli

    source = directory / f"{name}.jsonl"
    source.write_bytes(data)
    root = directory / "root.pem"
    root.write_bytes(workload.root_pem)
    args = ["verify", str(source), "--store", store_url, "--app-id", APP_ID]
    args += ["--root-ca", str(root), "--at", workload.at.isoformat()]
    target = directory / f"{name}.out"
    profiler = cProfile.Profile() if profile else None
    saved_out, saved_err = sys.stdout, sys.stderr
    with target.open("w") as out, open(os.devnull, "w") as err:
        sys.stdout, sys.stderr = out, err
        code: Any = 0
        start = time.perf_counter()
        try:
            if profiler is not None:
                profiler.enable()
            cli.main(args=args, prog_name="appattest", standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
        finally:
            if profiler is not None:
                profiler.disable()
            wall = time.perf_counter() - start
            sys.stdout, sys.stderr = saved_out, saved_err
    if code not in (0, None):
        raise RuntimeError(f"appattest verify exited {code}")
    out_lines = [json.loads(line) for line in target.read_text().splitlines()]
    shown = ""
    if profiler is not None:
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        buffer.write(_categories(stats) + "\n")
        stats.sort_stats("tottime").print_stats(15)
        shown = buffer.getvalue()
    return wall, out_lines, shown


# Where a function's own time goes, by the first pattern its file or name matches.
_CATEGORIES = (
    ("signature checks (OpenSSL: ECDSA verify, X.509 path)", ("'verify' of",)),
    ("store (SQLAlchemy, sqlite3, psycopg)", ("sqlalchemy", "sqlite3", "psycopg", "alembic")),
    ("core parsing (CBOR, certificates, authData)", ("worker/core", "cbor2", "cryptography")),
    (
        "contract and JSON (pydantic, json, line parsing)",
        ("pydantic", "/json/", "appattest_client", "worker/lines", "worker/contract", "binascii"),
    ),
    ("service and command", ("worker/service", "worker/cli", "click")),
)


def _categories(stats: Any) -> str:
    """The profile's own time per category, in percent of the total."""
    totals: dict[str, float] = {}
    for (filename, _, name), (_, _, own, _, _) in stats.stats.items():
        where = f"{filename} {name}"
        label = next(
            (c for c, patterns in _CATEGORIES if any(p in where for p in patterns)), "other"
        )
        totals[label] = totals.get(label, 0.0) + own
    whole = sum(totals.values()) or 1.0
    return "\n".join(
        f"  {100 * t / whole:5.1f} %  {label}"
        for label, t in sorted(totals.items(), key=lambda item: -item[1])
    )


def _check(out: list[dict[str, Any]], expected: int, kind: str) -> int:
    """The number of wrong verdicts: every line must be an accepted ``kind``."""
    wrong = sum(1 for r in out if not (r.get("ok") is True and r.get("kind") == kind))
    return wrong + abs(expected - len(out))


def _floor_rate(calls: list[Callable[[], object]], seconds: float = 0.3) -> float:
    """Bare verifications per second over ``seconds``."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for call in calls:
            call()
        done += len(calls)
    return done / elapsed


def measure_store(store_url: str, workload: Workload, *, profile: bool = False) -> dict[str, Any]:
    """Registrations then assertions on one empty store; rates net of start-up, each beside
    the bare floor rate measured just before and just after it."""
    import core
    from cryptography.hazmat.primitives.asymmetric import ec

    floors = {"p384": core._floor_calls(ec.SECP384R1()), "p256": core._floor_calls(ec.SECP256R1())}
    sizes = workload.sizes
    result: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cli-bench-") as tmp:
        directory = Path(tmp)
        for kind, data, lines, floor in (
            ("registrations", workload.registrations, sizes.registrations, "p384"),
            ("assertions", workload.assertions, sizes.assertions, "p256"),
        ):
            empty = [_run(directory, "empty", b"", store_url, workload, False)[0] for _ in "ab"]
            before = _floor_rate(floors[floor])
            wall, out, shown = _run(directory, kind, data, store_url, workload, profile)
            after = _floor_rate(floors[floor])
            startup = min(empty)
            floor_rate = (before + after) / 2
            rate = lines / max(wall - startup, 1e-9)
            result[kind] = {
                "lines": lines,
                "wall_s": round(wall, 3),
                "startup_s": round(startup, 3),
                "per_s": rate,
                "floor": floor,
                "floor_per_s": floor_rate,
                "over_floor": rate / floor_rate,
                "wrong": _check(out, lines, kind[:-1]),
            }
            profiles[kind] = shown
    if profile:
        result["profiles"] = profiles
    return result


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one measurement, dropped on the way out."""
    name = f"cli_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_cli(*, quick: bool, pg_url: str | None, profile: bool = False) -> dict[str, Any]:
    """Both stores; rates, ratios to the bare floor and correctness."""
    sizes = QUICK if quick else FULL
    workload = mint(sizes)
    data: dict[str, Any] = {
        "sizes": {"registrations": sizes.registrations, "assertions": sizes.assertions},
        "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="cli-bench-store-") as tmp:
        sqlite_url = f"sqlite:///{Path(tmp) / 'keys.db'}"
        data["stores"]["sqlite"] = measure_store(sqlite_url, workload, profile=profile)
    if pg_url:
        with postgres_database(pg_url) as url:
            data["stores"]["postgresql"] = measure_store(url, workload, profile=profile)
    return data


def rows(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, measurement) per store and kind."""
    return [
        (f"appattest verify ({store}), {kind}", measured[kind])
        for store, measured in data["stores"].items()
        for kind in ("registrations", "assertions")
    ]


def table(data: dict[str, Any]) -> str:
    lines = [
        f"{'row':<44}{'lines':>7}{'lines/s':>9}{'floor/s':>9}{'x floor':>9}  wrong",
        "-" * 85,
    ]
    for label, m in rows(data):
        lines.append(
            f"{label:<44}{m['lines']:>7}{m['per_s']:>9.0f}{m['floor_per_s']:>9.0f}"
            f"{m['over_floor']:>9.3f}  {m['wrong']}"
        )
    lines.append(
        "x floor: lines/s over the bare P-384 (registrations) or P-256 (assertions) rate measured "
        "just before and after the file; lines/s net of the command's start-up (an empty file)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL admin URL; '' skips")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    data = run_cli(quick=args.quick, pg_url=args.pg_url or None, profile=args.profile)
    if args.profile:
        for store, measured in data["stores"].items():
            for kind, shown in measured.pop("profiles").items():  # type: ignore[union-attr]
                print(f"== profile: {store}, {kind} ==\n{shown}")
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

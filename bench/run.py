"""Every benchmark in one run: the ECDSA floor, the core, a peer library, end to end, scaling,
memory and the embedded default, printed as one table and as JSON.

Sections, all measured in this one process tree and run:

* floor and core (``bench/core.py``, imported): bare ``cryptography`` P-384 and P-256
  verifications per second, ``verify_attestation`` (intermediate cache on and off) and
  ``verify_assertion`` per second in one process, and their ratios to the floor, from
  interleaved rounds (median of per-round ratios);
* peer: ``pyattest`` (the ``bench`` extra: ``pip install -e '.[bench]'``) verifying the very
  attestation objects of the core's attestation rows, under the same test root (pyattest's
  ``AppleConfig(root_ca=...)`` accepts a replacement root), measured as one more interleaved
  row; the ratio of the core (cache on) to it. Without pyattest the row says why;
* end to end (``bench/e2e.py``, imported): bursts of registrations then assertions through the
  HTTP API (bulk and single submissions) and through ``AsyncAppAttestClient`` to 2 workers on
  Redis and PostgreSQL; jobs/s, latency percentiles, verdicts checked, and the ratio to the
  in-process core rate on the same cores (2 x the single-process rates of the core section);
  1 worker against 2; worker RSS as jobs accumulate; ``appattest serve`` for reference;
* the caller's path (``bench/caller.py``, rows of the end-to-end section): challenge issuance
  by 32 callers, a device's whole flow (challenge, then its assertion with ``?wait``) by 64
  callers, and latency at a light load of 20 assertions/s, on Redis + PostgreSQL and on
  ``appattest serve``;
* ``appattest verify FILE`` (``bench/cli_verify.py``, imported): registrations and assertions
  per line on SQLite and PostgreSQL, over the bare P-384 and P-256 rates measured beside them;
* the targets, the caller's-path ones included, each marked met or missed from this run.

Run it from the repository root, with PostgreSQL and Redis running::

    python bench/run.py --quick          # under 2 minutes
    python bench/run.py                  # under 15 minutes
    python bench/run.py --json out.json  # also write the results as JSON

This is a benchmark, not a test: it asserts nothing about speed. The targets it prints are
the ones the project set itself; "met" compares ratios measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_verify
import core
import e2e
from cryptography.hazmat.primitives.serialization import Encoding

from tests.factory import APP_ID

TARGETS = {
    "attestation_over_p384": 0.90,
    "assertion_over_p256": 0.75,
    "attestation_over_pyattest": 10.0,
    "e2e_registrations_over_in_process": 0.70,
    "e2e_assertions_over_in_process": 0.50,
    "workers_2_over_1": 1.8,
    "rss_growth_max": 1.10,
}
# The caller's path: one device request at a time, the offline command. Ratios to 2 x the
# in-process core rate, except the command's (to the bare ECDSA floor); CPU in ms per job.
CALLER_TARGETS = {
    "single_registrations_over_in_process": 0.35,
    "single_assertions_over_in_process": 0.12,
    "bulk_registrations_over_in_process": 0.6,
    "bulk_assertions_over_in_process": 0.3,
    "challenges_per_s": 1500.0,
    "challenge_api_cpu_ms_max": 0.4,
    "device_flow_over_in_process": 0.08,
    "single_api_cpu_ms_max": 0.5,
    "single_worker_cpu_ms_registration_max": 1.3,
    "single_worker_cpu_ms_assertion_max": 0.5,
    "light_p50_ms_max": 10.0,
    "light_p99_ms_max": 25.0,
    "embedded_light_p50_ms_max": 60.0,
    "cli_registrations_over_p384": 0.8,
    "cli_assertions_over_p256": 0.4,
}


# --- the peer ----------------------------------------------------------------------------------


def pyattest_row(attestation_row: core.Row) -> tuple[core.Row | None, dict[str, Any]]:
    """A row verifying the attestation row's own objects with pyattest, or None and why not.

    The core row's calls are ``partial(verify_attestation, ...)``; each carries the object,
    keyId, clientDataHash, policy and instant. pyattest takes the challenge itself (it hashes
    it), so the challenge is recovered from ``bench/core.py``'s naming and checked against the
    clientDataHash; the root comes from the policy's trust store. pyattest checks the chain
    with pyhanko-certvalidator at the wall clock; the objects are minted for now.
    """
    info: dict[str, Any] = {"library": "pyattest"}
    try:
        from importlib.metadata import version

        from pyattest.attestation import Attestation
        from pyattest.configs.apple import AppleConfig

        info["version"] = version("pyattest")
    except ImportError as exc:
        info["unavailable"] = f"not installed ({exc}); pip install -e '.[bench]'"
        return None, info

    loop = asyncio.new_event_loop()
    calls = []
    for index, call in enumerate(attestation_row.calls):
        if not isinstance(call, partial):
            info["unavailable"] = "the core's attestation calls are not partials"
            return None, info
        keywords = call.keywords
        challenge = f"bench challenge {index}".encode()
        if hashlib.sha256(challenge).digest() != keywords["client_data_hash"]:
            info["unavailable"] = "cannot recover the challenges of bench/core.py's attestations"
            return None, info
        root_pem = keywords["policy"].trust.roots[0].public_bytes(Encoding.PEM)
        config = AppleConfig(
            key_id=keywords["key_id"], app_id=APP_ID, production=True, root_ca=root_pem
        )
        calls.append(partial(_pyattest_verify, loop, Attestation, keywords, challenge, config))
    try:
        for call, item in zip(calls, attestation_row.calls, strict=True):
            verified = call()
            if not verified.verified:
                raise RuntimeError("pyattest did not mark the attestation verified")
            key_id = item.keywords["key_id"]  # type: ignore[attr-defined]
            if verified.data["certs"].leaf.public_key.sha256 != key_id:
                raise RuntimeError("pyattest verified a different key")
    except Exception as exc:
        info["unavailable"] = f"pyattest failed on a generated attestation: {exc!r}"
        return None, info
    info["inputs"] = (
        f"the {len(calls)} attestation objects of the core rows, test root as pyattest's "
        "root_ca, production, verified at the wall clock"
    )
    row = core.Row("pyattest", f"pyattest {info['version']} attestation", calls)
    row.floor = "p384_verify"
    return row, info


def _pyattest_verify(
    loop: asyncio.AbstractEventLoop,
    attestation: Any,
    keywords: dict[str, Any],
    challenge: bytes,
    config: Any,
) -> Any:
    item = attestation(keywords["attestation_object"], challenge, config)
    loop.run_until_complete(item.verify())
    return item


# --- machine -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = "?"
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        commit = head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


# --- the report --------------------------------------------------------------------------------


def verdicts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: the measured ratio, the target and whether it was met in this run."""
    out = []
    ratios = data["core"]["ratios"]

    def add(
        name: str,
        measured: float | None,
        target: float,
        *,
        at_most: bool = False,
        cpu: float | None = None,
    ) -> None:
        met = None if measured is None else (measured <= target if at_most else measured >= target)
        entry = {
            "target": name,
            "measured": measured,
            "wanted": target,
            "met": met,
            "at_most": at_most,
        }
        if cpu is not None:
            entry["cpu_normalized"] = cpu
        out.append(entry)

    add("core attestation / bare P-384", ratios["attestation_cache_on_over_p384"], 0.90)
    # The floor verifies with a loaded key, as the service does once its key cache holds the
    # device; the stored-point row (a device not seen before) is reported beside it.
    add("core assertion (loaded key) / bare P-256", ratios["assertion_key_over_p256"], 0.75)
    add("core assertion (stored point) / bare P-256", ratios["assertion_point_over_p256"], 0.75)
    add(
        "core attestation / pyattest",
        ratios.get("attestation_cache_on_over_pyattest"),
        TARGETS["attestation_over_pyattest"],
    )
    rows = {row["key"]: row for row in data.get("e2e", {}).get("rows", [])}
    for way in ("http_bulk", "http_status", "http_single", "python_client"):
        for kind, target in (
            ("registration", TARGETS["e2e_registrations_over_in_process"]),
            ("assertion", TARGETS["e2e_assertions_over_in_process"]),
        ):
            row = rows.get(f"{way}_{kind}")
            if row is not None:
                add(
                    f"e2e {way} {kind}s / in-process",
                    row.get("over_in_process"),
                    target,
                    cpu=row.get("over_in_process_cpu"),
                )
    for kind, target in (
        ("registration", TARGETS["e2e_registrations_over_in_process"]),
        ("assertion", TARGETS["e2e_assertions_over_in_process"]),
    ):
        # Bulk submission with decisions counted in the store (the scaling rounds with both
        # workers): what the service sustains when no client reads verdicts one by one.
        both = [rows[k] for k in rows if k.startswith("workers_2_") and k.endswith(kind)]
        if both:
            add(
                f"e2e bulk, 2 workers, {kind}s / in-process",
                sum(r["over_in_process"] for r in both) / len(both),
                target,
                cpu=sum(r["over_in_process_cpu"] for r in both) / len(both),
            )
    for kind, ratio in data.get("e2e", {}).get("scaling_2_over_1_workers", {}).items():
        add(f"2 workers / 1 worker, {kind}s", ratio, TARGETS["workers_2_over_1"])
    growth = data.get("e2e", {}).get("worker_rss", {}).get("growth_high_over_low")
    if growth is not None:
        add("worker RSS growth (late / early)", growth, TARGETS["rss_growth_max"], at_most=True)
    caller_targets(data, rows, add)
    wrong = sum(row["wrong"] + row["lost"] for row in rows.values())
    for store in data.get("cli", {}).get("stores", {}).values():
        wrong += store["registrations"]["wrong"] + store["assertions"]["wrong"]
    out.append(
        {
            "target": "every verdict correct",
            "measured": f"{wrong} wrong or lost",
            "wanted": 0,
            "met": wrong == 0,
        }
    )
    return out


def caller_targets(data: dict[str, Any], rows: dict[str, Any], add: Any) -> None:
    """The caller's-path targets: single submissions, challenges, the device flow, CPU per
    single job, latency at light load, bulk, and ``appattest verify``."""
    t = CALLER_TARGETS
    for kind, name in (("registration", "registrations"), ("assertion", "assertions")):
        row = rows.get(f"http_single_{kind}")
        if row is not None:
            add(
                f"single POST ?wait, 64 callers, {name} / in-process",
                row.get("over_in_process"),
                t[f"single_{name}_over_in_process"],
                cpu=row.get("over_in_process_cpu"),
            )
            cpu = row["cpu_ms_per_job"]
            add(
                f"single POST ?wait, API CPU ms per {kind}",
                cpu.get("api"),
                t["single_api_cpu_ms_max"],
                at_most=True,
            )
            add(
                f"single POST ?wait, worker CPU ms per {kind}",
                cpu.get("workers"),
                t[f"single_worker_cpu_ms_{kind}_max"],
                at_most=True,
            )
        both = [rows[k] for k in rows if k.startswith("workers_2_") and k.endswith(kind)]
        if both:
            add(
                f"bulk, 2 workers, {name} / in-process (caller's path)",
                sum(r["over_in_process"] for r in both) / len(both),
                t[f"bulk_{name}_over_in_process"],
            )
    row = rows.get("challenges")
    if row is not None:
        add("challenges/s, 32 callers", row["jobs_per_s"], t["challenges_per_s"])
        add(
            "API CPU ms per challenge",
            row["cpu_ms_per_job"].get("api"),
            t["challenge_api_cpu_ms_max"],
            at_most=True,
        )
    row = rows.get("device_flow")
    if row is not None:
        add(
            "device flow, 64 callers / in-process assertions",
            row.get("over_in_process"),
            t["device_flow_over_in_process"],
            cpu=row.get("over_in_process_cpu"),
        )
    row = rows.get("light_assertion")
    if row is not None:
        add(
            "light load 20/s, p50 ms (Redis + PostgreSQL)",
            row["latency_ms_p50"],
            t["light_p50_ms_max"],
            at_most=True,
        )
        add(
            "light load 20/s, p99 ms (Redis + PostgreSQL)",
            row["latency_ms_p99"],
            t["light_p99_ms_max"],
            at_most=True,
        )
    row = rows.get("embedded_light_assertion")
    if row is not None:
        add(
            "light load 20/s, p50 ms (embedded)",
            row["latency_ms_p50"],
            t["embedded_light_p50_ms_max"],
            at_most=True,
        )
    for store, measured in data.get("cli", {}).get("stores", {}).items():
        add(
            f"appattest verify ({store}), registrations / bare P-384",
            measured["registrations"]["over_floor"],
            t["cli_registrations_over_p384"],
        )
        add(
            f"appattest verify ({store}), assertions / bare P-256",
            measured["assertions"]["over_floor"],
            t["cli_assertions_over_p256"],
        )


def table(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"appattest benchmarks ({data['mode']}), {m['date']}, commit {m['commit']}: "
        f"{m['nproc']} x {m['cpu']}, "
        f"Python {m['python']}, cryptography {m['cryptography']}, {m['openssl']}, "
        f"load average at start {m['loadavg_at_start'][0]:.2f}",
        "",
        "== floor, core and peer (one process, interleaved rounds) ==",
        core.table(data["core"]),
    ]
    peer = data["peer"]
    if "unavailable" in peer:
        lines.append(f"  peer pyattest: unavailable: {peer['unavailable']}")
    else:
        ratio = data["core"]["ratios"]["attestation_cache_on_over_pyattest"]
        lines.append(
            f"  attestation, cache on  / pyattest     {ratio:.1f}  ({peer['library']} "
            f"{peer['version']} on {peer['inputs']})"
        )
    if "e2e" in data:
        e = data["e2e"]
        lines += [
            "",
            f"== end to end ({e['mode']}: {e['sizes']['registrations_per_row']:,} registrations "
            f"then {e['sizes']['assertions_per_row']:,} assertions per row; single POSTs "
            f"{e['sizes']['single_registrations']:,} + {e['sizes']['single_assertions']:,}; "
            "embedded "
            f"{e['sizes']['embedded_registrations']:,} + {e['sizes']['embedded_assertions']:,}); "
            f"PostgreSQL {e['environment'].get('postgresql')}, Redis "
            f"{e['environment'].get('redis')} ==",
            e2e.table(e),
        ]
    if "cli" in data:
        c = data["cli"]
        lines += [
            "",
            f"== appattest verify FILE ({c['sizes']['registrations']:,} registrations, then "
            f"{c['sizes']['assertions']:,} assertions of those keys; in this process) ==",
            cli_verify.table(c),
        ]
    lines += ["", "== targets (ratios of this run) =="]
    for v in data["targets"]:
        measured = v["measured"]
        shown = f"{measured:.3f}" if isinstance(measured, float) else str(measured)
        mark = {True: "met", False: "MISSED", None: "n/a"}[v["met"]]
        sign = "<=" if v.get("at_most") else ">="
        cpu = v.get("cpu_normalized")
        extra = f"   (by CPU time: {cpu:.3f})" if cpu is not None else ""
        lines.append(f"  {v['target']:<60}{shown:>14}  {sign} {v['wanted']:<6} {mark}{extra}")
    lines.append(
        f"\nwall {data['wall_seconds']} s; load average at end {data['loadavg_at_end'][0]:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller everything, < 2 minutes")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--pg-url", default=e2e.DEFAULT_PG_URL, help="PostgreSQL (admin URL)")
    parser.add_argument(
        "--e2e-rows",
        default=",".join(e2e.ROWS),
        help="comma-separated end-to-end rows; empty for none (default: all)",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy profiles of API and workers to DIR"
    )
    parser.add_argument("--no-cli", action="store_true", help="skip the appattest verify rows")
    args = parser.parse_args(argv)
    e2e_rows = [r for r in args.e2e_rows.split(",") if r]
    if set(e2e_rows) - set(e2e.ROWS):
        parser.error(f"unknown rows: {', '.join(sorted(set(e2e_rows) - set(e2e.ROWS)))}")
    e2e.install_sigterm()
    mode = "quick" if args.quick else "full"
    wall_start = time.perf_counter()
    info = machine()

    print("[run] floor, core and peer...", file=sys.stderr, flush=True)
    settings = core.QUICK if args.quick else core.DEFAULT
    rows, cache, setup = core.build_rows(settings)
    by_key = {row.key: row for row in rows}
    peer_row, peer = pyattest_row(by_key["attestation_cache_on"])
    measured = rows + ([peer_row] if peer_row is not None else [])
    misses = cache.misses
    core.run(settings, measured)
    if cache.misses != misses:
        raise RuntimeError(f"the warmed cache missed {cache.misses - misses} times")
    core_data = core.results(
        settings, mode, measured, cache, setup, time.perf_counter() - wall_start
    )
    if peer_row is not None:
        core_data["ratios"]["attestation_cache_on_over_pyattest"] = round(
            core._ratio(by_key["attestation_cache_on"], peer_row), 2
        )
    data: dict[str, Any] = {"benchmark": "bench/run.py", "mode": mode, "machine": info}
    data["core"], data["peer"] = core_data, peer

    if not args.no_cli:
        print("[run] appattest verify...", file=sys.stderr, flush=True)
        data["cli"] = cli_verify.run_cli(quick=args.quick, pg_url=args.pg_url)
    if e2e_rows:
        reference = e2e.Reference(
            attestation_per_s=by_key["attestation_cache_on"].median_rate,
            assertion_per_s=by_key["assertion_point"].median_rate,
        )
        data["e2e"] = e2e.run_e2e(
            quick=args.quick,
            pg_url=args.pg_url,
            reference=reference,
            rows_wanted=e2e_rows,
            profile_dir=args.profile,
        )
    data["targets"] = verdicts(data)
    data["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    data["loadavg_at_end"] = os.getloadavg()
    print(table(data))
    print()
    print(json.dumps(data, indent=2, default=str))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the pure verification core against the bare ECDSA floor it cannot beat.

What it measures, in one process and one run:

* the floor: bare ``cryptography`` ECDSA verifications per second with a pre-loaded key, for
  P-384 with SHA-256 over a short message (what checking an App Attest credCert signature with
  the intermediate's key costs) and for P-256 with SHA-256 (what checking an assertion costs);
* ``verify_attestation`` per second on attestations of distinct fake devices from
  ``tests.factory`` (minted before any timing, under a throwaway test CA that the policy trusts
  through ``TrustStore.replacing_apple_root``), once with one shared ``IntermediateCache``
  warmed by a single call, and once with ``cache=None`` (then the intermediate's signature by
  the root is checked on every call, so two P-384 verifications are the floor);
* ``verify_assertion`` per second on pre-minted assertions with increasing counters, with the
  public key passed as the stored 65-byte point (loaded on every call: a device the worker
  process has not seen yet) and as a pre-loaded key object (what the service's cache of loaded
  keys gives for a device seen before, and how the floor row holds its key);
* the ratios of the core rates to their floor rates and the time per operation in microseconds.

Method: every row is measured for a fixed time slice in each of several rounds, the rows are
interleaved (and their order rotated from round to round) so machine noise hits all of them
alike, and the median per row is reported. A ratio is the median of the per-round ratios, so it
compares measurements taken seconds apart. Timing uses ``time.perf_counter``; everything runs
in a single process and thread. Every item is verified once before timing, and results are
checked, so a broken core cannot report a fast rejection as a verification.

Run it from the repository root::

    python bench/core.py                  # 7 rounds of 0.5 s per row, under a minute
    python bench/core.py --quick          # 5 rounds of 0.2 s per row, under 15 seconds
    python bench/core.py --json out.json  # also write the results as JSON

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import cryptography  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from tests.factory import APP_ID, Device, TestCA, client_data_hash  # noqa: E402
from worker.core import (  # noqa: E402
    IntermediateCache,
    Policy,
    TrustStore,
    verify_assertion,
    verify_attestation,
)
from worker.core.assertion import load_public_key  # noqa: E402

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_BATCH_SECONDS = 0.005  # one batch between two clock reads; overshoot of a slice is at most this
_FLOOR_MESSAGES = 32  # distinct signed messages per floor row


@dataclass(frozen=True)
class Settings:
    """How much work one run does."""

    rounds: int
    seconds: float
    devices: int
    assertion_devices: int
    assertions_per_device: int


QUICK = Settings(rounds=5, seconds=0.2, devices=32, assertion_devices=4, assertions_per_device=32)
DEFAULT = Settings(
    rounds=7, seconds=0.5, devices=128, assertion_devices=16, assertions_per_device=64
)


@dataclass
class Row:
    """One measured operation: zero-argument calls cycled through, and its samples."""

    key: str
    label: str
    calls: list[Callable[[], object]]
    floor: str | None = None
    batch: int = 1
    rates: list[float] = field(default_factory=list)
    ops: int = 0
    _cycle: Iterator[Callable[[], object]] | None = None

    def next_calls(self, count: int) -> Iterator[Callable[[], object]]:
        if self._cycle is None:
            self._cycle = itertools.cycle(self.calls)
        return itertools.islice(self._cycle, count)

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)


def _run_slice(row: Row, seconds: float) -> tuple[int, float]:
    """Call ``row``'s operations in batches until ``seconds`` passed; return (ops, elapsed)."""
    perf = time.perf_counter
    done = 0
    start = perf()
    deadline = start + seconds
    while True:
        for call in row.next_calls(row.batch):
            call()
        done += row.batch
        now = perf()
        if now >= deadline:
            return done, now - start


def _calibrate(row: Row) -> None:
    """Pick a batch size so that one batch takes about ``_BATCH_SECONDS``."""
    probe = 4
    start = time.perf_counter()
    for call in row.next_calls(probe):
        call()
    per_op = (time.perf_counter() - start) / probe
    row.batch = max(1, int(_BATCH_SECONDS / max(per_op, 1e-9)))


# --- workloads ---------------------------------------------------------------------------------


def _floor_calls(curve: ec.EllipticCurve) -> list[Callable[[], object]]:
    """Bare ECDSA-SHA256 verifications of short messages with one pre-loaded key."""
    private = ec.generate_private_key(curve)
    public = private.public_key()
    calls: list[Callable[[], object]] = []
    for i in range(_FLOOR_MESSAGES):
        message = b"app attest floor %d" % i
        signature = private.sign(message, _ECDSA_SHA256)
        calls.append(partial(public.verify, signature, message, _ECDSA_SHA256))
    return calls


def _attestation_calls(
    settings: Settings, ca: TestCA, now: datetime
) -> tuple[Policy, list[tuple[Device, bytes, bytes]]]:
    """Mint one attestation per distinct device; return the policy and (device, cdh, object)."""
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem), production_apps=[APP_ID]
    )
    items = []
    for i in range(settings.devices):
        device = Device(ca)
        cdh = client_data_hash(f"bench challenge {i}")
        items.append((device, cdh, device.attestation_object(cdh, now=now)))
    return policy, items


def _attest(
    policy: Policy,
    now: datetime,
    cache: IntermediateCache | None,
    item: tuple[Device, bytes, bytes],
) -> Callable[[], object]:
    device, cdh, obj = item
    return partial(
        verify_attestation,
        attestation_object=obj,
        key_id=device.key_id,
        client_data_hash=cdh,
        policy=policy,
        now=now,
        cache=cache,
    )


def _assertion_items(settings: Settings) -> list[tuple[Device, bytes, bytes, int]]:
    """Mint assertions with increasing counters; return (device, cdh, object, counter)."""
    ca = TestCA.create()  # only devices' keys matter to assertions; no chain is checked
    items = []
    for d in range(settings.assertion_devices):
        device = Device(ca)
        for i in range(settings.assertions_per_device):
            cdh = client_data_hash(f"bench payload {d}/{i}")
            obj = device.assertion_object(cdh)
            items.append((device, cdh, obj, device.counter))
    return items


def _assert_call(
    item: tuple[Device, bytes, bytes, int], key: bytes | ec.EllipticCurvePublicKey
) -> Callable[[], object]:
    _, cdh, obj, counter = item
    return partial(
        verify_assertion,
        assertion_object=obj,
        client_data_hash=cdh,
        public_key=key,
        app_id=APP_ID,
        previous_counter=counter - 1,
    )


def build_rows(settings: Settings) -> tuple[list[Row], IntermediateCache, dict[str, float]]:
    """Mint every input, check each call once, and return the rows, the cache and setup times."""
    setup: dict[str, float] = {}
    start = time.perf_counter()
    p384 = Row("p384_verify", "bare P-384 ECDSA-SHA256 verify", _floor_calls(ec.SECP384R1()))
    p256 = Row("p256_verify", "bare P-256 ECDSA-SHA256 verify", _floor_calls(ec.SECP256R1()))
    setup["floor_keys_s"] = time.perf_counter() - start

    start = time.perf_counter()
    now = datetime.now(UTC)
    ca = TestCA.create()
    policy, att_items = _attestation_calls(settings, ca, now)
    setup["mint_attestations_s"] = time.perf_counter() - start

    start = time.perf_counter()
    asr_items = _assertion_items(settings)
    setup["mint_assertions_s"] = time.perf_counter() - start

    cache = IntermediateCache()
    _attest(policy, now, cache, att_items[0])()  # warms the shared cache
    if len(cache) != 1:
        raise RuntimeError("the warm-up call did not put the intermediate into the cache")
    att_on = Row(
        "attestation_cache_on",
        "verify_attestation, cache on",
        [_attest(policy, now, cache, item) for item in att_items],
        floor="p384_verify",
    )
    att_off = Row(
        "attestation_cache_off",
        "verify_attestation, cache off",
        [_attest(policy, now, None, item) for item in att_items],
        floor="p384_verify",
    )
    asr_point = Row(
        "assertion_point",
        "verify_assertion, 65-byte point",
        [_assert_call(item, item[0].public_point) for item in asr_items],
        floor="p256_verify",
    )
    loaded = {id(item[0]): load_public_key(item[0].public_point) for item in asr_items}
    asr_key = Row(
        "assertion_key",
        "verify_assertion, loaded key",
        [_assert_call(item, loaded[id(item[0])]) for item in asr_items],
        floor="p256_verify",
    )

    start = time.perf_counter()
    _check_once(att_on, [item[0].key_id for item in att_items])
    _check_once(att_off, [item[0].key_id for item in att_items])
    _check_once(asr_point, [item[3] for item in asr_items])
    _check_once(asr_key, [item[3] for item in asr_items])
    _check_once(p384, [None] * len(p384.calls))
    _check_once(p256, [None] * len(p256.calls))
    setup["check_all_once_s"] = time.perf_counter() - start
    return [p384, att_on, att_off, p256, asr_point, asr_key], cache, setup


def _check_once(row: Row, expected: list[Any]) -> None:
    """Run every call of ``row`` once and compare what it returns; raise on any difference."""
    for call, want in zip(row.calls, expected, strict=True):
        result = call()
        got = getattr(result, "key_id", getattr(result, "counter", result))
        if got != want:
            raise RuntimeError(f"{row.key}: got {got!r}, expected {want!r}")


# --- run and report ----------------------------------------------------------------------------


def run(settings: Settings, rows: list[Row]) -> None:
    """Measure every row once per round, rotating the order; fill each row's ``rates``."""
    for row in rows:
        _calibrate(row)
    for round_index in range(settings.rounds):
        shift = round_index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            gc.collect()
            done, elapsed = _run_slice(row, settings.seconds)
            row.rates.append(done / elapsed)
            row.ops += done


def _ratio(row: Row, floor: Row) -> float:
    """Median over rounds of this row's rate divided by its floor's rate in the same round."""
    return statistics.median(r / f for r, f in zip(row.rates, floor.rates, strict=True))


def results(
    settings: Settings,
    mode: str,
    rows: list[Row],
    cache: IntermediateCache,
    setup: dict[str, float],
    wall: float,
) -> dict[str, Any]:
    """Everything measured, as a JSON-ready dictionary."""
    by_key = {row.key: row for row in rows}
    from cryptography.hazmat.backends.openssl.backend import backend

    out_rows = []
    for row in rows:
        median = row.median_rate
        entry: dict[str, Any] = {
            "key": row.key,
            "label": row.label,
            "ops_per_s": round(median, 1),
            "us_per_op": round(1e6 / median, 2),
            "ops_per_s_min": round(min(row.rates), 1),
            "ops_per_s_max": round(max(row.rates), 1),
            "ops_per_s_rounds": [round(r, 1) for r in row.rates],
            "total_ops": row.ops,
            "distinct_items": len(row.calls),
        }
        if row.floor is not None:
            floor = by_key[row.floor]
            entry["floor"] = row.floor
            entry["ratio_to_floor"] = round(_ratio(row, floor), 4)
            entry["us_over_floor"] = round(1e6 / median - 1e6 / floor.median_rate, 2)
        out_rows.append(entry)
    return {
        "benchmark": "bench/core.py",
        "mode": mode,
        "settings": {
            "rounds": settings.rounds,
            "seconds_per_row_per_round": settings.seconds,
            "attestation_devices": settings.devices,
            "assertions": settings.assertion_devices * settings.assertions_per_device,
        },
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "cryptography": cryptography.__version__,
            "openssl": backend.openssl_version_text(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "rows": out_rows,
        "ratios": {
            "attestation_cache_on_over_p384": round(
                _ratio(by_key["attestation_cache_on"], by_key["p384_verify"]), 4
            ),
            "attestation_cache_off_over_p384": round(
                _ratio(by_key["attestation_cache_off"], by_key["p384_verify"]), 4
            ),
            "assertion_point_over_p256": round(
                _ratio(by_key["assertion_point"], by_key["p256_verify"]), 4
            ),
            "assertion_key_over_p256": round(
                _ratio(by_key["assertion_key"], by_key["p256_verify"]), 4
            ),
        },
        "intermediate_cache": cache.stats(),
        "setup_seconds": {k: round(v, 3) for k, v in setup.items()},
        "wall_seconds": round(wall, 2),
    }


def table(data: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    env = data["environment"]
    settings = data["settings"]
    lines = [
        f"core benchmark ({data['mode']}): {settings['rounds']} rounds x "
        f"{settings['seconds_per_row_per_round']} s per row, median of rounds",
        f"Python {env['python']}, cryptography {env['cryptography']}, {env['openssl']}, "
        f"{env['machine']}, {env['cpus']} CPUs",
        "",
        f"{'operation':<34}{'ops/s':>10}{'us/op':>10}{'min ops/s':>11}{'max ops/s':>11}"
        f"{'x floor':>9}{'+us':>9}",
    ]
    lines.append("-" * len(lines[-1]))
    for row in data["rows"]:
        ratio = f"{row['ratio_to_floor']:.3f}" if "ratio_to_floor" in row else "floor"
        over = f"{row['us_over_floor']:.1f}" if "us_over_floor" in row else ""
        lines.append(
            f"{row['label']:<34}{row['ops_per_s']:>10.0f}{row['us_per_op']:>10.1f}"
            f"{row['ops_per_s_min']:>11.0f}{row['ops_per_s_max']:>11.0f}{ratio:>9}{over:>9}"
        )
    ratios = data["ratios"]
    lines += [
        "",
        "ratios (median of per-round rate ratios):",
        f"  attestation, cache on  / bare P-384   {ratios['attestation_cache_on_over_p384']:.3f}",
        f"  attestation, cache off / bare P-384   {ratios['attestation_cache_off_over_p384']:.3f}"
        "  (two P-384 verifications)",
        f"  assertion, point       / bare P-256   {ratios['assertion_point_over_p256']:.3f}",
        f"  assertion, loaded key  / bare P-256   {ratios['assertion_key_over_p256']:.3f}",
        "",
        f"intermediate cache {data['intermediate_cache']}; setup "
        + ", ".join(f"{k}={v}" for k, v in data["setup_seconds"].items())
        + f"; wall {data['wall_seconds']} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer items and rounds (< 15 s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    settings, mode = (QUICK, "quick") if args.quick else (DEFAULT, "default")

    wall_start = time.perf_counter()
    rows, cache, setup = build_rows(settings)
    misses = cache.misses
    run(settings, rows)
    if cache.misses != misses:  # every call with the warmed cache must have been a hit
        raise RuntimeError(f"the warmed cache missed {cache.misses - misses} times")
    data = results(settings, mode, rows, cache, setup, time.perf_counter() - wall_start)
    print(table(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

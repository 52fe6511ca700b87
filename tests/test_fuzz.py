"""A few thousand seeded mutations of real and generated objects: every one is rejected with a
reason code, none is accepted, none raises anything else. ``fuzz/run.py`` runs a million."""

from __future__ import annotations

import tracemalloc
from datetime import UTC, datetime

import pytest

from tests.factory import Device, TestCA
from tests.fuzzing import Report, Seed, fuzz, generated_seeds, run_case, vector_seeds

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def seeds(ca: TestCA) -> list[Seed]:
    chosen = generated_seeds(ca, NOW) + vector_seeds()
    for seed in chosen:
        seed.verify(seed.data)  # every seed is valid before it is mutated
    return chosen


@pytest.mark.parametrize("rng_seed", [1, 2, 3])
def test_mutations_are_rejected_with_reasons(seeds: list[Seed], ca: TestCA, rng_seed: int) -> None:
    device = Device(ca=ca)
    bodies = [device.registration_body("challenge", now=NOW), device.assertion_body("payload")]
    report = fuzz(seeds, bodies, cases=1500, seed=rng_seed)
    assert report.crashes == []
    assert report.accepted == []
    rejected = sum(report.reasons.values())
    others = report.unchanged + report.receipt_only + report.plugin_still_valid
    assert rejected + others == report.cases
    # The mutators reach deep: beyond parsing, into the chain, nonce and signature checks.
    for reason in ("malformed_token", "certificate_chain_invalid", "signature_invalid"):
        assert report.reasons[reason] > 0, report.reasons


def test_memory_per_input_is_bounded(seeds: list[Seed]) -> None:
    """Oversized and deeply nested inputs are refused without large allocations."""
    hostile = [
        b"\x5a\xff\xff\xff\xff" + b"\x00" * 100,  # a byte string claiming 4 GiB
        b"\x9b" + b"\xff" * 8,  # an array claiming 2**64 items
        b"\x81" * 100_000,  # nesting far beyond any real object
        b"\xbf" * 1000,  # indefinite maps
        b"\x00" * 40_000,  # oversized
    ]
    report = Report()
    tracemalloc.start()
    try:
        for seed in seeds:
            for data in hostile:
                tracemalloc.reset_peak()
                run_case(seed, data, "hostile", report)
                _, peak = tracemalloc.get_traced_memory()
                assert peak < 4 * 1024 * 1024, (seed.name, data[:8], peak)
    finally:
        tracemalloc.stop()
    assert report.crashes == [] and report.accepted == []

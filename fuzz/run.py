"""Long-run fuzzing of the verification core: a million seeded mutations by default.

Run from the repository root::

    python fuzz/run.py                       # 1,000,000 cases, seed 1
    python fuzz/run.py --cases 100000 --seed 7

It prints the count of inputs, rejections by reason, crashes (any exception other than a
rejection) and accepts (a mutated object that verified), the slowest input, and the process's
peak RSS at the start and the end; it exits 1 if there was any crash or accept. Mutations that
change nothing but the attestation's receipt are counted apart: no device signature covers the
receipt and the verdict does not depend on it. The engine is
``tests/fuzzing.py``, the same one the test suite runs for a few thousand cases.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.factory import Device, TestCA  # noqa: E402
from tests.fuzzing import Report, fuzz, generated_seeds, vector_seeds  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=50_000, help="cases per progress line")
    args = parser.parse_args(argv)
    warnings.simplefilter("error")
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    ca = TestCA.create()
    seeds = generated_seeds(ca, now) + vector_seeds()
    for seed in seeds:
        seed.verify(seed.data)
    device = Device(ca=ca)
    bodies = [device.registration_body("challenge", now=now), device.assertion_body("payload")]
    total = Report()
    rss_start = _rss_mib()
    started = time.perf_counter()
    done = 0
    chunk_index = 0
    while done < args.cases:
        size = min(args.chunk, args.cases - done)
        report = fuzz(seeds, bodies, cases=size, seed=args.seed * 1_000_003 + chunk_index)
        total.cases += report.cases
        total.unchanged += report.unchanged
        total.reasons.update(report.reasons)
        total.accepted += report.accepted
        total.receipt_only += report.receipt_only
        total.crashes += report.crashes
        total.slowest_seconds = max(total.slowest_seconds, report.slowest_seconds)
        done += size
        chunk_index += 1
        elapsed = time.perf_counter() - started
        print(
            f"{done:>9,} mutations, {total.cases:>9,} inputs, {len(total.crashes)} crashes, "
            f"{len(total.accepted)} accepts, {total.cases / elapsed:,.0f} inputs/s, "
            f"max RSS {_rss_mib():.0f} MiB",
            flush=True,
        )
    summary = {
        "inputs": total.cases,
        "unchanged_skipped": total.unchanged,
        "rejected_by_reason": dict(total.reasons.most_common()),
        "crashes": len(total.crashes),
        "accepts": len(total.accepted),
        "receipt_only_changes_accepted": total.receipt_only,
        "slowest_input_ms": round(total.slowest_seconds * 1000, 3),
        "max_rss_mib_start": round(rss_start, 1),
        "max_rss_mib_end": round(_rss_mib(), 1),
        "seconds": round(time.perf_counter() - started, 1),
        "seed": args.seed,
    }
    print(json.dumps(summary, indent=2))
    for item in (total.crashes + total.accepted)[:20]:
        print("FINDING", item)
    return 1 if total.crashes or total.accepted else 0


if __name__ == "__main__":
    sys.exit(main())

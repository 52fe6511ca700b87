"""The summary of a simulation: verdicts by case against what was expected, throughput and
latency percentiles, as a table for people or JSON for scripts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from worker.simulator.flow import (
    ANDROID_CASES,
    ANDROID_HOSTILE_CASES,
    HONEST_CASES,
    HOSTILE_CASES,
    Outcome,
    Simulation,
)

PERCENTILES: Final = (50, 95, 99)
_SHOWN_UNEXPECTED: Final = 10


def percentile(sorted_values: Sequence[float], rank: int) -> float:
    """The nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    index = max(math.ceil(rank / 100 * len(sorted_values)) - 1, 0)
    return sorted_values[index]


def summarize(simulation: Simulation) -> dict[str, Any]:
    """The run as plain JSON types: ``ok`` (every verdict as expected), counts by verdict,
    by case (with the expected verdicts), jobs per second, latency percentiles in milliseconds
    by job kind, and the first unexpected outcomes."""
    outcomes = simulation.outcomes
    cases: dict[str, dict[str, Any]] = {}
    for case in (*HONEST_CASES, *HOSTILE_CASES, *ANDROID_CASES, *ANDROID_HOSTILE_CASES):
        mine = [o for o in outcomes if o.case == case]
        if mine:
            cases[case.name] = {
                "kind": case.kind,
                "description": case.description,
                "expected": sorted(case.expected),
                "verdicts": dict(Counter(o.verdict for o in mine).most_common()),
                "unexpected": sum(not o.as_expected for o in mine),
            }
    latency: dict[str, dict[str, float | int]] = {}
    for kind in ("registration", "assertion"):
        seconds = sorted(o.seconds for o in outcomes if o.case.kind == kind)
        if seconds:
            latency[kind] = {"jobs": len(seconds)} | {
                f"p{rank}": round(percentile(seconds, rank) * 1000, 1) for rank in PERCENTILES
            }
    unexpected = [o for o in outcomes if not o.as_expected]
    return {
        "ok": not unexpected and bool(outcomes),
        "jobs": len(outcomes),
        "unexpectedCount": len(unexpected),
        "seconds": round(simulation.seconds, 3),
        "jobsPerSecond": round(len(outcomes) / simulation.seconds, 1) if simulation.seconds else 0,
        "rateLimited": simulation.rate_limited,
        "verdicts": dict(Counter(o.verdict for o in outcomes).most_common()),
        "cases": cases,
        "latencyMs": latency,
        "unexpected": [_unexpected(o) for o in unexpected[:_SHOWN_UNEXPECTED]],
    }


def _unexpected(outcome: Outcome) -> dict[str, Any]:
    return {
        "case": outcome.case.name,
        "keyId": outcome.key_id,
        "verdict": outcome.verdict,
        "expected": sorted(outcome.case.expected),
        "detail": outcome.detail,
    }


def render(summary: dict[str, Any], console: Console) -> None:
    """Print ``summarize``'s result as tables and a closing line."""
    cases = Table(title="verdicts by case")
    cases.add_column("case")
    cases.add_column("jobs", justify="right")
    cases.add_column("verdicts")
    cases.add_column("", justify="center")
    for name, case in summary["cases"].items():
        verdicts = ", ".join(f"{verdict} {count}" for verdict, count in case["verdicts"].items())
        jobs = sum(case["verdicts"].values())
        if case["unexpected"]:
            verdicts += f" [red](expected {' or '.join(case['expected'])})[/]"
        mark = "[red]✗[/]" if case["unexpected"] else "[green]✓[/]"
        cases.add_row(name, str(jobs), verdicts, mark)
    console.print(cases)
    timing = Table(title="latency (ms, submission to verdict)")
    for column in ("kind", "jobs", *(f"p{rank}" for rank in PERCENTILES)):
        timing.add_column(column, justify="right" if column != "kind" else "left")
    for kind, row in summary["latencyMs"].items():
        timing.add_row(kind, str(row["jobs"]), *(f"{row[f'p{rank}']:.1f}" for rank in PERCENTILES))
    console.print(timing)
    for outcome in summary["unexpected"]:
        console.print(
            f"[red]unexpected[/] {outcome['case']} {outcome['keyId']}: {outcome['verdict']}"
            f" (expected {' or '.join(outcome['expected'])}): {outcome['detail']}",
            highlight=False,
        )
    verdicts = ", ".join(f"{verdict} {count}" for verdict, count in summary["verdicts"].items())
    console.print(
        f"{summary['jobs']} jobs in {summary['seconds']:.2f} s ({summary['jobsPerSecond']} jobs/s)"
        f": {verdicts}"
        + (
            f"; waited out {summary['rateLimited']} rate-limit answers"
            if summary["rateLimited"]
            else ""
        ),
        highlight=False,
    )
    if summary["ok"]:
        console.print("[green]every verdict as expected[/]")
    else:
        console.print(f"[red]{summary['unexpectedCount']} verdicts not as expected[/]")

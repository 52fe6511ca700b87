"""Reports of batch runs: a summary table by verdict and reason, and per-key JSON Lines and CSV."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table


def print_summary(counts: Counter[tuple[str, str]], stream: TextIO, *, title: str) -> None:
    """The summary as a table on a terminal, as plain aligned lines otherwise."""
    ordered = sorted(counts.items(), key=lambda item: (item[0][0] != "accepted", -item[1]))
    total = sum(counts.values())
    if stream.isatty():
        table = Table(title=title)
        table.add_column("verdict")
        table.add_column("reason")
        table.add_column("keys", justify="right")
        for (verdict, reason), count in ordered:
            table.add_row(verdict, reason, str(count))
        table.add_row("total", "", str(total))
        Console(file=stream).print(table)
        return
    stream.write(f"{title}\n")
    for (verdict, reason), count in ordered:
        stream.write(f"  {verdict:<9} {reason:<26} {count:>9}\n")
    stream.write(f"  {'total':<9} {'':<26} {total:>9}\n")
    stream.flush()


def _verdict_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return ("accepted", "-") if row.get("ok") else ("rejected", str(row.get("reason")))


def write_reports(
    rows: Iterable[Mapping[str, Any]],
    directory: Path,
    *,
    columns: Sequence[str],
    summary_key: Callable[[Mapping[str, Any]], tuple[str, str]] = _verdict_key,
) -> tuple[Path, Path, Counter[tuple[str, str]]]:
    """Write ``results.jsonl`` and ``results.csv`` in ``directory``; return their paths and
    the summary counts (by verdict and reason, or by ``summary_key``), gathered in the same
    pass."""
    directory.mkdir(parents=True, exist_ok=True)
    jsonl_path, csv_path = directory / "results.jsonl", directory / "results.csv"
    counts: Counter[tuple[str, str]] = Counter()
    with jsonl_path.open("w") as jsonl, csv_path.open("w", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            jsonl.write(json.dumps(dict(row)) + "\n")
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
            counts[summary_key(row)] += 1
    return jsonl_path, csv_path, counts

"""``appattest verify --queue``: bulk import through the real workers (Redis, PostgreSQL).

The same JSON Lines file goes through the workers and through the in-process command (on its
own SQLite store, with the workers' apps and root), and both must give the same verdicts, line
by line and in input order. Registrations' challenges are arbitrary strings, taken as given;
assertions follow their key's registration and must be accepted in order.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.factory import APP_ID, Device, TestCA
from tests.stack import Stack

DEV_APP_ID = "TEAMID1234.com.example.devapp"
TIMEOUT = 120
# Every field of the in-process command's output, which the queued import must match.
FIELDS = {
    "line",
    "ok",
    "kind",
    "keyId",
    "reason",
    "detail",
    "appId",
    "environment",
    "counter",
    "extensions",
    "verifiedAt",
    "riskMetric",
    "riskMetricAt",
}
COMPARED = ("line", "ok", "kind", "keyId", "reason", "appId", "environment", "counter")
CSV_COLUMNS = ["line", "ok", "kind", "keyId", "reason", "detail", "appId", "environment", "counter"]
PROGRESS_LINE = re.compile(r"^import: (\d+)/(\d+) \((\d+\.\d)%\), ([\d,]+\.\d)/s, ETA \S+$")
SUMMARY_LINE = re.compile(r"^  (accepted|rejected|total) +(?:(\S+) +)?(\d+)$")


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def run_queue(
    stack: Stack, cwd: Path, source: Path, run_id: str, *args: str
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli.commands",
            "verify",
            str(source),
            "--queue",
            "--run-id",
            run_id,
            *args,
        ],
        env=stack.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"import run {run_id}" in proc.stderr
    return proc


def run_in_process(
    stack: Stack, cwd: Path, source: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """The in-process command on its own SQLite store, with the workers' apps and root."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli.commands",
            "verify",
            str(source),
            "--store",
            f"sqlite:///{cwd / f'in-process-{uuid.uuid4().hex[:8]}.db'}",
            "--app-id",
            APP_ID,
            "--dev-app-id",
            DEV_APP_ID,
            "--root-ca",
            str(stack.workdir / "root.pem"),
            *args,
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def results(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def verdicts(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(row[field] for field in COMPARED) for row in rows]


def test_queued_import_matches_the_in_process_command(
    stack: Stack, ca: TestCA, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    alice = Device(ca=ca)
    bob = Device(ca=ca, app_id=DEV_APP_ID, environment="development")
    carol = Device(ca=ca)
    dave = Device(ca=ca, environment="development")  # the app takes production keys only
    stranger = Device(ca=ca)
    alice_1 = alice.assertion_body("alice payload 1")  # counter 1
    alice_2 = alice.assertion_body("alice payload 2")  # counter 2
    lines: list[Any] = [
        alice.registration_body("any string the app chose", now=now),
        bob.registration_body("bob's challenge, taken as given", now=now),
        alice_1,
        "not json",
        carol.registration_body("carol", now=now),
        bob.assertion_body("bob payload 1"),
        alice_2,
        {**alice.registration_body("x", now=now), "platform": "android"},
        dave.registration_body("dave", now=now),
        alice_2,  # the same assertion again: a replay
        carol.assertion_body("carol payload 1"),
        alice.assertion_body("alice payload 3"),
        dave.assertion_body("dave payload 1"),
        stranger.assertion_body("never registered"),
        bob.assertion_body("bob payload 2"),
        carol.registration_body("carol again", now=now),
    ]
    expected = [
        (True, "registration", alice.key_id_b64, None, 0),
        (True, "registration", bob.key_id_b64, None, 0),
        (True, "assertion", alice.key_id_b64, None, 1),
        (False, None, None, "invalid_request", None),
        (True, "registration", carol.key_id_b64, None, 0),
        (True, "assertion", bob.key_id_b64, None, 1),
        (True, "assertion", alice.key_id_b64, None, 2),
        (False, "registration", alice.key_id_b64, "unsupported_format", None),
        (False, "registration", dave.key_id_b64, "environment_mismatch", None),
        (False, "assertion", alice.key_id_b64, "counter_replay", None),
        (True, "assertion", carol.key_id_b64, None, 1),
        (True, "assertion", alice.key_id_b64, None, 3),
        (False, "assertion", dave.key_id_b64, "key_unknown", None),
        (False, "assertion", stranger.key_id_b64, "key_unknown", None),
        (True, "assertion", bob.key_id_b64, None, 2),
        (False, "registration", carol.key_id_b64, "key_already_registered", None),
    ]
    source = write_lines(tmp_path / "import.jsonl", lines)
    run_id = f"import-{uuid.uuid4().hex[:8]}"
    report_dir = tmp_path / "report"
    queued = run_queue(stack, tmp_path, source, run_id, "--report-dir", str(report_dir))
    rows = results(queued)
    assert [row["line"] for row in rows] == list(range(1, len(lines) + 1))
    assert [
        (row["ok"], row["kind"], row["keyId"], row["reason"], row["counter"]) for row in rows
    ] == expected
    assert rows[1]["environment"] == "development" and rows[1]["appId"] == DEV_APP_ID
    assert rows[0]["environment"] == "production" and rows[0]["appId"] == APP_ID

    in_process = results(run_in_process(stack, tmp_path, source))
    assert verdicts(rows) == verdicts(in_process)
    for row, local in zip(rows, in_process, strict=True):
        assert set(row) == set(local) == FIELDS
        assert (row["detail"] is None) == (local["detail"] is None)

    # The report files hold the same rows; the summary counts them by verdict and reason.
    jsonl = (report_dir / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in jsonl] == rows
    with (report_dir / "results.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        csv_rows = list(reader)
    assert [(r["line"], r["ok"], r["keyId"], r["reason"], r["counter"]) for r in csv_rows] == [
        (
            str(row["line"]),
            str(row["ok"]),
            row["keyId"] or "",
            row["reason"] or "",
            "" if row["counter"] is None else str(row["counter"]),
        )
        for row in rows
    ]
    summary: Counter[str | None] = Counter()
    total = 0
    for line in queued.stderr.splitlines():
        if match := SUMMARY_LINE.match(line):
            verdict, reason, count = match.groups()
            if verdict == "total":
                total = int(count)
            else:
                summary[None if verdict == "accepted" else reason] += int(count)
    assert summary == Counter(reason for *_, reason, _ in expected)
    assert total == len(lines)
    accepted = sum(1 for ok, *_ in expected if ok)
    assert f"{len(lines)} lines: {accepted} accepted, {len(lines) - accepted} rejected" in (
        queued.stderr
    )
    progress = [m for line in queued.stderr.splitlines() if (m := PROGRESS_LINE.match(line))]
    assert progress, queued.stderr
    assert progress[-1].group(1, 2, 3) == (str(len(lines)), str(len(lines)), "100.0")

    # The same run id again returns the recorded verdicts, not new ones...
    resumed = run_queue(stack, tmp_path, source, run_id, "--report-dir", str(tmp_path / "again"))
    assert results(resumed) == rows
    # ...whereas another run decides again, against the keys the first one stored.
    fresh = results(run_queue(stack, tmp_path, source, f"{run_id}-fresh"))
    assert [row["reason"] for row in fresh if row["kind"] == "registration"] == [
        "key_already_registered",
        "key_already_registered",
        "key_already_registered",
        "unsupported_format",
        "environment_mismatch",
        "key_already_registered",
    ]
    assert (tmp_path / f"import-{run_id}-fresh" / "results.jsonl").is_file()


def test_at_is_the_verification_instant(stack: Stack, ca: TestCA, tmp_path: Path) -> None:
    long_ago = datetime(2021, 3, 1, 12, 0, tzinfo=UTC)
    device = Device(ca=ca)
    # The credential certificate is valid from a day before to two days after that instant.
    body = device.registration_body("registered long ago", now=long_ago)
    source = write_lines(tmp_path / "old.jsonl", [body])
    run_id = uuid.uuid4().hex[:12]

    today = results(run_queue(stack, tmp_path, source, f"{run_id}-today"))
    assert [(r["ok"], r["reason"]) for r in today] == [(False, "certificate_expired")]

    at = (long_ago + timedelta(hours=3)).isoformat()
    then = results(run_queue(stack, tmp_path, source, f"{run_id}-then", "--at", at))
    assert [(r["ok"], r["reason"], r["counter"]) for r in then] == [(True, None, 0)]
    assert datetime.fromisoformat(then[0]["verifiedAt"]) == long_ago + timedelta(hours=3)
    in_process = results(run_in_process(stack, tmp_path, source, "--at", at))
    assert verdicts(then) == verdicts(in_process)

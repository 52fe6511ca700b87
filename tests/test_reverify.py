"""``appattest reverify`` against the real stack: PostgreSQL, Redis and two worker processes.

A store of several hundred registrations (two apps, both environments) is filled in process,
at instants inside a window that no other test uses. The policy then changes (one app,
production only), and ``appattest reverify`` runs as a user runs it: a subprocess, through the
workers or with ``--local``. Each run's report files, summary and plain progress lines are
checked (the subprocess's standard error is not a terminal), and so are the filters, the
distrust lists, ``--apply`` (seen by the real assertion pipeline, then undone by another run)
and resuming an interrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.factory import APP_ID, Device, TestCA
from tests.stack import Stack
from worker.contract import parse_request
from worker.core import Policy, TrustStore
from worker.queue.app import create_celery_app
from worker.queue.messaging import VERIFY_TASK
from worker.service import VerificationService
from worker.store.challenges import Purpose, new_challenge, store_challenges
from worker.store.db import create_store_engine, session_factory
from worker.store.models import DeviceKey, ReverifyResult

DEV_APP_ID = "TEAMID1234.com.example.devapp"
KEYS = 300
# Registrations are made as of instants in this window; nothing else in the suite uses it, so
# runs filtered on it cover exactly the keys of this module.
WINDOW_START = datetime(2024, 2, 1, tzinfo=UTC)
STEP = timedelta(minutes=1)
WINDOW_END = WINDOW_START + KEYS * STEP
WINDOW = ["--since", WINDOW_START.isoformat(), "--until", WINDOW_END.isoformat()]
MIX = (
    (APP_ID, "production"),
    (APP_ID, "development"),
    (DEV_APP_ID, "production"),
    (DEV_APP_ID, "development"),
)
REPORT_COLUMNS = ["keyId", "ok", "reason", "detail", "appId", "environment", "decidedAt"]
TIMEOUT = 120

SUMMARY_LINE = re.compile(r"^  (accepted|rejected|total) +(?:(\S+) +)?(\d+)$")
PROGRESS_LINE = re.compile(
    r"^reverify: (\d+)/(\d+) \((\d+\.\d)%\), ([\d,]+\.\d)/s, ETA (\d+:\d\d:\d\d|\?)$"
)
HEADER = re.compile(r"^reverify run (\w+): (\d+) keys, (\d+) already decided", re.MULTILINE)


# The population -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    device: Device
    app_id: str
    environment: str
    verified_at: datetime


@dataclass(frozen=True)
class Population:
    """The keys this module registered, in registration order, and the stack's root."""

    keys: dict[str, Registered]
    root: Path

    @property
    def ordered(self) -> list[str]:
        return list(self.keys)

    def where(
        self,
        *,
        app_id: str | None = None,
        environment: str | None = None,
        since: datetime = WINDOW_START,
        until: datetime = WINDOW_END,
    ) -> set[str]:
        return {
            key_id
            for key_id, key in self.keys.items()
            if (app_id is None or key.app_id == app_id)
            and (environment is None or key.environment == environment)
            and since <= key.verified_at < until
        }

    def new_policy(self) -> list[str]:
        """The changed policy: one app, production keys only."""
        return ["--app-id", APP_ID, "--root-ca", str(self.root)]

    def old_policy(self) -> list[str]:
        """The policy the keys were registered under: both apps, development keys too."""
        return ["--dev-app-id", APP_ID, "--dev-app-id", DEV_APP_ID, "--root-ca", str(self.root)]


def new_policy_reason(app_id: str, environment: str) -> str | None:
    """The verdict of a (valid) stored key under the changed policy."""
    if app_id != APP_ID:
        return "app_id_mismatch"
    if environment != "production":
        return "environment_mismatch"
    return None


@pytest.fixture(scope="module")
def store(stack: Stack) -> Iterator[sessionmaker[Session]]:
    """Sessions on the stack's PostgreSQL store, for populating it and reading it back."""
    engine = create_store_engine(stack.settings.store_url)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def population(stack: Stack, ca: TestCA, store: sessionmaker[Session]) -> Population:
    """Register KEYS generated devices in process, each as of its own instant in the window."""
    policy = Policy.build(
        trust=TrustStore.replacing_apple_root(ca.root_pem),
        development_apps=(APP_ID, DEV_APP_ID),
    )
    service = VerificationService(policy=policy, sessions=store, issued_challenges=False)
    keys: dict[str, Registered] = {}
    for index in range(KEYS):
        app_id, environment = MIX[index % len(MIX)]
        at = WINDOW_START + index * STEP
        device = Device(ca=ca, app_id=app_id, environment=environment)  # type: ignore[arg-type]
        body = device.registration_body(f"reverify population {index}", now=at)
        result = service.handle(parse_request(body), now=at)
        assert result.ok, result
        keys[device.key_id_b64] = Registered(device, app_id, environment, at)
    return Population(keys=keys, root=stack.workdir / "root.pem")


@pytest.fixture(scope="module")
def celery_app(stack: Stack) -> Iterator[Celery]:
    app = create_celery_app(stack.settings)
    try:
        yield app
    finally:
        app.close()


# Running the command and reading what it wrote ------------------------------------------------


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    run_id: str
    directory: Path

    @property
    def rows(self) -> list[dict[str, Any]]:
        text = (self.directory / "results.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    @property
    def csv_rows(self) -> list[dict[str, str]]:
        with (self.directory / "results.csv").open(newline="") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == REPORT_COLUMNS
            return list(reader)

    @property
    def header(self) -> tuple[int, int]:
        """(keys covered, keys already decided) as the run announced them."""
        match = HEADER.search(self.proc.stderr)
        assert match is not None, self.proc.stderr
        assert match.group(1) == self.run_id
        return int(match.group(2)), int(match.group(3))

    @property
    def summary(self) -> Counter[str | None]:
        """The stderr summary as counts by reason (None for accepted); checks its total."""
        counts: Counter[str | None] = Counter()
        total = None
        for line in self.proc.stderr.splitlines():
            if (match := SUMMARY_LINE.match(line)) is None:
                continue
            verdict, reason, count = match.groups()
            if verdict == "total":
                total = int(count)
            else:
                counts[None if verdict == "accepted" else reason] += int(count)
        assert total == sum(counts.values()), self.proc.stderr
        return counts

    @property
    def progress(self) -> list[tuple[int, int, float]]:
        """The plain progress lines as (completed, total, rate); checks their format."""
        lines = []
        for line in self.proc.stderr.splitlines():
            if line.startswith("reverify: "):
                match = PROGRESS_LINE.match(line)
                assert match is not None, line
                completed, total, share, rate, eta = match.groups()
                assert float(share) == pytest.approx(100.0 * int(completed) / int(total), abs=0.1)
                assert eta != "?" or float(rate.replace(",", "")) == 0
                lines.append((int(completed), int(total), float(rate.replace(",", ""))))
        return lines


def cli_env(stack: Stack) -> dict[str, str]:
    # Each command states the whole policy on its command line; the workers' apps in the
    # environment would otherwise be merged into it.
    return {**stack.env, "APPATTEST_APP_IDS": "", "APPATTEST_DEV_APP_IDS": ""}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli.commands", "reverify", *args]


def reverify(
    stack: Stack, cwd: Path, *args: str, run_id: str | None = None, check: bool = True
) -> Run:
    """Run ``appattest reverify`` as a subprocess; with ``check``, require exit status 0."""
    extra = ["--run-id", run_id] if run_id else []
    proc = subprocess.run(
        command(*args, *extra),
        env=cli_env(stack),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    match = HEADER.search(proc.stderr)
    announced = match.group(1) if match else ""
    run_id = run_id or announced
    return Run(proc=proc, run_id=run_id, directory=cwd / f"reverify-{run_id}")


def check_report(
    run: Run,
    expected: dict[str, str | None],
    population: Population,
    others: dict[str, tuple[str, str]] | None = None,
) -> None:
    """The report holds exactly one row per expected key (and per key of ``others``), in key
    order, with its verdict; the CSV agrees with the JSON Lines; the summary and the progress
    lines count the same rows.

    ``others`` are keys stored by other tests, as keyId -> (appId, environment): their exact
    verdicts are those tests' business, but the changed policy must not accept any key outside
    its one app's production keys."""
    others = others or {}
    rows = run.rows
    assert [row["keyId"] for row in rows] == sorted({*expected, *others})
    for row in rows:
        assert set(row) == set(REPORT_COLUMNS)
        assert row["decidedAt"] is not None
        if row["keyId"] in others:
            assert not row["ok"] or new_policy_reason(*others[row["keyId"]]) is None, row
            continue
        reason = expected[row["keyId"]]
        assert (row["ok"], row["reason"]) == (reason is None, reason), row
        if (mine := population.keys.get(row["keyId"])) is not None:
            assert (row["appId"], row["environment"]) == (mine.app_id, mine.environment)
    csv_rows = run.csv_rows
    assert len(csv_rows) == len(rows)
    for row, csv_row in zip(rows, csv_rows, strict=True):
        assert csv_row["keyId"] == row["keyId"]
        assert csv_row["ok"] == str(row["ok"])
        assert csv_row["reason"] == (row["reason"] or "")
        assert csv_row["environment"] == (row["environment"] or "")
    assert run.summary == Counter(row["reason"] for row in rows)
    progress = run.progress
    assert progress, run.proc.stderr
    assert progress[-1][:2] == (len(rows), len(rows))
    assert all(total == len(rows) for _, total, _ in progress)
    assert [completed for completed, _, _ in progress] == sorted(c for c, _, _ in progress)


def revocations(store: sessionmaker[Session]) -> dict[str, tuple[str | None, str | None]]:
    """keyId -> (revoked_reason, revoked_by_run) of every revoked key."""
    with store() as session:
        rows = session.execute(
            select(DeviceKey.key_id, DeviceKey.revoked_reason, DeviceKey.revoked_by_run).where(
                DeviceKey.revoked_at.is_not(None)
            )
        )
        return {key_id: (reason, run) for key_id, reason, run in rows}


def assert_through_workers(store: sessionmaker[Session], app: Celery, device: Device) -> Any:
    """An assertion with a freshly issued challenge, decided by a real worker."""
    issued = new_challenge(
        purpose=Purpose.ASSERTION,
        key_id=device.key_id_b64,
        ttl=timedelta(minutes=5),
        now=datetime.now(UTC),
    )
    with store() as session, session.begin():
        store_challenges(session, [issued])
    challenge = issued.challenge
    job_id = str(uuid.uuid4())
    result = app.send_task(
        VERIFY_TASK, args=[{"body": device.assertion_body(challenge)}], task_id=job_id
    )
    return result.get(timeout=60)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


# Tests ----------------------------------------------------------------------------------------


def test_policy_change_through_the_workers_covers_every_stored_key(
    stack: Stack, population: Population, store: sessionmaker[Session], tmp_path: Path
) -> None:
    """No filter, no --run-id, distributed: every stored key (this module's and any other
    test's) gets one row, decided by the changed policy; the report goes to the default
    folder named after the announced run id."""
    with store() as session:
        stored = session.execute(
            select(DeviceKey.key_id, DeviceKey.app_id, DeviceKey.environment)
        ).all()
    others = {k: (app, env) for k, app, env in stored if k not in population.keys}
    expected = {
        key_id: new_policy_reason(key.app_id, key.environment)
        for key_id, key in population.keys.items()
    }
    assert Counter(expected.values()) == {
        None: KEYS // 4,
        "environment_mismatch": KEYS // 4,
        "app_id_mismatch": KEYS // 2,
    }
    run = reverify(stack, tmp_path, *population.new_policy(), "--batch-size", "40")
    assert re.fullmatch(r"[0-9a-f]{16}", run.run_id)
    assert run.header == (len(expected) + len(others), 0)
    check_report(run, expected, population, others)
    assert f"results: {run.directory.name}/results.jsonl" in run.proc.stderr
    assert revocations(store).keys().isdisjoint(population.keys)


def test_policy_change_in_process(stack: Stack, population: Population, tmp_path: Path) -> None:
    run_id = new_run_id()
    report_dir = tmp_path / "report"
    run = reverify(
        stack,
        tmp_path,
        *population.new_policy(),
        *WINDOW,
        "--local",
        "--batch-size",
        "64",
        "--report-dir",
        str(report_dir),
        run_id=run_id,
    )
    run.directory = report_dir
    assert run.header == (KEYS, 0)
    expected = {
        key_id: new_policy_reason(key.app_id, key.environment)
        for key_id, key in population.keys.items()
    }
    check_report(run, expected, population)
    assert not (tmp_path / f"reverify-{run_id}").exists()


@pytest.mark.parametrize(
    "case",
    ["only-app-id", "only-environment", "since-until", "app-and-environment"],
)
def test_filters_select_the_right_keys(
    stack: Stack, population: Population, tmp_path: Path, case: str
) -> None:
    since, until = WINDOW_START + 50 * STEP, WINDOW_START + 121 * STEP
    args, covered = {
        "only-app-id": (
            ["--only-app-id", DEV_APP_ID, *WINDOW],
            population.where(app_id=DEV_APP_ID),
        ),
        "only-environment": (
            ["--only-environment", "development", *WINDOW],
            population.where(environment="development"),
        ),
        "since-until": (
            # No zone means UTC; the upper bound is exclusive.
            ["--since", since.isoformat(), "--until", until.replace(tzinfo=None).isoformat()],
            population.where(since=since, until=until),
        ),
        "app-and-environment": (
            ["--only-app-id", APP_ID, "--only-environment", "production", *WINDOW],
            population.where(app_id=APP_ID, environment="production"),
        ),
    }[case]
    assert 0 < len(covered) < KEYS
    run = reverify(stack, tmp_path, *population.new_policy(), *args, "--local", run_id=new_run_id())
    expected = {
        key_id: new_policy_reason(
            population.keys[key_id].app_id, population.keys[key_id].environment
        )
        for key_id in covered
    }
    assert run.header == (len(covered), 0)
    check_report(run, expected, population)


def test_distrusted_intermediate_fails_every_key(
    stack: Stack, ca: TestCA, population: Population, tmp_path: Path
) -> None:
    fingerprint = hashlib.sha256(ca.intermediate_der).hexdigest()
    run = reverify(
        stack,
        tmp_path,
        *population.old_policy(),
        "--distrust-cert",
        fingerprint.upper(),
        *WINDOW,
        "--batch-size",
        "50",
        run_id=new_run_id(),
    )
    check_report(run, dict.fromkeys(population.keys, "certificate_chain_invalid"), population)


def test_distrusted_key_fails_that_key_only(
    stack: Stack, population: Population, tmp_path: Path
) -> None:
    distrusted = population.ordered[7]
    run = reverify(
        stack,
        tmp_path,
        *population.old_policy(),
        "--distrust-key",
        distrusted,
        *WINDOW,
        "--local",
        run_id=new_run_id(),
    )
    expected: dict[str, str | None] = dict.fromkeys(population.keys)
    expected[distrusted] = "key_revoked"
    check_report(run, expected, population)


def test_apply_revokes_failing_keys_and_a_later_run_restores_them(
    stack: Stack,
    population: Population,
    store: sessionmaker[Session],
    celery_app: Celery,
    tmp_path: Path,
) -> None:
    keeper = population.keys[population.ordered[0]]  # the app's production key: still passes
    victim = population.keys[population.ordered[2]]  # the other app's key: now fails
    assert (keeper.app_id, keeper.environment) == (APP_ID, "production")
    assert victim.app_id == DEV_APP_ID
    failing = {
        key_id: reason
        for key_id, key in population.keys.items()
        if (reason := new_policy_reason(key.app_id, key.environment)) is not None
    }

    # Without --apply the run changes nothing: the failing key still asserts.
    dry = reverify(stack, tmp_path, *population.new_policy(), *WINDOW, "--local", run_id="dry")
    assert "applying revocations" not in dry.proc.stderr
    assert sum(1 for row in dry.rows if not row["ok"]) == len(failing)
    assert revocations(store).keys().isdisjoint(population.keys)
    result = assert_through_workers(store, celery_app, victim.device)
    assert (result["ok"], result["counter"]) == (True, victim.device.counter)

    # With --apply, through the workers: exactly the failing keys are revoked, with the
    # reason and the run id, and their next assertion is refused.
    apply_id = new_run_id()
    applied = reverify(
        stack, tmp_path, *population.new_policy(), *WINDOW, "--apply", run_id=apply_id
    )
    assert "applying revocations" in applied.proc.stderr
    assert applied.summary == Counter(
        new_policy_reason(k.app_id, k.environment) for k in population.keys.values()
    )
    assert revocations(store) == {key_id: (reason, apply_id) for key_id, reason in failing.items()}
    result = assert_through_workers(store, celery_app, victim.device)
    assert (result["ok"], result["reason"]) == (False, "key_revoked")
    result = assert_through_workers(store, celery_app, keeper.device)
    assert (result["ok"], result["counter"]) == (True, keeper.device.counter)

    # A run under the old policy with --apply restores every key it now accepts.
    restore = reverify(
        stack, tmp_path, *population.old_policy(), *WINDOW, "--apply", "--local", run_id="restore"
    )
    assert restore.summary == Counter({None: KEYS})
    assert revocations(store) == {}
    result = assert_through_workers(store, celery_app, victim.device)
    assert (result["ok"], result["counter"]) == (True, victim.device.counter)


def done_rows(store: sessionmaker[Session], run_id: str) -> dict[str, datetime | None]:
    with store() as session:
        rows = session.execute(
            select(ReverifyResult.key_id, ReverifyResult.decided_at).where(
                ReverifyResult.run_id == run_id, ReverifyResult.status == "done"
            )
        )
        return {key_id: decided_at for key_id, decided_at in rows}


def without_decided_at(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "decidedAt"} for row in rows]


def test_interrupted_run_resumes_to_the_same_report(
    stack: Stack, population: Population, store: sessionmaker[Session], tmp_path: Path
) -> None:
    args = [*population.new_policy(), *WINDOW, "--local"]
    whole = reverify(stack, tmp_path, *args, run_id="uninterrupted")

    # Kill a run of one key per batch once it has decided some keys, but not all. (SIGKILL
    # rather than SIGINT: a KeyboardInterrupt that lands in the connection pool's pre-ping can
    # end the command with another exception, so its exit status is not deterministic.)
    run_id = "interrupted"
    proc = subprocess.Popen(
        command(*args, "--batch-size", "1", "--run-id", run_id),
        env=cli_env(stack),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not done_rows(store, run_id):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run decided nothing within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert f"resume with --run-id {run_id}" in stderr  # announced when the run started
    before = done_rows(store, run_id)
    assert 0 < len(before) < KEYS
    assert not (tmp_path / f"reverify-{run_id}").exists()

    # Resumed: it continues where it stopped, and its report is the uninterrupted one.
    resumed = reverify(stack, tmp_path, *args, run_id=run_id)
    assert resumed.header == (KEYS, len(before))
    assert resumed.progress[0][0] >= len(before)
    assert sum(resumed.summary.values()) == KEYS
    assert without_decided_at(resumed.rows) == without_decided_at(whole.rows)
    after = done_rows(store, run_id)
    assert len(after) == KEYS
    assert {key_id: after[key_id] for key_id in before} == before

    # Resuming a finished run decides nothing again.
    again = reverify(stack, tmp_path, *args, run_id=run_id)
    assert again.header == (KEYS, KEYS)
    assert again.summary == resumed.summary
    assert again.rows == resumed.rows
    assert done_rows(store, run_id) == after


def test_reusing_a_run_id_with_other_parameters_is_a_usage_error(
    stack: Stack, population: Population, store: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id = new_run_id()
    first = reverify(stack, tmp_path, *population.new_policy(), *WINDOW, "--local", run_id=run_id)
    decided = done_rows(store, run_id)
    assert len(decided) == len(first.rows) == KEYS
    changes = {
        "policy": [*population.old_policy(), *WINDOW],
        "apply": [*population.new_policy(), *WINDOW, "--apply"],
        "filters": [*population.new_policy(), *WINDOW, "--only-app-id", APP_ID],
    }
    for change, args in changes.items():
        reused = reverify(stack, tmp_path, *args, "--local", run_id=run_id, check=False)
        assert reused.proc.returncode == 2, (change, reused.proc.stderr)
        assert "Traceback" not in reused.proc.stderr
    assert done_rows(store, run_id) == decided
    assert revocations(store).keys().isdisjoint(population.keys)


def test_a_lost_reverify_message_is_sent_again_from_the_ledger(
    stack: Stack,
    population: Population,
    store: sessionmaker[Session],
    celery_app: Celery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Re-verification publishes through the one publish function, ledger included: batches
    whose publish failed are entered in the Redis broker's ledger, sent again by its sweep,
    decided by the workers, and leave the ledger once their result is stored."""
    from kombu.exceptions import OperationalError as KombuOperationalError

    from worker.cli.progress import RunProgress
    from worker.cli.runs import Stalled, reverify_distributed
    from worker.core import PolicySpec
    from worker.queue.ledger import ledger_for
    from worker.queue.messaging import REVERIFY_TASK
    from worker.service.reverify import RunFilters, start_run

    run_id = "ledgered"
    with store() as session, session.begin():
        start_run(
            session,
            run_id=run_id,
            policy=PolicySpec(app_ids=(APP_ID,), root_pem=population.root.read_text()),
            filters=RunFilters(since=WINDOW_START, until=WINDOW_END),
            apply=False,
            now=datetime.now(UTC),
        )
    ledger = ledger_for(celery_app)
    assert ledger is not None
    before = ledger.pending()

    def broker_refuses(*args: Any, **kwargs: Any) -> None:
        raise KombuOperationalError("connection reset")

    monkeypatch.setattr(celery_app.amqp, "send_task_message", broker_refuses)
    with (
        RunProgress(description="reverify", total=KEYS) as progress,
        pytest.raises(Stalled),
    ):
        reverify_distributed(
            store, celery_app, run_id, 100, progress, stall_seconds=1, poll_seconds=0.1
        )
    monkeypatch.undo()
    assert done_rows(store, run_id) == {}
    entries = [json.loads(raw) for raw in ledger.client.hvals("appattest:ledger:jobs")]
    batches = [e["job"] for e in entries if e["task"] == REVERIFY_TASK]
    assert [b["runId"] for b in batches] == [run_id] * (KEYS // 100)
    assert all(b["v"] == 1 for b in batches)

    report = ledger.sweep(celery_app, resend_after=0)
    assert len(report.resent) >= KEYS // 100
    deadline = time.monotonic() + 60
    while len(done_rows(store, run_id)) < KEYS or ledger.pending() > before:
        assert time.monotonic() < deadline, "the resent batches were not decided"
        time.sleep(0.1)
    ledger.close()

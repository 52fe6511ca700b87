"""Orchestration of batch runs from the command line: re-verification and queued bulk import.

Both are resumable by a run id and show progress; the CLI commands are thin wrappers.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from worker.contract import VerificationResult, kind_of
from worker.core import Reason
from worker.ledger import ledger_for
from worker.lines import parse_line
from worker.messaging import RefreshReceipts, ReverifyBatch, VerifyOne, publish, read_task_metas
from worker.progress import RunProgress
from worker.service.refresh_runs import run_state as refresh_run_state
from worker.service.reverify import Reverifier, iter_pending_batches, results, run_state
from worker.store import refresh_runs

REPORT_COLUMNS = ("keyId", "ok", "reason", "detail", "appId", "environment", "decidedAt")


class Stalled(RuntimeError):
    """The workers made no progress for longer than allowed."""


def reverify_local(
    sessions: sessionmaker[Session],
    reverifier: Reverifier,
    run_id: str,
    batch_size: int,
    progress: RunProgress,
) -> None:
    """Decide every pending key of the run in this process."""
    for batch in iter_pending_batches(sessions, run_id, batch_size):
        reverifier.decide_batch(run_id, batch)
        with sessions() as session:
            progress.update(run_state(session, run_id).done)


def reverify_distributed(
    sessions: sessionmaker[Session],
    app: Celery,
    run_id: str,
    batch_size: int,
    progress: RunProgress,
    *,
    stall_seconds: float,
    poll_seconds: float = 0.5,
) -> None:
    """Enqueue every pending key of the run in batches, then wait until the workers are done.

    Raises ``Stalled`` when the done count does not move for ``stall_seconds``: the run can be
    resumed with the same id once workers are running.

    Every batch is entered in the ledger when the broker needs one, like the API's jobs: a
    lost message is sent again (deciding a (run, key) twice is harmless).
    """
    ledger = ledger_for(app)
    try:
        with app.producer_or_acquire() as producer:
            for batch in iter_pending_batches(sessions, run_id, batch_size):
                message = ReverifyBatch(run_id=run_id, key_ids=tuple(batch))
                publish(app, str(uuid.uuid4()), message, ledger=ledger, producer=producer)
    finally:
        if ledger is not None:
            ledger.close()
    last_done, last_change = -1, time.monotonic()
    while True:
        with sessions() as session:
            state = run_state(session, run_id)
        progress.update(state.done)
        if state.pending == 0:
            return
        if state.done != last_done:
            last_done, last_change = state.done, time.monotonic()
        elif time.monotonic() - last_change > stall_seconds:
            raise Stalled(f"no key was decided for {stall_seconds:.0f} s")
        time.sleep(poll_seconds)


def reverify_rows(sessions: sessionmaker[Session], run_id: str) -> Iterator[dict[str, Any]]:
    """The run's per-key results, as report rows."""
    with sessions() as session:
        for row in results(session, run_id):
            yield {
                "keyId": row.key_id,
                "ok": row.ok,
                "reason": row.reason,
                "detail": row.detail,
                "appId": row.app_id,
                "environment": row.environment,
                "decidedAt": row.decided_at.isoformat() if row.decided_at else None,
            }


# Queued bulk import ------------------------------------------------------------------------


@dataclass
class _Line:
    number: int
    body: dict[str, Any]
    job_id: str
    key: str


def _job_id(run_id: str, number: int) -> str:
    # Deterministic per run and line, so a resumed run finds the verdicts it already has.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"appattest-import:{run_id}:{number}"))


def verify_queued(
    lines: Iterator[bytes | None],
    app: Celery,
    run_id: str,
    emit: Callable[[int, VerificationResult], None],
    *,
    progress: RunProgress,
    at: datetime | None = None,
    max_in_flight: int = 1000,
    poll_seconds: float = 0.05,
    job_timeout: float = 600.0,
) -> None:
    """Verify plugin bodies through the workers, emitting results in input order.

    Lines of one keyId run one after another, in input order, so a registration makes its key
    known to the assertions after it; lines of different keys run in parallel. A line's job id
    is derived from the run id and its number: running the same file again with the same run
    id returns the verdicts already decided instead of deciding them again.
    """
    backend = app.backend
    # Entered in the ledger before publishing, like the producer's jobs (see worker.ledger).
    ledger = ledger_for(app)
    ready: dict[int, VerificationResult] = {}
    waiting_by_key: dict[str, deque[_Line]] = {}
    runnable: deque[_Line] = deque()
    for number, raw in enumerate(lines, start=1):
        line = parse_line(raw)
        if line.body is None or line.request is None:
            assert line.rejection is not None
            ready[number] = line.rejection
            continue
        key = line.request.key_id
        item = _Line(number=number, body=line.body, job_id=_job_id(run_id, number), key=key)
        if key in waiting_by_key:
            waiting_by_key[key].append(item)
        else:
            waiting_by_key[key] = deque()
            runnable.append(item)
    in_flight: dict[str, tuple[_Line, float]] = {}
    next_out = 1
    done = 0

    def flush() -> None:
        nonlocal next_out
        while next_out in ready:
            emit(next_out, ready.pop(next_out))
            next_out += 1

    def finish(item: _Line, result: VerificationResult) -> None:
        nonlocal done
        ready[item.number] = result
        done += 1
        queue = waiting_by_key[item.key]
        if queue:
            runnable.append(queue.popleft())

    done = len(ready)
    flush()
    while runnable or in_flight:
        while runnable and len(in_flight) < max_in_flight:
            item = runnable.popleft()
            meta = backend.get_task_meta(item.job_id)
            if meta.get("status") == "SUCCESS":
                finish(item, VerificationResult.model_validate(meta["result"]))
                continue
            job = VerifyOne(body=item.body, challenges_given=True, at=at)
            publish(app, item.job_id, job, ledger=ledger)
            in_flight[item.job_id] = (item, time.monotonic())
        metas = read_task_metas(backend, list(in_flight))
        for job_id, (item, sent) in list(in_flight.items()):
            meta = metas[job_id]
            status = meta.get("status")
            if status == "SUCCESS":
                del in_flight[job_id]
                finish(item, VerificationResult.model_validate(meta["result"]))
            elif status == "FAILURE" or time.monotonic() - sent > job_timeout:
                del in_flight[job_id]
                finish(
                    item,
                    VerificationResult.rejection(
                        kind=kind_of(item.body),
                        key_id=item.key,
                        reason=Reason.INTERNAL_ERROR,
                        detail="the job failed or timed out in the queue",
                    ),
                )
        flush()
        progress.update(done)
        if in_flight:
            time.sleep(poll_seconds)
    flush()
    progress.update(done)
    if ledger is not None:
        ledger.close()


# Receipt refresh runs ------------------------------------------------------------------------

REFRESH_REPORT_COLUMNS = ("keyId", "outcome", "reason", "riskMetric", "detail", "decidedAt")
# How long a key handed to the workers is not handed out again by another run or the periodic
# refresh (deciding it sets its real next refresh; a key whose message was lost is due again).
CLAIM_LEASE = timedelta(minutes=15)


class RunStopped(RuntimeError):
    """The run was stopped by a worker: Apple refused the DeviceCheck token."""


def publish_refresh(
    sessions: sessionmaker[Session],
    app: Celery,
    run_id: str | None,
    key_ids: Iterable[list[str]],
    *,
    now: datetime,
) -> int:
    """Hand batches of keys to the receipts queue (``RefreshReceipts`` through ``publish``),
    claiming each batch first (see ``CLAIM_LEASE``); return how many keys were published.

    Without the ledger: the run's pending rows and the keys' due times in PostgreSQL are what
    brings a lost message's keys back (a resumed run, the periodic refresh), not a resend."""
    published = 0
    with app.producer_or_acquire() as producer:
        for batch in key_ids:
            with sessions() as session, session.begin():
                refresh_runs.claim_keys(session, batch, now + CLAIM_LEASE)
            message = RefreshReceipts(run_id=run_id, key_ids=tuple(batch))
            publish(app, str(uuid.uuid4()), message, ledger=None, producer=producer)
            published += len(batch)
    return published


def refresh_distributed(
    sessions: sessionmaker[Session],
    app: Celery,
    run_id: str,
    batch_size: int,
    progress: RunProgress,
    *,
    stall_seconds: float,
    poll_seconds: float = 0.5,
) -> None:
    """Hand every pending key of the run to the workers in batches, then wait until all are
    decided. Raises ``RunStopped`` when a worker stopped the run (401) and ``Stalled`` when
    nothing was decided for ``stall_seconds``; either way the run can be resumed by its id."""

    def batches() -> Iterator[list[str]]:
        # Read all pending ids first (paged): publishing claims rows as it goes.
        with sessions() as session:
            pending = list(refresh_runs.iter_pending_batches(session, run_id, batch_size))
        yield from pending

    publish_refresh(sessions, app, run_id, batches(), now=datetime.now(UTC))
    last_done, last_change = -1, time.monotonic()
    while True:
        with sessions() as session:
            state = refresh_run_state(session, run_id)
        progress.update(state.done)
        if state.stopped_reason is not None:
            raise RunStopped(state.stopped_reason)
        if state.pending == 0:
            return
        if state.done != last_done:
            last_done, last_change = state.done, time.monotonic()
        elif time.monotonic() - last_change > stall_seconds:
            raise Stalled(f"no key was decided for {stall_seconds:.0f} s")
        time.sleep(poll_seconds)


def refresh_rows(sessions: sessionmaker[Session], run_id: str) -> Iterator[dict[str, Any]]:
    """The run's per-key results, as report rows (a key still pending reads ``pending``)."""
    with sessions() as session:
        for row in refresh_runs.results(session, run_id):
            yield {
                "keyId": row.key_id,
                "outcome": row.outcome or row.status,
                "reason": row.reason,
                "riskMetric": row.risk_metric,
                "detail": row.detail,
                "decidedAt": row.decided_at.isoformat() if row.decided_at else None,
            }


def refresh_summary_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """A refresh report row's line in the summary: its outcome and reason."""
    return str(row.get("outcome")), str(row.get("reason") or "-")

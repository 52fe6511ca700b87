"""Orchestration of batch runs from the command line: re-verification and queued bulk import.

Both are resumable by a run id and show progress; the CLI commands are thin wrappers.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from worker.cli.lines import parse_line
from worker.cli.progress import RunProgress
from worker.contract import VerificationResult, kind_of
from worker.core import Reason
from worker.queue.ledger import Ledger, ledger_for
from worker.queue.messaging import (
    ReverifyBatch,
    VerifyOne,
    publish,
    read_task_metas,
)
from worker.queue.schedule import publish_refresh
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
    _watch_run(
        lambda: _state_of(sessions, run_state, run_id), progress, stall_seconds, poll_seconds
    )


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


@dataclass
class _QueuedRun:
    """One ``verify --queue`` run: the lines waiting behind an earlier line of their key, the
    lines ready to send, the jobs in flight and the verdicts not yet emitted."""

    app: Celery
    run_id: str
    emit: Callable[[int, VerificationResult], None]
    at: datetime | None
    ledger: Ledger | None
    ready: dict[int, VerificationResult] = field(default_factory=dict)
    waiting_by_key: dict[str, deque[_Line]] = field(default_factory=dict)
    runnable: deque[_Line] = field(default_factory=deque)
    in_flight: dict[str, tuple[_Line, float]] = field(default_factory=dict)
    next_out: int = 1
    done: int = 0

    def plan(self, lines: Iterator[bytes | None]) -> None:
        """Read every line: a line that is not a plugin body has its verdict at once; the
        first line of each key is runnable, the others wait behind it."""
        for number, raw in enumerate(lines, start=1):
            line = parse_line(raw)
            if line.body is None or line.request is None:
                assert line.rejection is not None
                self.ready[number] = line.rejection
                continue
            key = line.request.key_id
            item = _Line(
                number=number, body=line.body, job_id=_job_id(self.run_id, number), key=key
            )
            if key in self.waiting_by_key:
                self.waiting_by_key[key].append(item)
            else:
                self.waiting_by_key[key] = deque()
                self.runnable.append(item)
        self.done = len(self.ready)

    def finish(self, item: _Line, result: VerificationResult) -> None:
        """Keep a line's verdict, and make the next line of its key runnable."""
        self.ready[item.number] = result
        self.done += 1
        queue = self.waiting_by_key[item.key]
        if queue:
            self.runnable.append(queue.popleft())

    def flush(self) -> None:
        """Emit the verdicts that are next in input order."""
        while self.next_out in self.ready:
            self.emit(self.next_out, self.ready.pop(self.next_out))
            self.next_out += 1

    def dispatch(self, max_in_flight: int) -> None:
        """Publish runnable lines up to ``max_in_flight``; a line decided by an earlier run
        with this run id is finished from its stored result instead."""
        backend = self.app.backend
        while self.runnable and len(self.in_flight) < max_in_flight:
            item = self.runnable.popleft()
            meta = backend.get_task_meta(item.job_id)
            if meta.get("status") == "SUCCESS":
                self.finish(item, VerificationResult.model_validate(meta["result"]))
                continue
            job = VerifyOne(body=item.body, challenges_given=True, at=self.at)
            publish(self.app, item.job_id, job, ledger=self.ledger)
            self.in_flight[item.job_id] = (item, time.monotonic())

    def collect(self, job_timeout: float) -> None:
        """Finish the jobs in flight whose result is in (one read for all); a job that failed
        or outlived ``job_timeout`` seconds ends as ``internal_error``."""
        metas = read_task_metas(self.app.backend, list(self.in_flight))
        for job_id, (item, sent) in list(self.in_flight.items()):
            meta = metas[job_id]
            status = meta.get("status")
            if status == "SUCCESS":
                del self.in_flight[job_id]
                self.finish(item, VerificationResult.model_validate(meta["result"]))
            elif status == "FAILURE" or time.monotonic() - sent > job_timeout:
                del self.in_flight[job_id]
                failed = VerificationResult.rejection(
                    kind=kind_of(item.body),
                    key_id=item.key,
                    reason=Reason.INTERNAL_ERROR,
                    detail="the job failed or timed out in the queue",
                )
                self.finish(item, failed)


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
    # Entered in the ledger before publishing, like the producer's jobs (see worker.queue.ledger).
    run = _QueuedRun(app, run_id, emit, at, ledger_for(app))
    try:
        run.plan(lines)
        run.flush()
        while run.runnable or run.in_flight:
            run.dispatch(max_in_flight)
            run.collect(job_timeout)
            run.flush()
            progress.update(run.done)
            if run.in_flight:
                time.sleep(poll_seconds)
        run.flush()
        progress.update(run.done)
    finally:
        if run.ledger is not None:
            run.ledger.close()


# Receipt refresh runs ------------------------------------------------------------------------

REFRESH_REPORT_COLUMNS = ("keyId", "outcome", "reason", "riskMetric", "detail", "decidedAt")


class RunStopped(RuntimeError):
    """The run was stopped by a worker: Apple refused the DeviceCheck token."""


class _RunState(Protocol):
    @property
    def done(self) -> int: ...

    @property
    def pending(self) -> int: ...


_S = TypeVar("_S", bound=_RunState)


def _state_of(
    sessions: sessionmaker[Session], read: Callable[[Session, str], _S], run_id: str
) -> _S:
    with sessions() as session:
        return read(session, run_id)


def _watch_run(
    read: Callable[[], _RunState],
    progress: RunProgress,
    stall_seconds: float,
    poll_seconds: float,
) -> None:
    """Follow a run the workers decide until no key is pending: progress as keys are decided,
    ``RunStopped`` when the run records why it stopped, ``Stalled`` when nothing was decided
    for ``stall_seconds``."""
    last_done, last_change = -1, time.monotonic()
    while True:
        state = read()
        progress.update(state.done)
        stopped = getattr(state, "stopped_reason", None)
        if stopped is not None:
            raise RunStopped(stopped)
        if state.pending == 0:
            return
        if state.done != last_done:
            last_done, last_change = state.done, time.monotonic()
        elif time.monotonic() - last_change > stall_seconds:
            raise Stalled(f"no key was decided for {stall_seconds:.0f} s")
        time.sleep(poll_seconds)


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
    _watch_run(
        lambda: _state_of(sessions, refresh_run_state, run_id),
        progress,
        stall_seconds,
        poll_seconds,
    )


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

"""Repository functions for receipt refresh runs and their per-key results.

A run's rows are written when it starts (one ``pending`` result per key it selected) and turned
to ``done`` with one conditional update per batch, so a batch delivered twice, or a run started
again after an interruption, never decides a key twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from worker.store.models import ReceiptState, RefreshResult, RefreshRun

# The states of a run's result for one key.
PENDING, DONE = "pending", "done"


@dataclass(frozen=True, slots=True)
class StoredRefreshRun:
    """A run as it was started, and whether it was stopped (and why)."""

    run_id: str
    filters: dict[str, Any]
    total: int
    stopped_reason: str | None


@dataclass(frozen=True, slots=True)
class RefreshRow:
    """One key's row in a run."""

    key_id: str
    status: str
    outcome: str | None
    reason: str | None
    detail: str | None
    risk_metric: int | None
    decided_at: datetime | None


def get_run(session: Session, run_id: str) -> StoredRefreshRun | None:
    """The run with this id, if it was started."""
    row = session.execute(
        select(
            RefreshRun.run_id, RefreshRun.filters, RefreshRun.total, RefreshRun.stopped_reason
        ).where(RefreshRun.run_id == run_id)
    ).first()
    return None if row is None else StoredRefreshRun(*row)


def create_run(
    session: Session,
    *,
    run_id: str,
    filters: dict[str, Any],
    key_ids: Sequence[str],
    now: datetime,
) -> None:
    """Store a new run with one pending row per key."""
    session.execute(
        insert(RefreshRun).values(
            run_id=run_id, created_at=now, filters=filters, total=len(key_ids)
        )
    )
    for start in range(0, len(key_ids), 5000):
        chunk = key_ids[start : start + 5000]
        session.execute(
            insert(RefreshResult),
            [{"run_id": run_id, "key_id": k, "status": PENDING} for k in chunk],
        )


def stop_run(session: Session, run_id: str, reason: str, now: datetime) -> None:
    """Mark the run stopped (its first stop reason is kept)."""
    session.execute(
        update(RefreshRun)
        .where(RefreshRun.run_id == run_id, RefreshRun.stopped_at.is_(None))
        .values(stopped_at=now, stopped_reason=reason[:300])
    )


def clear_stop(session: Session, run_id: str) -> None:
    """Let a stopped run go on (it is resumed after the configuration was fixed)."""
    session.execute(
        update(RefreshRun)
        .where(RefreshRun.run_id == run_id)
        .values(stopped_at=None, stopped_reason=None)
    )


def counts(session: Session, run_id: str) -> tuple[int, int]:
    """(total, done) of the run."""
    total = session.scalar(select(RefreshRun.total).where(RefreshRun.run_id == run_id))
    if total is None:
        raise KeyError(run_id)
    done = session.scalar(
        select(func.count())
        .select_from(RefreshResult)
        .where(RefreshResult.run_id == run_id, RefreshResult.status == DONE)
    )
    return int(total), int(done or 0)


def pending_keys(
    session: Session,
    run_id: str,
    key_ids: Sequence[str] | None = None,
    *,
    for_update: bool = False,
) -> list[str]:
    """The run's pending keys, in key order; among ``key_ids`` when given. ``for_update``
    locks their rows until the end of the transaction (on PostgreSQL ``FOR UPDATE``: a
    transaction that decided one of them first makes this one wait, then find it done); the
    locks are taken in key order (above the sort), so that two batches with keys in common
    never wait on each other in a cycle."""
    statement = (
        select(RefreshResult.key_id)
        .where(RefreshResult.run_id == run_id, RefreshResult.status == PENDING)
        .order_by(RefreshResult.key_id)
    )
    if key_ids is not None:
        statement = statement.where(RefreshResult.key_id.in_(list(key_ids)))
    if for_update:
        statement = statement.with_for_update()
    return list(session.scalars(statement))


def iter_pending_batches(session: Session, run_id: str, size: int) -> Iterator[list[str]]:
    """The run's pending keys in batches of ``size``, by key order (paged, bounded memory)."""
    after = ""
    while True:
        batch = list(
            session.scalars(
                select(RefreshResult.key_id)
                .where(
                    RefreshResult.run_id == run_id,
                    RefreshResult.status == PENDING,
                    RefreshResult.key_id > after,
                )
                .order_by(RefreshResult.key_id)
                .limit(size)
            )
        )
        if not batch:
            return
        yield batch
        after = batch[-1]


_RESULTS = RefreshResult.__table__
assert isinstance(_RESULTS, Table)
_FINISH = (
    update(_RESULTS)
    .where(
        _RESULTS.c.run_id == bindparam("r"),
        _RESULTS.c.key_id == bindparam("k"),
        _RESULTS.c.status == PENDING,
    )
    .values(
        status=DONE,
        outcome=bindparam("outcome"),
        reason=bindparam("reason"),
        detail=bindparam("detail"),
        risk_metric=bindparam("risk_metric"),
        decided_at=bindparam("decided_at"),
    )
)


def finish_results(
    session: Session, run_id: str, rows: Sequence[dict[str, Any]], now: datetime
) -> None:
    """Turn these keys' pending rows to done with their outcome (``key_id``, ``outcome``,
    ``reason``, ``detail``, ``risk_metric``); rows already done are left as they are."""
    if not rows:
        return
    session.execute(
        _FINISH,
        [
            {
                "r": run_id,
                "k": row["key_id"],
                "outcome": row["outcome"],
                "reason": row.get("reason"),
                "detail": (row.get("detail") or "")[:300] or None,
                "risk_metric": row.get("risk_metric"),
                "decided_at": now,
            }
            for row in rows
        ],
    )


def results(session: Session, run_id: str) -> Iterator[RefreshRow]:
    """Every row of the run, in key order (streamed)."""
    statement = (
        select(
            RefreshResult.key_id,
            RefreshResult.status,
            RefreshResult.outcome,
            RefreshResult.reason,
            RefreshResult.detail,
            RefreshResult.risk_metric,
            RefreshResult.decided_at,
        )
        .where(RefreshResult.run_id == run_id)
        .order_by(RefreshResult.key_id)
        .execution_options(yield_per=2000)
    )
    for row in session.execute(statement):
        yield RefreshRow(*row)


def claim_keys(session: Session, key_ids: Sequence[str], until: datetime) -> None:
    """Push these keys' next refresh to ``until`` as they are handed to the workers, so that
    neither the periodic refresh nor another run hands them out again meanwhile; deciding a
    key sets its real next refresh. A key whose message is lost is due again at ``until``."""
    if not key_ids:
        return
    session.execute(
        update(ReceiptState)
        .where(ReceiptState.key_id.in_(list(key_ids)))
        .values(next_refresh_at=until)
    )

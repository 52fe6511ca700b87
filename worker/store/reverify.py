"""Repository functions for re-verification runs and their per-key results.

A run's rows are written when it starts (one ``pending`` result per key it covers) and turned
to ``done`` by ``bulk.finish_reverify_results``; these functions create runs and read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, insert, literal, select, update
from sqlalchemy.orm import Session

from worker.store.models import DeviceKey, ReverifyResult, ReverifyRun

# The states of a run's result for one key.
PENDING, DONE = "pending", "done"


@dataclass(frozen=True)
class RunFilters:
    """Which stored registrations a run covers; empty means all."""

    app_ids: tuple[str, ...] = ()
    environment: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "app_ids": list(self.app_ids),
            "environment": self.environment,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }

    def where(self) -> list[ColumnElement[bool]]:
        """The conditions on ``device_keys`` that select the covered keys."""
        clauses: list[ColumnElement[bool]] = []
        if self.app_ids:
            clauses.append(DeviceKey.app_id.in_(self.app_ids))
        if self.environment:
            clauses.append(DeviceKey.environment == self.environment)
        if self.since:
            clauses.append(DeviceKey.verified_at >= self.since)
        if self.until:
            clauses.append(DeviceKey.verified_at < self.until)
        return clauses


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run as it was started: its policy and filters (JSON), --apply, and its key count."""

    run_id: str
    apply: bool
    policy: dict[str, Any]
    filters: dict[str, Any]
    total: int


def get_run(session: Session, run_id: str) -> StoredRun | None:
    """The run with this id, if it was started."""
    row = session.execute(
        select(
            ReverifyRun.run_id,
            ReverifyRun.apply,
            ReverifyRun.policy,
            ReverifyRun.filters,
            ReverifyRun.total,
        ).where(ReverifyRun.run_id == run_id)
    ).first()
    return None if row is None else StoredRun(*row)


def create_run(
    session: Session,
    *,
    run_id: str,
    apply: bool,
    policy: dict[str, Any],
    filters: RunFilters,
    now: datetime,
) -> int:
    """Create a run and one pending result for each stored key its filters cover, in the
    caller's transaction; return how many keys it covers. The id must be new."""
    session.execute(
        insert(ReverifyRun).values(
            run_id=run_id,
            created_at=now,
            apply=apply,
            policy=policy,
            filters=filters.to_json(),
            total=0,
        )
    )
    snapshot = select(DeviceKey.key_id).where(*filters.where())
    session.execute(
        insert(ReverifyResult).from_select(
            ["run_id", "key_id", "status"],
            select(
                literal(run_id, ReverifyResult.run_id.type),
                snapshot.subquery().c.key_id,
                literal(PENDING, ReverifyResult.status.type),
            ),
        )
    )
    total = int(
        session.scalar(
            select(func.count()).select_from(ReverifyResult).where(ReverifyResult.run_id == run_id)
        )
        or 0
    )
    session.execute(update(ReverifyRun).where(ReverifyRun.run_id == run_id).values(total=total))
    return total


def count_done(session: Session, run_id: str) -> int:
    """How many of the run's keys are decided."""
    done = session.scalar(
        select(func.count())
        .select_from(ReverifyResult)
        .where(ReverifyResult.run_id == run_id, ReverifyResult.status == DONE)
    )
    return int(done or 0)


def pending_key_ids(session: Session, run_id: str, *, after: str = "", limit: int) -> list[str]:
    """The next pending keys of a run, in key order after ``after``."""
    return list(
        session.scalars(
            select(ReverifyResult.key_id)
            .where(
                ReverifyResult.run_id == run_id,
                ReverifyResult.status == PENDING,
                ReverifyResult.key_id > after,
            )
            .order_by(ReverifyResult.key_id)
            .limit(limit)
        )
    )


def decided_results(session: Session, run_id: str) -> Iterator[ReverifyResult]:
    """Every decided result of a run, in key order, read a thousand rows at a time."""
    yield from session.scalars(
        select(ReverifyResult)
        .where(ReverifyResult.run_id == run_id, ReverifyResult.status == DONE)
        .order_by(ReverifyResult.key_id)
        .execution_options(yield_per=1000)
    )

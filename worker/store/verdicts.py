"""Repository functions for recorded verdicts (the audit trail and job idempotency)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from worker.store._insert import insert_if_absent
from worker.store.models import Verdict


def get_verdict(session: Session, job_id: str) -> dict[str, Any] | None:
    """The recorded result of a job, if it was decided before."""
    row = session.get(Verdict, job_id)
    return None if row is None else dict(row.result)


def record_verdict(
    session: Session,
    *,
    job_id: str,
    kind: str,
    key_id: str | None,
    app_id: str | None,
    ok: bool,
    reason: str | None,
    result: dict[str, Any],
    decided_at: datetime,
) -> bool:
    """Record a job's verdict in the caller's transaction.

    Returns False when the job already has one (a concurrent delivery of the same job got
    there first); the caller must then roll back and return the recorded verdict.
    """
    return insert_if_absent(
        session,
        Verdict,
        {
            "job_id": job_id,
            "kind": kind,
            "key_id": key_id,
            "app_id": app_id,
            "ok": ok,
            "reason": reason,
            "result": result,
            "decided_at": decided_at,
        },
    )

"""Repository functions for receipt states and the risk metric history.

Each takes a session and plain values and works inside the caller's transaction; reads and
writes are set-at-a-time, so a refresh batch costs a few statements whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.store.models import DeviceKey, ReceiptState, RiskMetricReading

# Outcomes after which a key is not refreshed again (Apple holds no more data for it).
STALE_OUTCOME = "receipt_stale"


@dataclass(frozen=True)
class RefreshTarget:
    """What refreshing one key needs: its app, environment, attestation (for the credential
    certificate), the receipt to send, and its revocation."""

    key_id: str
    app_id: str
    environment: str
    attestation: bytes
    receipt: bytes
    created_at: datetime | None
    not_before: datetime | None
    expires_at: datetime | None
    outcome: str | None
    revoked: bool
    # Whether the key has a receipt_states row (keys stored before it existed may not).
    has_state: bool


@dataclass(frozen=True)
class ReceiptUpdate:
    """What one refresh decided about a key. ``receipt`` and the dates are set only when a
    verified new receipt replaces the stored one; ``risk_metric`` then goes to the history."""

    key_id: str
    outcome: str
    detail: str | None
    next_refresh_at: datetime | None
    receipt: bytes | None = None
    receipt_type: str | None = None
    created_at: datetime | None = None
    not_before: datetime | None = None
    expires_at: datetime | None = None
    risk_metric: int | None = None


@dataclass(frozen=True)
class KeyState:
    """A key as callers may see it: registration, counter, revocation, receipt and risk."""

    key_id: str
    app_id: str
    environment: str
    registered_at: datetime
    counter: int
    revoked_at: datetime | None
    revoked_reason: str | None
    receipt_type: str | None
    receipt_created_at: datetime | None
    receipt_not_before: datetime | None
    receipt_expires_at: datetime | None
    risk_metric: int | None
    risk_metric_at: datetime | None
    refreshed_at: datetime | None
    refresh_outcome: str | None
    next_refresh_at: datetime | None
    history: tuple[tuple[datetime, int], ...]


def insert_receipt_states(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Store the first receipt state of newly registered keys; a key that has one keeps it."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        module = postgresql if dialect == "postgresql" else sqlite
        session.execute(module.insert(ReceiptState).on_conflict_do_nothing(), list(rows))
        return
    session.execute(insert(ReceiptState), list(rows))


def get_refresh_targets(session: Session, key_ids: Iterable[str]) -> dict[str, RefreshTarget]:
    """The keys among ``key_ids`` that are stored, with their current receipt state. A key
    without a state row (registered by an older release) sends its attestation receipt."""
    wanted = list(dict.fromkeys(key_ids))
    if not wanted:
        return {}
    rows = session.execute(
        select(
            DeviceKey.key_id,
            DeviceKey.app_id,
            DeviceKey.environment,
            DeviceKey.attestation,
            DeviceKey.receipt,
            DeviceKey.revoked_at,
            ReceiptState.receipt,
            ReceiptState.not_before,
            ReceiptState.expires_at,
            ReceiptState.outcome,
            ReceiptState.key_id,
            ReceiptState.created_at,
        )
        .outerjoin(ReceiptState, ReceiptState.key_id == DeviceKey.key_id)
        .where(DeviceKey.key_id.in_(wanted))
    ).all()
    return {
        row[0]: RefreshTarget(
            key_id=row[0],
            app_id=row[1],
            environment=row[2],
            attestation=row[3],
            receipt=row[6] if row[6] is not None else row[4],
            created_at=row[11],
            not_before=row[7],
            expires_at=row[8],
            outcome=row[9],
            revoked=row[5] is not None,
            has_state=row[10] is not None,
        )
        for row in rows
    }


def due_key_ids(
    session: Session,
    *,
    now: datetime,
    after: str = "",
    limit: int = 1000,
    app_ids: Sequence[str] = (),
    environment: str | None = None,
    due_only: bool = True,
) -> list[str]:
    """Key ids to refresh, in key order after ``after`` (for paging): not revoked, not
    stale, and with ``due_only`` due at ``now`` (never refreshed, or their time has come)."""
    statement = (
        select(DeviceKey.key_id)
        .outerjoin(ReceiptState, ReceiptState.key_id == DeviceKey.key_id)
        .where(DeviceKey.key_id > after, DeviceKey.revoked_at.is_(None))
        .where(or_(ReceiptState.outcome.is_(None), ReceiptState.outcome != STALE_OUTCOME))
        .order_by(DeviceKey.key_id)
        .limit(limit)
    )
    if app_ids:
        statement = statement.where(DeviceKey.app_id.in_(list(app_ids)))
    if environment is not None:
        statement = statement.where(DeviceKey.environment == environment)
    if due_only:
        statement = statement.where(
            or_(ReceiptState.next_refresh_at.is_(None), ReceiptState.next_refresh_at <= now)
        )
    return list(session.scalars(statement))


# Core statements on the table (not the ORM entity): executed with a list of rows they are one
# executemany, where the ORM would want the primary key among the parameters.
_STATES = ReceiptState.__table__
assert isinstance(_STATES, Table)
_OUTCOME_ONLY = (
    update(_STATES)
    .where(_STATES.c.key_id == bindparam("k"))
    .values(
        outcome=bindparam("outcome"),
        detail=bindparam("detail"),
        next_refresh_at=bindparam("next_refresh_at"),
    )
)
_NEW_RECEIPT = (
    update(_STATES)
    .where(_STATES.c.key_id == bindparam("k"))
    .values(
        outcome=bindparam("outcome"),
        detail=bindparam("detail"),
        next_refresh_at=bindparam("next_refresh_at"),
        receipt=bindparam("receipt"),
        receipt_type=bindparam("receipt_type"),
        created_at=bindparam("created_at"),
        not_before=bindparam("not_before"),
        expires_at=bindparam("expires_at"),
        risk_metric=bindparam("risk_metric"),
        measured_at=bindparam("refreshed_at"),
        refreshed_at=bindparam("refreshed_at"),
    )
)


def save_refreshes(
    session: Session,
    updates: Sequence[ReceiptUpdate],
    targets: dict[str, RefreshTarget],
    at: datetime,
) -> None:
    """Record what a batch of refreshes decided: new receipts replace the stored ones (and
    their risk metric joins the history), other outcomes only update the outcome and the next
    attempt. Keys without a state row get one."""
    missing = [
        {"key_id": u.key_id, "receipt": targets[u.key_id].receipt}
        for u in updates
        if u.key_id in targets and not targets[u.key_id].has_state
    ]
    insert_receipt_states(session, missing)
    plain = [
        {
            "k": u.key_id,
            "outcome": u.outcome,
            "detail": (u.detail or "")[:300] or None,
            "next_refresh_at": u.next_refresh_at,
        }
        for u in updates
        if u.receipt is None
    ]
    fresh = [
        {
            "k": u.key_id,
            "outcome": u.outcome,
            "detail": (u.detail or "")[:300] or None,
            "next_refresh_at": u.next_refresh_at,
            "receipt": u.receipt,
            "receipt_type": u.receipt_type,
            "created_at": u.created_at,
            "not_before": u.not_before,
            "expires_at": u.expires_at,
            "risk_metric": u.risk_metric,
            "refreshed_at": at,
        }
        for u in updates
        if u.receipt is not None
    ]
    if plain:
        session.execute(_OUTCOME_ONLY, plain)
    if fresh:
        session.execute(_NEW_RECEIPT, fresh)
    readings = [
        {"key_id": u.key_id, "measured_at": at, "risk_metric": u.risk_metric}
        for u in updates
        if u.receipt is not None and u.risk_metric is not None
    ]
    if readings:
        session.execute(insert(RiskMetricReading), readings)


def get_risk_metrics(
    session: Session, key_ids: Iterable[str]
) -> dict[str, tuple[int, datetime | None]]:
    """The current risk metric of each key among ``key_ids`` that has one, and when it was
    measured."""
    wanted = list(dict.fromkeys(key_ids))
    if not wanted:
        return {}
    rows = session.execute(
        select(ReceiptState.key_id, ReceiptState.risk_metric, ReceiptState.measured_at).where(
            ReceiptState.key_id.in_(wanted), ReceiptState.risk_metric.is_not(None)
        )
    ).all()
    return {row[0]: (row[1], row[2]) for row in rows if row[1] is not None}


def get_key_state(
    session: Session, key_id: str, *, registered_by: str, history_limit: int = 100
) -> KeyState | None:
    """The state of one key with its newest ``history_limit`` risk metric readings (newest
    first), or None when no such key is stored or when ``registered_by`` (an API key's name)
    did not register it: one answer for both, so that an API key learns nothing of others'
    keys. A key registered without an API key (an operator's import) is nobody's to read."""
    key = session.get(DeviceKey, key_id)
    if key is None or key.registered_by is None or key.registered_by != registered_by:
        return None
    state = session.get(ReceiptState, key_id)
    readings = session.execute(
        select(RiskMetricReading.measured_at, RiskMetricReading.risk_metric)
        .where(RiskMetricReading.key_id == key_id)
        .order_by(RiskMetricReading.measured_at.desc())
        .limit(history_limit)
    ).all()
    return KeyState(
        key_id=key.key_id,
        app_id=key.app_id,
        environment=key.environment,
        registered_at=key.verified_at,
        counter=key.counter,
        revoked_at=key.revoked_at,
        revoked_reason=key.revoked_reason,
        receipt_type=state.receipt_type if state else None,
        receipt_created_at=state.created_at if state else None,
        receipt_not_before=state.not_before if state else None,
        receipt_expires_at=state.expires_at if state else None,
        risk_metric=state.risk_metric if state else None,
        risk_metric_at=state.measured_at if state else None,
        refreshed_at=state.refreshed_at if state else None,
        refresh_outcome=state.outcome if state else None,
        next_refresh_at=state.next_refresh_at if state else None,
        history=tuple((row[0], int(row[1])) for row in readings),
    )

"""SQLAlchemy models of the store: device keys, issued challenges, recorded verdicts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, LargeBinary, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.store.types import UTCDateTime

# Explicit constraint names keep migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class DeviceKey(Base):
    """One registered App Attest key: what its attestation proved, and its assertion counter."""

    __tablename__ = "device_keys"

    key_id: Mapped[str] = mapped_column(String(44), primary_key=True)
    app_id: Mapped[str] = mapped_column(String(300), index=True)
    environment: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    counter: Mapped[int] = mapped_column(BigInteger)
    receipt: Mapped[bytes] = mapped_column(LargeBinary)
    attestation: Mapped[bytes] = mapped_column(LargeBinary)
    # What the attestation's nonce covers besides authData; without it the attestation could
    # not be verified again. Null only for keys stored before it was kept.
    client_data_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Set by a re-verification run with --apply; assertions of a revoked key are refused.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_reason: Mapped[str | None] = mapped_column(String(40))
    revoked_by_run: Mapped[str | None] = mapped_column(String(64))
    # The instant the attestation was verified as of; re-verification uses it again, since
    # credential certificates live only days.
    verified_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    leaf_fingerprint: Mapped[bytes] = mapped_column(LargeBinary)
    intermediate_fingerprint: Mapped[bytes] = mapped_column(LargeBinary)
    # The name of the API key whose registration stored the key (``verdicts.submitted_by``):
    # only that API key may read the key's state. Null for keys registered without one (an
    # operator's import, or before it was kept and not found among the verdicts).
    registered_by: Mapped[str | None] = mapped_column(String(64))


class Challenge(Base):
    """A one-time challenge the producer issued. Only its SHA-256 is kept."""

    __tablename__ = "challenges"

    digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str | None] = mapped_column(String(44))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    used_by_job: Mapped[str | None] = mapped_column(String(64))


class Verdict(Base):
    """The verdict of one job, recorded in the transaction that acted on it.

    It is the audit trail (nothing in the API updates or deletes it) and what makes a
    redelivered job return its first verdict instead of running again.
    """

    __tablename__ = "verdicts"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str | None] = mapped_column(String(128), index=True)
    app_id: Mapped[str | None] = mapped_column(String(300))
    ok: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(40))
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The name (or fingerprint) of the API key that submitted the job; null for jobs queued
    # by an operator (bulk imports) or before it was recorded.
    submitted_by: Mapped[str | None] = mapped_column(String(64))
    # The X-Request-ID of the HTTP request that submitted the job (log correlation).
    request_id: Mapped[str | None] = mapped_column(String(64))


class IdempotencyKey(Base):
    """The job that a caller's ``Idempotency-Key`` first created, and what body it carried.

    Only hashes are kept: of the key (so that a caller's keys are not stored as given) and of
    the request (the kind and the plugin body), which a retry must match.
    """

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    job_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ReverifyRun(Base):
    """One re-verification run: what it checks against, and whether it revokes."""

    __tablename__ = "reverify_runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    apply: Mapped[bool] = mapped_column(Boolean)
    # The policy and filters, as JSON, so that a resumed run and every worker use exactly the
    # ones the run started with.
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    filters: Mapped[dict[str, Any]] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(BigInteger)


class ReverifyResult(Base):
    """One key's outcome in one run; ``status`` is pending until a worker decided it."""

    __tablename__ = "reverify_results"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(44), primary_key=True)
    status: Mapped[str] = mapped_column(String(8), index=True)
    ok: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(40))
    detail: Mapped[str | None] = mapped_column(String(500))
    app_id: Mapped[str | None] = mapped_column(String(300))
    environment: Mapped[str | None] = mapped_column(String(16))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ReceiptState(Base):
    """A key's current App Attest receipt and what its last exchange with Apple came to.

    ``receipt`` is what the next exchange sends: the attestation's receipt until Apple returns
    a fresh one, then the latest verified one. ``receipt_type``, ``created_at``, ``not_before``
    and ``expires_at`` are fields 6, 12, 19 and 21 of that receipt (null when it could not be
    parsed); ``risk_metric`` (17) is null until a refresh measured it. ``next_refresh_at`` is
    when the key is due; ``outcome`` is the last exchange's (``refreshed``, ``too_early``,
    ``receipt_stale``, ...).
    """

    __tablename__ = "receipt_states"

    key_id: Mapped[str] = mapped_column(String(44), primary_key=True)
    receipt: Mapped[bytes] = mapped_column(LargeBinary)
    receipt_type: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    risk_metric: Mapped[int | None] = mapped_column(BigInteger)
    measured_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(24))
    detail: Mapped[str | None] = mapped_column(String(300))
    next_refresh_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class RiskMetricReading(Base):
    """One risk metric Apple reported for a key, so that a rising metric can be seen."""

    __tablename__ = "risk_metric_history"

    key_id: Mapped[str] = mapped_column(String(44), primary_key=True)
    measured_at: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    risk_metric: Mapped[int] = mapped_column(BigInteger)


class RefreshRun(Base):
    """One ``appattest receipts refresh`` run: the keys it selected (its filters, as JSON) and,
    when it stopped before the end, why (Apple refused the token: a configuration error)."""

    __tablename__ = "refresh_runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    filters: Mapped[dict[str, Any]] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(BigInteger)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stopped_reason: Mapped[str | None] = mapped_column(String(300))


class RefreshResult(Base):
    """One key's outcome in one refresh run; ``status`` is pending until a worker decided it
    (a key Apple asked to retry later stays pending while its task retries)."""

    __tablename__ = "refresh_results"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(44), primary_key=True)
    status: Mapped[str] = mapped_column(String(8), index=True)
    outcome: Mapped[str | None] = mapped_column(String(24))
    reason: Mapped[str | None] = mapped_column(String(40))
    detail: Mapped[str | None] = mapped_column(String(300))
    risk_metric: Mapped[int | None] = mapped_column(BigInteger)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

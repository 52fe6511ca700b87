"""Set-at-a-time repository functions, so that a batch of jobs costs a few statements.

Each function takes a session and plain values and works inside the caller's transaction.
The conditional updates keep the guarantees of their one-row counterparts: a challenge is
claimed once, a counter only moves forward; ``RETURNING`` tells exactly which rows changed.
PostgreSQL gets one statement per call (``UPDATE ... FROM unnest(arrays)``); SQLite, which has
no arrays and no network round trip to save, runs one statement per row.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    LargeBinary,
    Table,
    Text,
    TextClause,
    bindparam,
    cast,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from worker.store.models import Challenge, DeviceKey, ReverifyResult, Verdict
from worker.store.receipts import get_risk_metrics

# PostgreSQL: one statement of fixed text whatever the batch size, its rows in one JSON
# parameter, so neither SQLAlchemy nor the driver parses, compiles or escapes anything per row
# (the driver's text form of a 200-element array costs more than the statement itself).
# Byte strings travel as hex.
_CONSUME_PG = text(
    """
    UPDATE challenges SET used_at = :now, used_by_job = claims.job_id
    FROM json_to_recordset(CAST(:claims AS json))
        AS claims(digest text, purpose text, key_id text, job_id text)
    WHERE challenges.digest = decode(claims.digest, 'hex')
      AND challenges.used_at IS NULL
      AND challenges.expires_at > :now
      AND challenges.purpose = claims.purpose
      AND (challenges.key_id IS NULL OR challenges.key_id = claims.key_id)
    RETURNING challenges.digest
    """
)
_ADVANCE_PG = text(
    """
    UPDATE device_keys SET counter = advances.counter
    FROM json_to_recordset(CAST(:advances AS json)) AS advances(key_id text, counter bigint)
    WHERE device_keys.key_id = advances.key_id AND device_keys.counter < advances.counter
    RETURNING device_keys.key_id
    """
)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _matching(session: Session, column: Any, values: list[Any]) -> Any:
    """``column IN values``; on PostgreSQL the values travel as one JSON array (bytes as hex),
    so the statement text is the same whatever the number of values."""
    if not is_postgresql(session):
        return column.in_(values)
    binary = isinstance(column.type, LargeBinary)
    document = _json([v.hex() for v in values] if binary else values)
    elements = func.json_array_elements_text(
        cast(bindparam(f"{column.key}_json", document, type_=Text), JSON)
    )
    return column.in_(select(func.decode(elements, "hex") if binary else elements))


def get_verdicts(session: Session, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Recorded results of the given jobs that were decided before."""
    ids = list(job_ids)
    if not ids:
        return {}
    statement = select(Verdict.job_id, Verdict.result).where(
        _matching(session, Verdict.job_id, ids)
    )
    return {job_id: dict(result) for job_id, result in session.execute(statement)}


def get_verdicts_of(
    session: Session, job_ids: Iterable[str]
) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Recorded verdicts of the given jobs, with the name of who submitted each."""
    ids = list(job_ids)
    if not ids:
        return {}
    statement = select(Verdict.job_id, Verdict.submitted_by, Verdict.result).where(
        _matching(session, Verdict.job_id, ids)
    )
    return {job_id: (by, dict(result)) for job_id, by, result in session.execute(statement)}


@dataclass(frozen=True, slots=True)
class IssuedChallenge:
    """What deciding a job needs of an issued challenge."""

    digest: bytes
    purpose: str
    key_id: str | None
    expires_at: datetime
    used_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What deciding a job needs of a registered key (not its receipt or attestation)."""

    key_id: str
    app_id: str
    environment: str
    public_key: bytes
    counter: int
    revoked_at: datetime | None
    revoked_reason: str | None
    revoked_by_run: str | None


_CHALLENGE_COLUMNS = [getattr(Challenge, f) for f in IssuedChallenge.__dataclass_fields__]
_KEY_COLUMNS = [getattr(DeviceKey, f) for f in StoredKey.__dataclass_fields__]


def get_challenges(session: Session, digests: Iterable[bytes]) -> dict[bytes, IssuedChallenge]:
    """Issued challenges by digest."""
    wanted = list(set(digests))
    if not wanted:
        return {}
    statement = select(*_CHALLENGE_COLUMNS).where(_matching(session, Challenge.digest, wanted))
    found = (IssuedChallenge(*row) for row in session.execute(statement))
    return {c.digest: c for c in found}


def get_keys(session: Session, key_ids: Iterable[str]) -> dict[str, StoredKey]:
    """Stored keys by keyId."""
    wanted = list(set(key_ids))
    if not wanted:
        return {}
    statement = select(*_KEY_COLUMNS).where(_matching(session, DeviceKey.key_id, wanted))
    found = (StoredKey(*row) for row in session.execute(statement))
    return {k.key_id: k for k in found}


@dataclass(frozen=True, slots=True)
class BatchReads:
    """What deciding a batch reads: recorded verdicts by job id, issued challenges by digest,
    stored keys by keyId, and the risk metric (with when it was measured) of the keys that
    have one."""

    verdicts: dict[str, dict[str, Any]]
    challenges: dict[bytes, IssuedChallenge]
    keys: dict[str, StoredKey]
    risks: dict[str, tuple[int, datetime | None]]


# PostgreSQL: every read a batch needs in one statement of fixed text (one round trip), each
# part an aggregate of its rows as JSON; byte strings travel as hex.
_BATCH_READS_PG = text(
    """
    SELECT
      (SELECT coalesce(json_agg(json_build_array(v.job_id, v.result)), '[]')
         FROM verdicts v
        WHERE v.job_id IN (SELECT json_array_elements_text(CAST(:job_ids AS json)))),
      (SELECT coalesce(json_agg(json_build_array(
                encode(c.digest, 'hex'), c.purpose, c.key_id, c.expires_at, c.used_at)), '[]')
         FROM challenges c
        WHERE c.digest IN (
              SELECT decode(json_array_elements_text(CAST(:digests AS json)), 'hex'))),
      (SELECT coalesce(json_agg(json_build_array(
                k.key_id, k.app_id, k.environment, encode(k.public_key, 'hex'), k.counter,
                k.revoked_at, k.revoked_reason, k.revoked_by_run, r.risk_metric, r.measured_at
              )), '[]')
         FROM device_keys k LEFT JOIN receipt_states r ON r.key_id = k.key_id
        WHERE k.key_id IN (SELECT json_array_elements_text(CAST(:key_ids AS json))))
    """
)


def _instant(value: str | None) -> datetime | None:
    """A ``timestamptz`` as PostgreSQL writes it in JSON (ISO 8601 with an offset), in UTC."""
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)


def read_batch(
    session: Session,
    job_ids: Sequence[str],
    digests: Iterable[bytes],
    key_ids: Iterable[str],
) -> BatchReads:
    """The recorded verdicts of ``job_ids``, the issued challenges of ``digests``, the stored
    keys of ``key_ids`` and their risk metrics: on PostgreSQL in one round trip, elsewhere
    with one statement each."""
    wanted_digests = list(set(digests))
    wanted_keys = list(set(key_ids))
    if not is_postgresql(session):
        return BatchReads(
            get_verdicts(session, job_ids),
            get_challenges(session, wanted_digests),
            get_keys(session, wanted_keys),
            get_risk_metrics(session, wanted_keys),
        )
    parameters = {
        "job_ids": _json(list(job_ids)),
        "digests": _json([d.hex() for d in wanted_digests]),
        "key_ids": _json(wanted_keys),
    }
    verdict_rows, challenge_rows, key_rows = session.execute(_BATCH_READS_PG, parameters).one()
    challenges = {}
    for digest, purpose, key_id, expires_at, used_at in challenge_rows:
        raw = bytes.fromhex(digest)
        expires = _instant(expires_at)
        assert expires is not None
        challenges[raw] = IssuedChallenge(raw, purpose, key_id, expires, _instant(used_at))
    keys: dict[str, StoredKey] = {}
    risks: dict[str, tuple[int, datetime | None]] = {}
    for row in key_rows:
        key_id, app_id, environment, public_key, counter = row[:5]
        revoked_at, revoked_reason, revoked_by_run, risk_metric, measured_at = row[5:]
        keys[key_id] = StoredKey(
            key_id,
            app_id,
            environment,
            bytes.fromhex(public_key),
            counter,
            _instant(revoked_at),
            revoked_reason,
            revoked_by_run,
        )
        if risk_metric is not None:
            risks[key_id] = (risk_metric, _instant(measured_at))
    return BatchReads(dict(verdict_rows), challenges, keys, risks)


@dataclass(frozen=True, slots=True)
class StoredRegistration:
    """What verifying a key's attestation again needs of its registration."""

    key_id: str
    app_id: str
    environment: str
    attestation: bytes
    client_data_hash: bytes | None
    verified_at: datetime


_REGISTRATION_COLUMNS = [getattr(DeviceKey, f) for f in StoredRegistration.__dataclass_fields__]


def get_registrations(session: Session, key_ids: Iterable[str]) -> dict[str, StoredRegistration]:
    """Stored registrations (attestation and when it was verified) by keyId."""
    wanted = list(set(key_ids))
    if not wanted:
        return {}
    statement = select(*_REGISTRATION_COLUMNS).where(_matching(session, DeviceKey.key_id, wanted))
    found = (StoredRegistration(*row) for row in session.execute(statement))
    return {r.key_id: r for r in found}


@dataclass(frozen=True)
class Claim:
    """A job's claim on a challenge: its digest, purpose, the job's keyId and the job id."""

    digest: bytes
    purpose: str
    key_id: str
    job_id: str


def consume_challenges(session: Session, claims: Sequence[Claim], now: datetime) -> set[bytes]:
    """Mark each claimed challenge used by its job if it is issued for that purpose and key,
    unused and unexpired; return the digests consumed. Digests must be distinct."""
    if not claims:
        return set()
    if is_postgresql(session):
        document = _json(
            [
                {
                    "digest": c.digest.hex(),
                    "purpose": c.purpose,
                    "key_id": c.key_id,
                    "job_id": c.job_id,
                }
                for c in claims
            ]
        )
        rows = session.execute(_CONSUME_PG, {"claims": document, "now": now})
        return {bytes(digest) for (digest,) in rows}
    consumed: set[bytes] = set()
    for claim in claims:
        statement = (
            update(Challenge)
            .where(
                Challenge.digest == claim.digest,
                Challenge.used_at.is_(None),
                Challenge.expires_at > now,
                Challenge.purpose == claim.purpose,
                or_(Challenge.key_id.is_(None), Challenge.key_id == claim.key_id),
            )
            .values(used_at=now, used_by_job=claim.job_id)
            .returning(Challenge.digest)
            .execution_options(synchronize_session=False)
        )
        consumed.update(session.scalars(statement))
    return consumed


def advance_counters(session: Session, updates: Sequence[tuple[str, int]]) -> set[str]:
    """Set each key's counter to its new value only where that is above the stored one;
    return the keys advanced. Keys must be distinct."""
    if not updates:
        return set()
    if is_postgresql(session):
        document = _json([{"key_id": k, "counter": c} for k, c in updates])
        rows = session.execute(_ADVANCE_PG, {"advances": document})
        return {key_id for (key_id,) in rows}
    advanced: set[str] = set()
    for key_id, counter in updates:
        statement = (
            update(DeviceKey)
            .where(DeviceKey.key_id == key_id, DeviceKey.counter < counter)
            .values(counter=counter)
            .returning(DeviceKey.key_id)
            .execution_options(synchronize_session=False)
        )
        advanced.update(session.scalars(statement))
    return advanced


# SQLite: one prepared statement run with every row's parameters, on the driver's cursor
# (no statement built, compiled or cached per row).
_ADVANCE_SQLITE = "UPDATE device_keys SET counter = ? WHERE key_id = ? AND counter < ?"


def advance_all_counters(session: Session, updates: Sequence[tuple[str, int]]) -> bool:
    """Set each key's counter to its new value where that is above the stored one; whether
    every key advanced (the caller rolls back otherwise). Keys must be distinct."""
    if not updates:
        return True
    if is_postgresql(session):
        return len(advance_counters(session, updates)) == len(updates)
    connection = session.connection()
    result = connection.exec_driver_sql(
        _ADVANCE_SQLITE, [(counter, key_id, counter) for key_id, counter in updates]
    )
    return result.rowcount == len(updates)


@functools.cache
def _recordset_insert(table: Table, columns: tuple[str, ...], returning: str) -> TextClause:
    """``INSERT ... SELECT FROM json_populate_recordset(rows) ON CONFLICT DO NOTHING
    RETURNING``: the rows travel as one JSON document, typed by the table's own row type, so a
    batch of any size is one parameter, one statement text and one round trip."""
    names = ", ".join(columns)
    return text(
        f"INSERT INTO {table.name} ({names}) "  # noqa: S608 - names from the model
        f"SELECT {names} FROM json_populate_recordset(NULL::{table.name}, CAST(:rows AS json)) "
        f"ON CONFLICT DO NOTHING RETURNING {returning}"
    )


def _json_value(value: Any) -> Any:
    """A column value as PostgreSQL reads it from JSON into the column's type."""
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, datetime):
        # As UTCDateTime does on the ORM path: a naive instant would be read in the server's
        # zone, so it is refused.
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass a timezone-aware instant")
        return value.isoformat()
    return value


def _insert_ignoring_conflicts(
    session: Session, model: type[Any], rows: Sequence[dict[str, Any]], returning: Any
) -> set[Any]:
    if not rows:
        return set()
    table: Table = model.__table__
    if is_postgresql(session):
        columns = tuple(rows[0])
        document = _json([{name: _json_value(row[name]) for name in columns} for row in rows])
        insert = _recordset_insert(table, columns, returning.key)
        return set(session.execute(insert, {"rows": document}).scalars())
    # SQLite: one statement executed with many parameter sets (multi-row INSERTs from a
    # compiled form SQLAlchemy caches).
    statement = sqlite.insert(table).on_conflict_do_nothing().returning(returning)
    return set(session.connection().execute(statement, list(rows)).scalars())


def insert_keys(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert new keys (``device_keys`` column values) unless their keyId exists; return the
    keyIds inserted. KeyIds must be distinct."""
    return _insert_ignoring_conflicts(session, DeviceKey, rows, DeviceKey.key_id)


def record_verdicts(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert verdict rows unless their job already has one; return the job ids recorded."""
    return _insert_ignoring_conflicts(session, Verdict, rows, Verdict.job_id)


# Re-verification: a batch's results and the revocations they apply, one statement each.
_FINISH_RESULTS_PG = text(
    """
    UPDATE reverify_results SET status = :done, ok = o.ok, reason = o.reason,
        detail = o.detail, app_id = o.app_id, environment = o.environment, decided_at = :now
    FROM json_to_recordset(CAST(:outcomes AS json)) AS o(
        key_id text, ok boolean, reason text, detail text, app_id text, environment text
    )
    WHERE reverify_results.run_id = :run_id AND reverify_results.key_id = o.key_id
      AND reverify_results.status = :pending
    RETURNING reverify_results.key_id
    """
)
_REVOKE_KEYS_PG = text(
    """
    UPDATE device_keys SET revoked_at = :now, revoked_reason = r.reason, revoked_by_run = :run_id
    FROM json_to_recordset(CAST(:revocations AS json)) AS r(key_id text, reason text)
    WHERE device_keys.key_id = r.key_id
    """
)


def finish_reverify_results(
    session: Session,
    run_id: str,
    outcomes: Sequence[dict[str, Any]],
    now: datetime,
    *,
    pending: str,
    done: str,
) -> set[str]:
    """Record each outcome (``key_id, ok, reason, detail, app_id, environment``) as the run's
    result for its key, only where that result is still ``pending``; return the keys
    recorded now (a key decided before, by a redelivered batch, is not)."""
    if not outcomes:
        return set()
    if is_postgresql(session):
        rows = session.execute(
            _FINISH_RESULTS_PG,
            {
                "outcomes": _json(list(outcomes)),
                "run_id": run_id,
                "now": now,
                "pending": pending,
                "done": done,
            },
        )
        return {key_id for (key_id,) in rows}
    finished: set[str] = set()
    for outcome in outcomes:
        values = {k: v for k, v in outcome.items() if k != "key_id"}
        changed = session.execute(
            update(ReverifyResult)
            .where(
                ReverifyResult.run_id == run_id,
                ReverifyResult.key_id == outcome["key_id"],
                ReverifyResult.status == pending,
            )
            .values(status=done, decided_at=now, **values)
            .returning(ReverifyResult.key_id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if changed is not None:
            finished.add(changed)
    return finished


def restore_keys(session: Session, key_ids: Sequence[str]) -> None:
    """Lift the revocation of these keys (those revoked)."""
    if not key_ids:
        return
    session.execute(
        update(DeviceKey)
        .where(
            _matching(session, DeviceKey.key_id, list(key_ids)),
            DeviceKey.revoked_at.is_not(None),
        )
        .values(revoked_at=None, revoked_reason=None, revoked_by_run=None)
        .execution_options(synchronize_session=False)
    )


def revoke_keys(
    session: Session, revocations: Sequence[tuple[str, str | None]], run_id: str, now: datetime
) -> None:
    """Revoke each key with its reason, by this run, as of ``now``."""
    if not revocations:
        return
    if is_postgresql(session):
        document = _json([{"key_id": k, "reason": r} for k, r in revocations])
        session.execute(_REVOKE_KEYS_PG, {"revocations": document, "run_id": run_id, "now": now})
        return
    for key_id, reason in revocations:
        session.execute(
            update(DeviceKey)
            .where(DeviceKey.key_id == key_id)
            .values(revoked_at=now, revoked_reason=reason, revoked_by_run=run_id)
            .execution_options(synchronize_session=False)
        )

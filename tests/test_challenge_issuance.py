"""``POST /v1/challenges`` under concurrency, on SQLite and on real PostgreSQL.

Requests go through the whole app (middleware, auth, the route) in-process over httpx's ASGI
transport, many at once on one event loop, so the challenges they ask for are written in
groups (``producer.issuer``). Each answered challenge must have exactly one stored row and be
usable once; when the write of a group fails, every request of that group gets the error and
none of its rows is stored.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session

from producer import create_app
from producer.ratelimit import RateLimiter
from worker.settings import Settings
from worker.store.bulk import Claim, consume_challenges
from worker.store.challenges import challenge_digest
from worker.store.db import create_store_engine, upgrade
from worker.store.models import Challenge

KEY = "issuance-key"
POISON = "poison"  # a keyId whose row the store refuses, see ``refusing_store``


@pytest.fixture
def store(store_url: str) -> Iterator[Engine]:
    engine = create_store_engine(store_url)
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def _settings(store: Engine) -> Settings:
    return Settings(
        api_keys=[SecretStr(KEY)],
        store_url=store.url.render_as_string(hide_password=False),
        broker_url="memory://",
        result_backend="cache+memory://",
    )


@asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """A client of the app (its lifespan running), and the app."""
    app = create_app(settings, rate_limiter=RateLimiter(rate=10_000, burst=10_000))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://issuance.test",
            headers={"Authorization": f"Bearer {KEY}"},
        ) as client:
            yield client, app


def _stored(store: Engine) -> dict[bytes, tuple[str, str | None, datetime]]:
    with Session(store) as session:
        rows = session.execute(
            select(Challenge.digest, Challenge.purpose, Challenge.key_id, Challenge.expires_at)
        )
        return {
            bytes(digest): (purpose, key_id, expires) for digest, purpose, key_id, expires in rows
        }


def _count_inserts(engine: Engine) -> list[int]:
    """Count the statements that insert challenges on ``engine``, with their parameter sets."""
    inserts: list[int] = []

    def seen(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO CHALLENGES"):
            inserts.append(len(params) if many else 1)

    event.listen(engine, "before_cursor_execute", seen)
    return inserts


def test_concurrent_requests_get_distinct_challenges_each_stored_once_and_usable_once(
    store: Engine,
) -> None:
    bodies: list[dict[str, str]] = [
        {"purpose": "registration"} if i % 2 else {"purpose": "assertion", "keyId": f"key{i}"}
        for i in range(50)
    ]

    async def scenario() -> tuple[list[httpx.Response], list[int]]:
        async with _client(_settings(store)) as (client, app):
            inserts = _count_inserts(app.state.resources.engine)
            answers = await asyncio.gather(
                *(client.post("/v1/challenges", json=body) for body in bodies)
            )
            return answers, inserts

    before = datetime.now(UTC)
    answers, inserts = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [201] * len(bodies), answers[0].text
    data = [a.json() for a in answers]
    challenges = [d["challenge"] for d in data]
    assert len(set(challenges)) == len(bodies)
    # The requests arrived together, so they were written in fewer statements than requests,
    # each statement holding every row of its group.
    assert len(inserts) < len(bodies) and sum(inserts) == len(bodies)

    stored = _stored(store)
    assert set(stored) == {challenge_digest(c) for c in challenges}  # one row each, hashed
    ttl = timedelta(seconds=_settings(store).challenge_ttl_seconds)
    for body, answer in zip(bodies, data, strict=True):
        assert set(answer) == {"challenge", "expiresAt", "purpose", "keyId"}
        assert answer["purpose"] == body["purpose"] and answer["keyId"] == body.get("keyId")
        purpose, key_id, expires = stored[challenge_digest(answer["challenge"])]
        assert (purpose, key_id) == (body["purpose"], body.get("keyId"))
        assert expires == datetime.fromisoformat(answer["expiresAt"])
        assert before + ttl <= expires <= datetime.now(UTC) + ttl

    # Each is usable once: a claim takes every one of them, a second claim takes none.
    claims = [
        Claim(
            digest=challenge_digest(answer["challenge"]),
            purpose=body["purpose"],
            key_id=body.get("keyId", "any-key"),
            job_id=f"job-{i}",
        )
        for i, (body, answer) in enumerate(zip(bodies, data, strict=True))
    ]
    now = datetime.now(UTC)
    for expected in ({c.digest for c in claims}, set()):
        with Session(store) as session, session.begin():
            assert consume_challenges(session, claims, now) == expected


def _refusing_store(store: Engine, kind: str) -> None:
    """Make the store refuse the row of keyId ``POISON`` with a database error: one that says
    it cannot take writes (``unavailable``) or a plain refusal (``refused``). Real errors from
    the server, raised by a trigger while the rows before it in the statement were written."""
    with store.begin() as connection:
        if store.dialect.name == "sqlite":
            # An error of the engine while it runs the statement (SQLITE_ERROR: an
            # OperationalError, as when the file cannot be written), or a constraint failure.
            action = (
                "SELECT json('not json');"
                if kind == "unavailable"
                else "SELECT RAISE(ABORT, 'refused');"
            )
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON challenges "
                    f"WHEN NEW.key_id = '{POISON}' BEGIN {action} END"
                )
            )
            return
        # disk_full (class 53, insufficient resources: an OperationalError), or the default
        # raise_exception code.
        code = "USING ERRCODE = 'disk_full'" if kind == "unavailable" else ""
        connection.execute(
            text(
                "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN RAISE EXCEPTION 'the store refuses this row' {code}; END $$"
            )
        )
        connection.execute(
            text(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON challenges FOR EACH ROW "
                f"WHEN (NEW.key_id = '{POISON}') EXECUTE FUNCTION refuse_poison()"
            )
        )


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("unavailable", 503, "service_unavailable"), ("refused", 500, "internal_error")],
)
def test_a_failed_group_write_answers_every_request_of_the_group_and_stores_none(
    store: Engine, kind: str, status: int, code: str
) -> None:
    """A first request's write is held in its thread while twenty more requests gather into the
    next group, one of them for a row the store refuses. That group is refused as a whole (503
    when the store cannot take writes, as when it is down; 500 otherwise) and none of its rows
    is stored, while the first request and a later one are issued."""
    _refusing_store(store, kind)
    entered, release = threading.Event(), threading.Event()
    group = [{"purpose": "registration"} for _ in range(19)]
    group.insert(7, {"purpose": "assertion", "keyId": POISON})

    async def scenario() -> tuple[httpx.Response, list[httpx.Response], httpx.Response]:
        async with _client(_settings(store)) as (client, app):
            engine: Engine = app.state.resources.engine

            def hold_first(*_args: Any) -> None:
                if not entered.is_set():
                    entered.set()
                    if not release.wait(60):
                        raise RuntimeError("the first write was never released")

            event.listen(engine, "before_cursor_execute", hold_first)
            first = asyncio.ensure_future(
                client.post("/v1/challenges", json={"purpose": "registration"})
            )
            await anyio.to_thread.run_sync(entered.wait, 60)
            grouped = [
                asyncio.ensure_future(client.post("/v1/challenges", json=body)) for body in group
            ]
            # Every request is now waiting on a write: the first one's, which is held, or the
            # next group's, which cannot start before it.
            await anyio.wait_all_tasks_blocked()
            release.set()
            answers = await asyncio.gather(*grouped)
            later = await client.post("/v1/challenges", json={"purpose": "registration"})
            return await first, list(answers), later

    first, answers, later = asyncio.run(scenario())
    assert first.status_code == 201, first.text
    for answer in answers:
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["code"] == code
    assert later.status_code == 201, later.text
    issued = {challenge_digest(r.json()["challenge"]) for r in (first, later)}
    assert set(_stored(store)) == issued


def test_a_write_stuck_behind_a_lock_answers_503_and_issuance_recovers(store: Engine) -> None:
    """A group's write that does not end (held here in its thread, as behind a migration's
    lock) does not hold its callers forever: they are answered 503 after the issuer's timeout,
    and once the write ends, issuance goes on."""
    from producer.errors import ApiError
    from producer.issuer import ChallengeIssuer
    from worker.store.challenges import Purpose

    entered, release = threading.Event(), threading.Event()

    def hold(*_args: Any) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(60)

    event.listen(store, "before_cursor_execute", hold)
    issuer = ChallengeIssuer(store, ttl=timedelta(minutes=5), timeout=0.2)

    async def scenario() -> str:
        with pytest.raises(ApiError) as refused:
            await issuer.issue(purpose=Purpose.REGISTRATION, key_id=None)
        assert (refused.value.status, refused.value.code) == (503, "service_unavailable")
        release.set()
        issued = await issuer.issue(purpose=Purpose.REGISTRATION, key_id=None)
        return issued.challenge

    challenge = asyncio.run(scenario())
    assert challenge_digest(challenge) in _stored(store)

"""What a deployment tells its callers, attacked as a hostile caller or an outage would.

Each test reproduces a defect found against a production-mode deployment (real Redis,
PostgreSQL, ``appattest worker`` processes and a real HTTP server): one API key reading
another's verdicts or guessing job ids, statuses that read "pending" for ever once Redis
forgot them, 503s for work that was accepted, retries that could not be made safe, and
forgeries that changed the victim's state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from sqlalchemy import select

from producer.batching import Owner, new_batch_id, open_job_id, seal_job_id
from tests.factory import Device, TestCA
from tests.stack import Stack
from tests.test_faults import (
    _enter,
    assert_error,
    fault_stack,
    http_api,
    issue_http,
    producer_settings,
    redis_server,
    sessions_for,
    stored_counter,
    verdict_count,
    wait_until,
)
from worker.core import Reason, Rejected, verify_assertion
from worker.queue.ledger import JOBS_KEY, LEDGER_KEY
from worker.store import idempotency
from worker.store.db import create_store_engine, session_factory, upgrade
from worker.store.models import DeviceKey, IdempotencyKey, Verdict

ALICE = f"alice-{secrets.token_urlsafe(16)}"
BOB = f"bob-{secrets.token_urlsafe(16)}"
BARE = f"bare-{secrets.token_urlsafe(16)}"
KEYS = (f"alice:{ALICE}", f"bob:{BOB}", BARE)


def _now() -> datetime:
    return datetime.now(UTC)


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _wait_verdict(api: httpx.Client, job_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/jobs/{job_id}", params={"wait": 20})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "done", response.text
    return dict(response.json()["result"])


# Sealed job ids ------------------------------------------------------------------------------


def test_sealed_job_ids_open_only_for_their_owner() -> None:
    alice, bob = Owner.ephemeral("alice"), Owner.ephemeral("bob")
    batch = new_batch_id()
    ids = [seal_job_id(alice, batch, i) for i in range(200)]
    assert [open_job_id(alice, job_id) for job_id in ids] == [(batch, i) for i in range(200)]
    assert all(open_job_id(bob, job_id) is None for job_id in ids)
    # The ids of one batch share nothing that would let one be guessed from another.
    assert len({job_id[:8] for job_id in ids}) == len(ids)
    assert len({job_id[-8:] for job_id in ids}) == len(ids)
    # Any change to an id makes it no id at all, for its owner too.
    for job_id in ids[:20]:
        raw = bytearray(uuid.UUID(job_id).bytes)
        raw[secrets.randbelow(16)] ^= 1 << secrets.randbelow(8)
        assert open_job_id(alice, str(uuid.UUID(bytes=bytes(raw)))) is None
    assert open_job_id(alice, "not-an-id") is None
    assert open_job_id(alice, str(uuid.uuid4())) is None
    # The same API key always seals alike (every producer process reads the same ids).
    digest = hashlib.sha256(b"some key").digest()
    one, two = Owner.from_secret("x", digest), Owner.from_secret("x", digest)
    assert open_job_id(two, seal_job_id(one, batch, 7)) == (batch, 7)


# 1. Isolation between API keys ---------------------------------------------------------------


def test_one_api_key_cannot_read_or_guess_anothers_jobs(
    stack: Stack, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    """Single submissions of two keys sent at once travel in one batch message; each key reads
    its own verdicts, and the other key's ids, or ids made from its own by changing digits
    (the attack that read another key's verdicts), are 404 like ids that never existed. Each
    verdict row records which key submitted it, by name or fingerprint, never the key."""
    caplog.set_level(logging.INFO, logger="appattest")
    with (
        http_api(producer_settings(stack.settings, *KEYS), key=ALICE) as alice,
        _client(str(alice.base_url), BOB) as bob,
        _client(str(alice.base_url), BARE) as bare,
        sessions_for(stack.settings.store_url) as sessions,
    ):
        devices = {name: [Device(ca=ca) for _ in range(6)] for name in ("alice", "bob", "bare")}
        clients = {"alice": alice, "bob": bob, "bare": bare}
        bodies = {
            name: [
                d.registration_body(issue_http(clients[name], "registration"), now=_now())
                for d in devices[name]
            ]
            for name in clients
        }
        job_ids: dict[str, list[str]] = {name: [] for name in clients}
        lock = threading.Lock()

        def submit(name: str, body: dict[str, str]) -> None:
            response = clients[name].post("/v1/attestations", json=body)
            assert response.status_code == 202, response.text
            with lock:
                job_ids[name].append(response.json()["jobId"])

        threads = [
            threading.Thread(target=submit, args=(name, body))
            for name in clients
            for body in bodies[name]
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # A bulk submission too: its ids share no prefix.
        more = [Device(ca=ca) for _ in range(20)]
        items = [
            {
                "type": "attestation",
                "body": d.registration_body(issue_http(alice, "registration"), now=_now()),
            }
            for d in more
        ]
        response = alice.post("/v1/jobs", json={"jobs": items})
        assert response.status_code == 202, response.text
        bulk_ids = [entry["jobId"] for entry in response.json()["jobs"]]
        assert len({job_id[:8] for job_id in bulk_ids}) == len(bulk_ids)
        job_ids["alice"] += bulk_ids

        for name, client in clients.items():
            for job_id in job_ids[name]:
                assert _wait_verdict(client, job_id)["ok"]
        for name, client in clients.items():
            others = [j for other, ids in job_ids.items() if other != name for j in ids]
            for job_id in others:
                assert_error(client.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
                assert_error(
                    client.get(f"/v1/jobs/{job_id}", params={"wait": 5}), 404, "job_not_found"
                )
            answer = client.post("/v1/jobs/status", json={"jobIds": others})
            assert answer.status_code == 200
            assert {s["status"] for s in answer.json()["jobs"]} == {"not_found"}
            assert all(s["result"] is None for s in answer.json()["jobs"])
        # Ids are read whatever their case (Swift writes UUIDs in upper case).
        upper = job_ids["alice"][0].upper()
        [status] = alice.post("/v1/jobs/status", json={"jobIds": [upper]}).json()["jobs"]
        assert status["status"] == "done" and status["jobId"] == upper
        # The attack: ids made from one's own by changing its last digits.
        own = job_ids["bob"][0]
        guesses = [own[:-8] + f"{n:08x}" for n in range(8)]
        for client in clients.values():
            answer = client.post("/v1/jobs/status", json={"jobIds": guesses})
            assert {s["status"] for s in answer.json()["jobs"]} == {"not_found"}

        with sessions() as session:
            rows = session.execute(
                select(Verdict.job_id, Verdict.submitted_by).where(
                    Verdict.job_id.in_([j for ids in job_ids.values() for j in ids])
                )
            ).all()
    by_job = {job_id: by for job_id, by in rows}
    assert {by_job[j] for j in job_ids["alice"]} == {"alice"}
    assert {by_job[j] for j in job_ids["bob"]} == {"bob"}
    [fingerprint] = {by_job[j] for j in job_ids["bare"]}
    assert fingerprint.startswith("key-") and BARE not in fingerprint
    # Made-up ids are answered without an error in the log (nothing went wrong).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_api_key_names_are_checked_at_start(stack: Stack) -> None:
    from producer import create_app

    with pytest.raises(ValueError, match="twice"):
        create_app(producer_settings(stack.settings, "same:one", "same:two"))


# 4. Forgeries have no side effects -----------------------------------------------------------


def test_a_forged_assertion_learns_nothing_and_spends_nothing(stack: Stack, ca: TestCA) -> None:
    """A forged assertion (not signed by the device's key) is signature_invalid whatever its
    counter, so no binary search reads a key's counter; it leaves the stored counter alone and
    does not spend the challenge it presents, which the genuine device then uses. A forged
    registration does not spend its challenge either."""
    forger = ec.generate_private_key(ec.SECP256R1())
    with (
        http_api(producer_settings(stack.settings, ALICE), key=ALICE) as api,
        sessions_for(stack.settings.store_url) as sessions,
    ):
        victim = Device(ca=ca)
        challenge = issue_http(api, "registration")
        forged = Device(ca=ca, private_key=victim.private_key).registration_body(
            challenge, now=_now()
        )
        forged["token"] = forged["token"][:-12] + "AAAAAAAAAAA="
        verdict = api.post("/v1/attestations", params={"wait": 20}, json=forged).json()
        assert verdict["result"]["ok"] is False
        genuine = api.post(
            "/v1/attestations",
            params={"wait": 20},
            json=victim.registration_body(challenge, now=_now()),
        )
        assert genuine.json()["result"]["ok"], genuine.text

        for _ in range(3):
            body = victim.assertion_body(issue_http(api, "assertion"))
            assert api.post("/v1/assertions", params={"wait": 20}, json=body).json()["result"]["ok"]
        assert stored_counter(sessions, victim.key_id_b64) == 3

        reasons = []
        for counter in (1, 2, 3, 4, 1000):
            probe = Device(ca=ca, private_key=victim.private_key, counter=0)
            body = probe.assertion_body(
                issue_http(api, "assertion"), counter=counter, signing_key=forger
            )
            result = api.post("/v1/assertions", params={"wait": 20}, json=body).json()["result"]
            reasons.append(result["reason"])
        assert reasons == ["signature_invalid"] * 5
        assert stored_counter(sessions, victim.key_id_b64) == 3

        # The victim's own challenge, presented first by a forgery, stays the victim's.
        response = api.post(
            "/v1/challenges", json={"purpose": "assertion", "keyId": victim.key_id_b64}
        )
        challenge = response.json()["challenge"]
        attack = Device(ca=ca, private_key=victim.private_key, counter=victim.counter)
        body = attack.assertion_body(challenge, signing_key=forger)
        result = api.post("/v1/assertions", params={"wait": 20}, json=body).json()["result"]
        assert result["reason"] == "signature_invalid"
        body = victim.assertion_body(challenge)
        result = api.post("/v1/assertions", params={"wait": 20}, json=body).json()["result"]
        assert result["ok"] and result["counter"] == 4


def test_a_forger_learns_nothing_of_a_revoked_key(stack: Stack, ca: TestCA) -> None:
    """A revoked key's state (revoked, by which run, why) is told only to a caller who holds
    the key: a forged assertion for it is signature_invalid, the device's own is
    key_revoked."""
    forger = ec.generate_private_key(ec.SECP256R1())
    with (
        http_api(producer_settings(stack.settings, ALICE), key=ALICE) as api,
        sessions_for(stack.settings.store_url) as sessions,
    ):
        device = Device(ca=ca)
        body = device.registration_body(issue_http(api, "registration"), now=_now())
        assert api.post("/v1/attestations", params={"wait": 20}, json=body).json()["result"]["ok"]
        with sessions() as session, session.begin():
            key = session.get(DeviceKey, device.key_id_b64)
            assert key is not None
            key.revoked_at, key.revoked_reason = _now(), "certificate_chain_invalid"
        forged = device.assertion_body(issue_http(api, "assertion"), signing_key=forger)
        result = api.post("/v1/assertions", params={"wait": 20}, json=forged).json()["result"]
        assert result["reason"] == "signature_invalid", result
        assert "revoked" not in (result["detail"] or "")
        genuine = device.assertion_body(issue_http(api, "assertion"))
        result = api.post("/v1/assertions", params={"wait": 20}, json=genuine).json()["result"]
        assert result["reason"] == "key_revoked", result


def test_hostile_headers_and_key_ids_get_clear_refusals(stack: Stack, ca: TestCA) -> None:
    """A NUL (or any control character) in a keyId is invalid_request, on every route that
    takes one, not a 500 from the database; two Idempotency-Key headers are refused rather
    than one of them silently taken."""
    with http_api(producer_settings(stack.settings, ALICE), key=ALICE) as api:
        device = Device(ca=ca)
        for key_id in ("abc\x00def", "abc\ndef", "caf\u00e9"):
            answer = api.post("/v1/challenges", json={"purpose": "assertion", "keyId": key_id})
            assert_error(answer, 422, "invalid_request")
        for path, body in (
            ("/v1/attestations", device.registration_body("a challenge", now=_now())),
            ("/v1/assertions", device.assertion_body("some challenge")),
        ):
            assert_error(api.post(path, json=body | {"keyId": "ab\x00cd"}), 422, "invalid_request")
        body = device.registration_body(issue_http(api, "registration"), now=_now())
        twice = [("Idempotency-Key", "one"), ("Idempotency-Key", "two")]
        assert_error(api.post("/v1/attestations", json=body, headers=twice), 422, "invalid_request")
        # Nothing was queued by the refused request: the body is still good.
        answer = api.post("/v1/attestations", params={"wait": 20}, json=body)
        assert answer.status_code == 200 and answer.json()["result"]["ok"], answer.text


def test_an_old_bare_key_shaped_like_name_and_key_still_works(stack: Stack) -> None:
    """``APPATTEST_API_KEYS`` entries of an earlier release were bare keys; one that looks
    like ``name:key`` is accepted whole, as before, and by its part after the name."""
    old = f"team:{secrets.token_urlsafe(16)}"
    with http_api(producer_settings(stack.settings, old), key=old) as api:
        assert api.post("/v1/challenges", json={"purpose": "registration"}).status_code == 201
        short = {"Authorization": f"Bearer {old.split(':', 1)[1]}"}
        assert (
            api.post("/v1/challenges", json={"purpose": "registration"}, headers=short).status_code
            == 201
        )
        wrong = {"Authorization": "Bearer team"}
        assert_error(
            api.post("/v1/challenges", json={"purpose": "registration"}, headers=wrong),
            401,
            "unauthorized",
        )


def test_the_signature_is_checked_before_the_counter_and_the_app_id(ca: TestCA) -> None:
    device = Device(ca=ca)
    forger = ec.generate_private_key(ec.SECP256R1())
    payload = hashlib.sha256(b"payload").digest()
    for counter, app_id in ((1, device.app_id), (10, device.app_id), (1, "OTHER.app")):
        token = device.assertion_object(payload, counter=counter, signing_key=forger)
        with pytest.raises(Rejected) as refused:
            verify_assertion(
                assertion_object=token,
                client_data_hash=payload,
                public_key=device.public_point,
                app_id=app_id,
                previous_counter=5,
            )
        assert refused.value.reason is Reason.SIGNATURE_INVALID


# 3. Idempotency keys -------------------------------------------------------------------------


def test_idempotency_keys_make_retries_safe(stack: Stack, ca: TestCA) -> None:
    with (
        http_api(producer_settings(stack.settings, *KEYS), key=ALICE) as alice,
        _client(str(alice.base_url), BOB) as bob,
    ):
        device = Device(ca=ca)
        body = device.registration_body(issue_http(alice, "registration"), now=_now())
        key = {"Idempotency-Key": f"reg-{uuid.uuid4()}"}
        first = alice.post("/v1/attestations", json=body, headers=key)
        assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
        job_id = first.json()["jobId"]
        again = alice.post("/v1/attestations", params={"wait": 20}, json=body, headers=key)
        assert again.status_code == 200, again.text
        assert again.json()["jobId"] == job_id and again.json()["result"]["ok"]
        assert again.headers["Idempotent-Replayed"] == "true"
        # Another body under the same key is refused; the key is the caller's own.
        other = Device(ca=ca).registration_body(issue_http(alice, "registration"), now=_now())
        assert_error(
            alice.post("/v1/attestations", json=other, headers=key), 409, "idempotency_conflict"
        )
        theirs = bob.post("/v1/attestations", params={"wait": 20}, json=body, headers=key)
        assert theirs.json()["jobId"] != job_id
        assert theirs.json()["result"]["reason"] == "challenge_used"
        # An assertion, and the same key on the other route is another body: a conflict.
        payload = issue_http(alice, "assertion")
        assertion = device.assertion_body(payload)
        akey = {"Idempotency-Key": f"as-{uuid.uuid4()}"}
        results = [
            alice.post("/v1/assertions", params={"wait": 20}, json=assertion, headers=akey)
            for _ in range(3)
        ]
        assert {r.json()["jobId"] for r in results} == {results[0].json()["jobId"]}
        assert all(r.json()["result"]["ok"] for r in results)
        assert_error(
            alice.post("/v1/attestations", json=assertion, headers=akey), 422, "invalid_request"
        )
        # A key that is not printable ASCII is refused.
        assert_error(
            alice.post("/v1/assertions", json=assertion, headers={"Idempotency-Key": "a b"}),
            422,
            "invalid_request",
        )

        # Bulk items carry their own keys: a resubmitted batch returns the first job ids.
        devices = [Device(ca=ca) for _ in range(5)]
        items = [
            {
                "type": "attestation",
                "body": d.registration_body(issue_http(alice, "registration"), now=_now()),
                "idempotencyKey": f"bulk-{uuid.uuid4()}",
            }
            for d in devices
        ]
        first_ids = [
            e["jobId"] for e in alice.post("/v1/jobs", json={"jobs": items}).json()["jobs"]
        ]
        changed = [*items[:4], {**items[4], "body": {**items[4]["body"], "keyId": "x" * 44}}]
        second = alice.post("/v1/jobs", json={"jobs": changed}).json()["jobs"]
        assert [e.get("jobId") for e in second[:4]] == first_ids[:4]
        assert second[4]["status"] == "rejected"
        assert second[4]["error"]["code"] == "idempotency_conflict"
        statuses = alice.post(
            "/v1/jobs/status", params={"wait": 20}, json={"jobIds": first_ids}
        ).json()["jobs"]
        assert all(s["result"]["ok"] for s in statuses)
        # The same key twice in one batch: one job.
        twice = [items[0], items[0]]
        ids = [e["jobId"] for e in alice.post("/v1/jobs", json={"jobs": twice}).json()["jobs"]]
        assert ids == [first_ids[0], first_ids[0]]


def test_idempotency_claims_on_the_store(store_url: str) -> None:
    """One claim per (owner, key): a second is told what holds it; an expired row is
    replaced; owners do not share keys; a lost job's key moves to a new job once."""
    engine = create_store_engine(store_url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        now = _now()
        claim = idempotency.IdempotencyClaim("alice", b"k" * 32, b"h" * 32, "job-1")
        with sessions() as session, session.begin():
            assert idempotency.claim(session, [claim], now=now, expired_before=now) == {}
        again = idempotency.IdempotencyClaim("alice", b"k" * 32, b"H" * 32, "job-2")
        bobs = idempotency.IdempotencyClaim("bob", b"k" * 32, b"H" * 32, "job-3")
        with sessions() as session, session.begin():
            held = idempotency.claim(session, [again, bobs], now=now, expired_before=now)
        assert held == {("alice", b"k" * 32): idempotency.HeldKey(b"h" * 32, "job-1", now)}
        with sessions() as session, session.begin():
            assert idempotency.replace_job(
                session, "alice", b"k" * 32, old_job_id="job-1", new_job_id="job-4", now=now
            )
            assert not idempotency.replace_job(
                session, "alice", b"k" * 32, old_job_id="job-1", new_job_id="job-5", now=now
            )
        # Once expired, the key is free again.
        later = now + timedelta(days=2)
        with sessions() as session, session.begin():
            held = idempotency.claim(
                session, [again], now=later, expired_before=later - timedelta(days=1)
            )
        assert held == {}
        with sessions() as session:
            rows = session.execute(
                select(IdempotencyKey.owner, IdempotencyKey.job_id).order_by(IdempotencyKey.owner)
            ).all()
        assert [tuple(r) for r in rows] == [("alice", "job-2"), ("bob", "job-3")]
    finally:
        engine.dispose()


# 2 and 3. Outages: PostgreSQL answers when Redis forgets; no 503 for accepted work -------------


def _kill_and_restart(server: Any) -> None:
    server.stop(kill=True)
    server.start()


def test_statuses_come_from_postgresql_when_redis_forgets(
    ca: TestCA, pg_url: str, tmp_path: Path
) -> None:
    """Redis without persistence is killed and comes back empty: every job already decided
    reads done from the verdicts table with its verdict; a job accepted but whose message died
    with Redis reads lost (never pending for ever); an id never accepted is 404. A retry of a
    lost job with its idempotency key gets a new job, which is decided."""
    with ExitStack() as cleanup:
        server = _enter(cleanup, redis_server(persistent=False))
        stack = cleanup.enter_context(
            fault_stack(ca, tmp_path, store_url=pg_url, redis=server, env={})
        )
        stack.start_worker(name="a")
        sessions = cleanup.enter_context(sessions_for(pg_url))
        api = cleanup.enter_context(http_api(producer_settings(stack.settings, ALICE), key=ALICE))

        decided: dict[str, dict[str, Any]] = {}
        bodies = [
            Device(ca=ca).registration_body(issue_http(api, "registration"), now=_now())
            for _ in range(30)
        ]
        response = api.post(
            "/v1/jobs", json={"jobs": [{"type": "attestation", "body": b} for b in bodies[:20]]}
        )
        ids = [e["jobId"] for e in response.json()["jobs"]]
        for body in bodies[20:]:
            answer = api.post("/v1/attestations", params={"wait": 20}, json=body)
            ids.append(answer.json()["jobId"])
        for job_id in ids:
            decided[job_id] = _wait_verdict(api, job_id)
        assert all(r["ok"] for r in decided.values())

        # Jobs accepted while no worker runs: their messages live only in Redis.
        stack.stop_workers()
        waiting = []
        retries = []
        for _ in range(3):
            body = Device(ca=ca).registration_body(issue_http(api, "registration"), now=_now())
            key = {"Idempotency-Key": f"lost-{uuid.uuid4()}"}
            waiting.append(api.post("/v1/attestations", json=body, headers=key).json()["jobId"])
            retries.append((body, key))
        statuses = api.post("/v1/jobs/status", json={"jobIds": waiting}).json()["jobs"]
        assert {s["status"] for s in statuses} == {"pending"}
        _kill_and_restart(server)
        stack.start_worker(name="b")
        results_db = redis.Redis.from_url(server.url(1))
        assert results_db.dbsize() == 0  # every result is gone
        results_db.close()

        answer = api.post("/v1/jobs/status", json={"jobIds": ids})
        assert answer.status_code == 200, answer.text
        for status in answer.json()["jobs"]:
            assert status["status"] == "done"
            assert status["result"] == decided[status["jobId"]]
        for job_id in ids[:3]:
            assert api.get(f"/v1/jobs/{job_id}").json()["result"] == decided[job_id]
        for job_id in waiting:
            status = api.get(f"/v1/jobs/{job_id}", params={"wait": 3}).json()
            assert status["status"] == "lost" and status["error"]["code"] == "job_lost"
        assert_error(api.get(f"/v1/jobs/{uuid.uuid4()}"), 404, "job_not_found")
        assert verdict_count(sessions, ids) == len(ids)
        print(
            f"\nfault=redis-data-lost accepted={len(ids) + len(waiting)} "
            f"done-read-from-api={len(ids)} lost={len(waiting)} pending=0"
        )

        # A retry with the key of a lost job gets a new job, and that one is decided: the lost
        # one never spent its challenge. Concurrent retries of one key share that new job.
        (body, key), lost = retries[0], waiting[0]
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda _: api.post(
                        "/v1/attestations", params={"wait": 20}, json=body, headers=key
                    ),
                    range(4),
                )
            )
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert len({a.json()["jobId"] for a in answers}) == 1
        assert answers[0].json()["jobId"] != lost
        assert all(a.json()["result"]["ok"] for a in answers)
        assert sum("Idempotent-Replayed" in a.headers for a in answers) == 3
        for (body, key), lost in zip(retries[1:], waiting[1:], strict=True):
            answer = api.post("/v1/attestations", params={"wait": 20}, json=body, headers=key)
            assert answer.status_code == 200, answer.text
            assert answer.json()["jobId"] != lost and answer.json()["result"]["ok"]
            assert "Idempotent-Replayed" not in answer.headers


def test_a_lost_job_stays_lost_when_a_worker_delivers_it_late(
    ca: TestCA, pg_url: str, tmp_path: Path
) -> None:
    """Redis forgot a job's ledger entry while its message still existed (a worker had taken
    it before Redis died, and runs it later). The status read that finds the job nowhere
    answers lost and records it so: the late delivery decides nothing (no key stored, no
    challenge spent) and the job still reads lost, so the caller's retry with its
    idempotency key gets a new job that registers the device."""
    with ExitStack() as cleanup:
        server = _enter(cleanup, redis_server(persistent=False))
        stack = cleanup.enter_context(
            fault_stack(ca, tmp_path, store_url=pg_url, redis=server, env={})
        )
        sessions = cleanup.enter_context(sessions_for(pg_url))
        api = cleanup.enter_context(http_api(producer_settings(stack.settings, ALICE), key=ALICE))
        broker = redis.Redis.from_url(server.url(0))
        cleanup.callback(broker.close)
        device = Device(ca=ca)
        body = device.registration_body(issue_http(api, "registration"), now=_now())
        key = {"Idempotency-Key": f"late-{uuid.uuid4()}"}
        first = api.post("/v1/attestations", json=body, headers=key)
        assert first.status_code == 202, first.text
        job_id = first.json()["jobId"]
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "pending"
        # Redis forgets the ledger; the message stays for a worker to run.
        broker.delete(LEDGER_KEY, JOBS_KEY)
        lost = api.get(f"/v1/jobs/{job_id}").json()
        assert lost["status"] == "lost" and lost["error"]["code"] == "job_lost", lost

        stack.start_worker(name="late")
        results = redis.Redis.from_url(server.url(1))
        cleanup.callback(results.close)
        wait_until(lambda: results.dbsize() > 0, 30, "the late delivery ran")
        again = api.get(f"/v1/jobs/{job_id}").json()
        assert again["status"] == "lost", again
        with sessions() as session:
            rows = session.execute(select(Verdict).where(Verdict.job_id == job_id)).scalars().all()
            assert [(r.kind, r.ok, r.reason) for r in rows] == [("lost", False, "job_lost")]
            assert session.get(DeviceKey, device.key_id_b64) is None

        retry = api.post("/v1/attestations", params={"wait": 20}, json=body, headers=key)
        assert retry.status_code == 200, retry.text
        assert retry.json()["jobId"] != job_id and retry.json()["result"]["ok"], retry.text
        assert stored_counter(sessions, device.key_id_b64) == 0


def test_concurrent_requests_with_one_idempotency_key_share_one_job(
    stack: Stack, ca: TestCA
) -> None:
    """Eight identical requests with one key at the same moment: one job, which none of them
    reads as lost or pending for ever (the claim becomes visible only with the job queued)."""
    from producer import create_app
    from tests.test_producer_api import serve

    settings = stack.settings.model_copy(update={"api_keys": [SecretStr(f"alice:{ALICE}")]})
    with serve(create_app(settings)) as url, _client(url, ALICE) as api:
        body = Device(ca=ca).registration_body(issue_http(api, "registration"), now=_now())
        key = {"Idempotency-Key": f"burst-{uuid.uuid4()}"}
        barrier = threading.Barrier(8)

        def post(_: int) -> httpx.Response:
            barrier.wait()
            return api.post("/v1/attestations", params={"wait": 20}, json=body, headers=key)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert len({a.json()["jobId"] for a in answers}) == 1
    assert all(a.json()["status"] == "done" and a.json()["result"]["ok"] for a in answers)
    assert sum("Idempotent-Replayed" in a.headers for a in answers) == 7


class _HoldsEverything:
    """A ledger that says every batch is still on its way (its entry outlived the result
    write of a worker that stored the verdict)."""

    def __init__(self, since: float = 0.0) -> None:
        self.since = since

    def holding(self, task_ids: Any) -> dict[str, float]:
        return dict.fromkeys(task_ids, self.since)

    def close(self) -> None:
        pass


def test_a_verdict_in_the_store_is_final_whatever_the_ledger_says(
    redis_server: str, tmp_path: Path
) -> None:
    """A worker stored the verdict in the store, but its result write is still retrying (the
    result backend restarted) and the ledger entry is still there: the status is done, read
    from the store, not pending until the retries end. A job of the same batch without a
    verdict stays pending; another key's verdict stays hidden."""
    from producer.jobs import JobQueue
    from tests.stack import leased_redis_pair
    from worker.queue.app import create_celery_app
    from worker.settings import Settings

    engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    sessions = session_factory(engine)
    with leased_redis_pair() as (broker_db, results_db):
        settings = Settings(
            broker_url=f"{redis_server}/{broker_db}",
            result_backend=f"{redis_server}/{results_db}",
            store_url="sqlite://",
        )
        queue = JobQueue(create_celery_app(settings), sessions=sessions, ledger=_HoldsEverything())
        alice, bob = Owner.ephemeral("alice"), Owner.ephemeral("bob")
        batch = new_batch_id()
        decided, undecided = seal_job_id(alice, batch, 0), seal_job_id(alice, batch, 1)
        bobs = seal_job_id(bob, batch, 2)
        verdict = {"ok": True, "kind": "registration", "keyId": "k", "reason": None}
        with sessions() as session, session.begin():
            for job_id, owner in ((decided, "alice"), (bobs, "alice")):
                session.add(
                    Verdict(
                        job_id=job_id,
                        kind="registration",
                        key_id="k",
                        app_id=None,
                        ok=True,
                        reason=None,
                        result=verdict,
                        decided_at=_now(),
                        submitted_by=owner,
                    )
                )
        first, second = queue.statuses([decided, undecided], owner=alice)
        assert first.status == "done" and first.result is not None and first.result.ok
        assert second.status == "pending"
        assert queue.status(bobs, owner=bob).status == "pending"
        # Without the store (the watcher's reads between two consultations) nothing is final.
        [quick] = queue.statuses_of([(alice, undecided)], consult_store=False)
        assert quick.status == "pending"
        # A batch sent moments ago is just on its way: the store is not asked for it.
        fresh = JobQueue(
            queue.celery_app, sessions=sessions, ledger=_HoldsEverything(since=time.time())
        )
        assert fresh.status(decided, owner=alice).status == "pending"
    engine.dispose()


def test_no_503_for_accepted_work(ca: TestCA, pg_url: str, tmp_path: Path) -> None:
    """(a) Redis (append-only file) is killed and restarted while a caller waits for its
    verdict: the caller gets 202 with the job id, not 503, and a retry with its idempotency key
    returns that job's verdict. (b) Redis is killed during a bulk submission of 1,000 jobs:
    the answer lists per item accepted (with its id) or refused; resubmitting with the same
    keys completes the set, and every device is registered exactly once, with no
    challenge_used."""
    with ExitStack() as cleanup:
        server = _enter(cleanup, redis_server(persistent=True))
        env = {
            # A message that Redis lost as it died is published again from the ledger soon.
            "APPATTEST_LEDGER_SWEEP_SECONDS": "1",
            "APPATTEST_LEDGER_RESEND_SECONDS": "5",
            # A message a worker held as Redis died comes back soon (the default is 120 s).
            "APPATTEST_VISIBILITY_TIMEOUT_SECONDS": "5",
        }
        stack = cleanup.enter_context(
            fault_stack(ca, tmp_path, store_url=pg_url, redis=server, env=env)
        )
        workers = [stack.start_worker(name="a"), stack.start_worker(name="b")]
        sessions = cleanup.enter_context(sessions_for(pg_url))
        # A rate limit this test's retries of 1,000 jobs never reach.
        unlimited = producer_settings(
            stack.settings, ALICE, rate_limit_per_second=1e6, rate_limit_burst=10**6
        )
        api = cleanup.enter_context(http_api(unlimited, key=ALICE))
        broker = redis.Redis.from_url(server.url(0))
        cleanup.callback(broker.close)

        # (a)
        body = Device(ca=ca).registration_body(issue_http(api, "registration"), now=_now())
        key = {"Idempotency-Key": f"wait-{uuid.uuid4()}"}
        answers: list[httpx.Response] = []
        for worker in workers:
            os.killpg(worker.pid, signal.SIGSTOP)
        try:
            thread = threading.Thread(
                target=lambda: answers.append(
                    api.post("/v1/attestations", params={"wait": 25}, json=body, headers=key)
                )
            )
            thread.start()
            wait_until(lambda: broker.zcard(LEDGER_KEY) > 0, 20, "job accepted")
            _kill_and_restart(server)
            thread.join(30)
        finally:
            for worker in workers:
                os.killpg(worker.pid, signal.SIGCONT)
        [answer] = answers
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["jobId"]
        retry = api.post("/v1/attestations", params={"wait": 25}, json=body, headers=key)
        assert retry.status_code == 200, retry.text
        assert retry.json()["jobId"] == job_id and retry.json()["result"]["ok"]
        print("\nfault=redis-kill-during-wait answer=202-with-job-id retry=same-job verdict=ok")

        # A submission refused with 503 (Redis down before its ledger entry) was not accepted:
        # a retry with its idempotency key, once Redis is back, finds that job nowhere (lost),
        # creates it anew and gets its verdict.
        body = Device(ca=ca).registration_body(issue_http(api, "registration"), now=_now())
        key = {"Idempotency-Key": f"refused-{uuid.uuid4()}"}
        server.stop(kill=True)
        assert_error(
            api.post("/v1/attestations", json=body, headers=key), 503, "service_unavailable"
        )
        server.start()
        deadline = time.monotonic() + 30
        while (
            retry := api.post("/v1/attestations", params={"wait": 20}, json=body, headers=key)
        ).status_code == 503:
            assert time.monotonic() < deadline, retry.text
            time.sleep(0.2)
        assert retry.status_code == 200, retry.text
        assert retry.json()["result"]["ok"] and "Idempotent-Replayed" not in retry.headers

        # (b)
        devices = [Device(ca=ca) for _ in range(1000)]
        items = [
            {
                "type": "attestation",
                "body": d.registration_body(issue_http(api, "registration"), now=_now()),
                "idempotencyKey": f"bulk-{n}-{uuid.uuid4()}",
            }
            for n, d in enumerate(devices)
        ]
        first: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: first.append(api.post("/v1/jobs", json={"jobs": items}))
        )
        thread.start()
        wait_until(lambda: broker.zcard(LEDGER_KEY) > 0, 30, "bulk accepted in part")
        server.stop(kill=True)
        thread.join(60)
        server.start()
        [response] = first
        if response.status_code == 503:
            accepted_first = 0
        else:
            assert response.status_code == 202, response.text
            entries = response.json()["jobs"]
            accepted_first = sum(1 for e in entries if e["status"] == "pending")
            refused = [e for e in entries if e["status"] != "pending"]
            assert {e["error"]["code"] for e in refused} <= {"service_unavailable"}
        print(f"\nbulk: {accepted_first} of {len(items)} accepted before Redis died")
        job_ids: dict[int, str] = {}
        deadline = time.monotonic() + 60
        while len(job_ids) < len(items) and time.monotonic() < deadline:
            retry = api.post("/v1/jobs", json={"jobs": items})
            if retry.status_code == 202:
                for entry in retry.json()["jobs"]:
                    if entry["status"] == "pending":
                        job_ids[entry["index"]] = entry["jobId"]
            else:
                time.sleep(0.5)
        assert len(job_ids) == len(items)
        ids = list(job_ids.values())
        verdicts: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 120
        while len(verdicts) < len(ids) and time.monotonic() < deadline:
            missing = [j for j in ids if j not in verdicts]
            for start in range(0, len(missing), 1000):
                statuses = api.post(
                    "/v1/jobs/status",
                    params={"wait": 10},
                    json={"jobIds": missing[start : start + 1000]},
                ).json()["jobs"]
                for status in statuses:
                    assert status["status"] in ("pending", "done"), status
                    if status["status"] == "done":
                        verdicts[status["jobId"]] = status["result"]
        assert len(verdicts) == len(ids)
        reasons = Counter(r["reason"] for r in verdicts.values() if not r["ok"])
        assert not reasons, reasons
        assert {r["keyId"] for r in verdicts.values()} == {d.key_id_b64 for d in devices}
        assert verdict_count(sessions, ids) == len(ids)
        print(
            f"fault=redis-kill-mid-bulk sent={len(items)} accepted-first={accepted_first} "
            f"verdicts-read-from-api={len(verdicts)} wrong=0 lost=0"
        )

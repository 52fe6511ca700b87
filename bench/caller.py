"""The caller's path, end to end: challenge issuance, a device's whole flow, and latency at
light load. Rows of ``bench/e2e.py`` (``challenges``, ``device_flow``, ``light``), run against
its stack (the API, 2 workers, Redis and PostgreSQL) and, for the light load, against
``appattest serve`` too.

* ``challenges``: ``POST /v1/challenges`` (registration purpose) from 32 keep-alive callers,
  the workers idle; challenges/s, the API's CPU per challenge, and a check that the store
  holds exactly one row per challenge answered;
* ``device_flow``: what a device's request costs the service: ``POST /v1/challenges`` for an
  assertion bound to the device's keyId, the device signs an assertion over that challenge,
  then ``POST /v1/assertions?wait=20`` holds the connection until the verdict; 64 keep-alive
  callers, each running its own devices one flow at a time (so that one device never has
  two assertions in flight). Flows/s over 2 x the in-process assertion rate. The devices are
  registered through the bulk path first (not timed);
* ``light``: single ``POST /v1/assertions?wait=20`` sent at a fixed 20 requests/s (an open
  loop: a request leaves every 50 ms whatever the answers), latency from sending to the
  verdict, p50/p99; the devices registered first (not timed).

Every verdict is checked as in ``bench/e2e.py``: ok, for its keyId, with exactly its counter.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from e2e import (
    CHUNK,
    SERVER_WAIT,
    SINGLE_CONNECTIONS,
    Burst,
    Job,
    Meters,
    RawApi,
    _log,
    _read_verdict,
    _verdict,
    percentile,
    profiled,
)
from sqlalchemy import func, select

from tests.factory import Device
from worker.store.models import Challenge

if TYPE_CHECKING:
    from e2e import Runner
    from sqlalchemy import Engine

CHALLENGE_CALLERS = 32
LIGHT_RATE = 20.0  # requests per second


def timed_row(
    *,
    key: str,
    label: str,
    kind: str,
    sent: Sequence[float],
    seen: Sequence[float],
    start: float,
    correct: int,
    wrong: dict[str, int],
    cpu: dict[str, float],
    reference: float | None,
    core_ms: float | None = None,
) -> dict[str, Any]:
    """A result row in the shape of ``e2e.summarize``'s, for work that is not a Burst."""
    count = len(sent)
    done = [s for s in seen if not math.isnan(s)]
    elapsed = (max(done) - start) if done else math.nan
    rate = len(done) / elapsed if done else 0.0
    latencies = sorted((s - t) * 1000 for s, t in zip(seen, sent, strict=True) if not math.isnan(s))
    row: dict[str, Any] = {
        "key": key,
        "label": label,
        "kind": kind,
        "workers": 2,
        "jobs": count,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(rate, 1),
        "correct": correct,
        "wrong": sum(wrong.values()),
        "lost": count - len(done),
        "wrong_reasons": wrong,
        "refused_at_submission": 0,
        "rate_limited_429": 0,
        "cpu_seconds": cpu,
        "cpu_ms_per_job": {k: round(v * 1000 / count, 3) for k, v in cpu.items()},
        "latency_ms_p50": round(percentile(latencies, 50), 1),
        "latency_ms_p95": round(percentile(latencies, 95), 1),
        "latency_ms_p99": round(percentile(latencies, 99), 1),
        "latency_ms_max": round(latencies[-1], 1) if latencies else math.nan,
    }
    if reference:
        row["in_process_ref_per_s"] = round(reference, 1)
        row["over_in_process"] = round(rate / reference, 3)
    service_ms = sum(v for k, v in cpu.items() if k != "client") * 1000 / count
    if core_ms and service_ms:
        # As in e2e.summarize: the core's CPU per operation over the service's per job.
        row["service_cpu_ms_per_job"] = round(service_ms, 3)
        row["over_in_process_cpu"] = round(core_ms / service_ms, 3)
    return row


def _check(verdict: Any, key_id: str, counter: int, wrong: dict[str, int]) -> bool:
    if verdict is None:
        return False
    ok, kind, got_key, got_counter, reason = verdict
    if ok and kind == "assertion" and got_key == key_id and got_counter == counter:
        return True
    label = str(reason) if not ok else "wrong kind, key or counter"
    wrong[label] = wrong.get(label, 0) + 1
    return False


def _targets(runner: Runner) -> dict[str, list[int]]:
    """The processes ``--profile`` records: the API and the workers."""
    return {"api": [runner.meters.api_pid or 0], "worker": runner.worker_pids()}


def register(runner: Runner, registrations: Sequence[Job]) -> None:
    """Register these devices through the bulk path and wait for every verdict (not timed)."""
    burst = Burst(registrations)
    prepared = [
        RawApi.prepare_chunk(registrations[s : s + CHUNK])
        for s in range(0, len(registrations), CHUNK)
    ]
    asyncio.run(runner._burst("http_status", burst, prepared))
    refused = [v for v in burst.verdicts if v is None or not v[0]]
    if refused:
        raise RuntimeError(f"{len(refused)} registrations were not accepted: {refused[:3]}")


def _stored_challenges(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Challenge)).scalar_one())


def challenges(runner: Runner, count: int) -> dict[str, Any]:
    """``count`` registration challenges from ``CHALLENGE_CALLERS`` keep-alive callers."""
    runner.reset()
    stored_before = _stored_challenges(runner.engine)
    body = json.dumps({"purpose": "registration"}).encode()
    sent = [math.nan] * count
    seen = [math.nan] * count
    answers: list[str | None] = [None] * count
    _log(f"challenges: {count:,} from {CHALLENGE_CALLERS} callers")

    async def run() -> float:
        api = RawApi("127.0.0.1", runner.port, CHALLENGE_CALLERS)
        pending = iter(range(count))

        async def caller() -> None:
            for index in pending:
                sent[index] = time.perf_counter()
                _, answer = await api.call("POST", "/v1/challenges", body)
                seen[index] = time.perf_counter()
                answers[index] = answer.get("challenge")

        try:
            start = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(CHALLENGE_CALLERS)))
            return start
        finally:
            api.close()

    with profiled(runner.profile_dir, "challenges", _targets(runner)):
        before = runner.meters.read()
        start = asyncio.run(run())
        cpu = Meters.spent(before, runner.meters.read())
    issued = {a for a in answers if a}
    stored = _stored_challenges(runner.engine) - stored_before
    wrong: dict[str, int] = {}
    if len(issued) != count:
        wrong["missing or repeated challenge"] = count - len(issued)
    if stored != count:
        wrong[f"{stored} rows stored for {count} challenges"] = abs(stored - count)
    row = timed_row(
        key="challenges",
        label=f"POST /v1/challenges, {CHALLENGE_CALLERS} callers",
        kind="challenge",
        sent=sent,
        seen=seen,
        start=start,
        correct=len(issued) if stored == count else 0,
        wrong=wrong,
        cpu=cpu,
        reference=None,
    )
    _log(f"  {row['jobs_per_s']:.0f} challenges/s, api {row['cpu_ms_per_job'].get('api')} ms each")
    return row


def device_flow(
    runner: Runner, devices: Sequence[Device], registrations: Sequence[Job], rounds: int
) -> dict[str, Any]:
    """Each device: a challenge for its key, then its assertion over it with ?wait."""
    runner.reset()
    register(runner, registrations)
    count = len(devices) * rounds
    callers = min(SINGLE_CONNECTIONS, len(devices))
    sent: list[float] = []
    seen: list[float] = []
    wrong: dict[str, int] = {}
    correct = 0
    _log(f"device flow: {count:,} flows from {callers} callers")

    async def run() -> float:
        nonlocal correct
        api = RawApi("127.0.0.1", runner.port, callers)
        deadline = time.perf_counter() + runner.timeout

        async def caller(mine: Sequence[Device]) -> None:
            nonlocal correct
            for _ in range(rounds):
                for device in mine:
                    start = time.perf_counter()
                    request = {"purpose": "assertion", "keyId": device.key_id_b64}
                    _, issued = await api.call(
                        "POST", "/v1/challenges", json.dumps(request).encode()
                    )
                    body = device.assertion_body(issued["challenge"])
                    _, answer = await api.call(
                        "POST", f"/v1/assertions?wait={SERVER_WAIT:g}", json.dumps(body).encode()
                    )
                    verdict = answer.get("result")
                    got = _verdict(verdict) if verdict is not None else None
                    if got is None and answer.get("jobId"):
                        got = await _read_verdict(
                            api, answer["jobId"], first=True, deadline=deadline
                        )
                    sent.append(start)
                    seen.append(time.perf_counter() if got is not None else math.nan)
                    if _check(got, device.key_id_b64, device.counter, wrong):
                        correct += 1

        try:
            start = time.perf_counter()
            await asyncio.gather(*(caller(devices[c::callers]) for c in range(callers)))
            return start
        finally:
            api.close()

    with profiled(runner.profile_dir, "device_flow", _targets(runner)):
        before = runner.meters.read()
        start = asyncio.run(run())
        cpu = Meters.spent(before, runner.meters.read())
    row = timed_row(
        key="device_flow",
        label=f"device flow (challenge + ?wait), {callers} callers",
        kind="assertion",
        sent=sent,
        seen=seen,
        start=start,
        correct=correct,
        wrong=wrong,
        cpu=cpu,
        reference=runner.reference.for_kind("assertion"),
        core_ms=1000 / runner.reference.single("assertion"),
    )
    _log(f"  {row['jobs_per_s']:.0f} flows/s, {correct}/{count} correct, cpu {cpu}")
    return row


async def light_load(
    port: int, assertions: Sequence[Job], prepared: Sequence[bytes], timeout: float
) -> tuple[list[float], list[float], int, dict[str, int], float]:
    """Send the assertions at ``LIGHT_RATE`` per second, open loop; (sent, seen, correct,
    wrong, start)."""
    api = RawApi("127.0.0.1", port, 16)
    count = len(assertions)
    sent = [math.nan] * count
    seen = [math.nan] * count
    wrong: dict[str, int] = {}
    correct = 0
    deadline = time.perf_counter() + timeout

    async def one(index: int) -> None:
        nonlocal correct
        job = assertions[index]
        sent[index] = time.perf_counter()
        job_id, verdict = await api.submit_one(job, prepared[index])
        if verdict is None and job_id is not None:
            verdict = await _read_verdict(api, job_id, first=True, deadline=deadline)
        if verdict is not None:
            seen[index] = time.perf_counter()
        if _check(verdict, job.key_id, job.counter, wrong):
            correct += 1

    try:
        start = time.perf_counter()
        tasks = []
        for index in range(count):
            delay = start + index / LIGHT_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
        return sent, seen, correct, wrong, start
    finally:
        api.close()


def light(
    runner: Runner, registrations: Sequence[Job], assertions: Sequence[Job]
) -> dict[str, Any]:
    """Single assertions at 20/s against the stack, devices registered first."""
    runner.reset()
    register(runner, registrations)
    return _light_row(
        runner.port,
        assertions,
        runner.meters,
        runner.timeout,
        key="light_assertion",
        label=f"light load, {LIGHT_RATE:g} assertions/s ?wait",
        embedded=False,
    )


def embedded_light(
    port: int, assertions: Sequence[Job], meters: Meters, timeout: float
) -> dict[str, Any]:
    """The light load against ``appattest serve`` (devices registered by its bursts)."""
    return _light_row(
        port,
        assertions,
        meters,
        timeout,
        key="embedded_light_assertion",
        label=f"embedded light load, {LIGHT_RATE:g} assertions/s",
        embedded=True,
    )


def _light_row(
    port: int,
    assertions: Sequence[Job],
    meters: Meters,
    timeout: float,
    *,
    key: str,
    label: str,
    embedded: bool,
) -> dict[str, Any]:
    """One light-load row: the assertions at LIGHT_RATE per second, latency and CPU (for the
    embedded service, the whole serve tree's)."""
    prepared = [json.dumps(job.body).encode() for job in assertions]
    _log(
        f"{'embedded ' if embedded else ''}light load: {len(assertions):,} assertions at "
        f"{LIGHT_RATE:g}/s"
    )
    before = meters.read()
    sent, seen, correct, wrong, start = asyncio.run(light_load(port, assertions, prepared, timeout))
    cpu = Meters.spent(before, meters.read())
    if embedded:
        cpu["service"] = cpu.pop("api")
        del cpu["workers"], cpu["postgresql"]
    row = timed_row(
        key=key,
        label=label,
        kind="assertion",
        sent=sent,
        seen=seen,
        start=start,
        correct=correct,
        wrong=wrong,
        cpu=cpu,
        reference=None,
    )
    _log(f"  p50 {row['latency_ms_p50']} ms, p99 {row['latency_ms_p99']} ms")
    return row

"""Waiting requests woken by the Redis result backend's announcements (``producer.wakeups``),
and polling as their fallback: against the real Redis and real ``appattest worker``
processes, whose consumption is paused (SIGSTOP) so that a verdict is stored while a wait is
subscribed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from celery import Celery

from producer.batching import new_batch_id, open_job_id, seal_job_id
from producer.errors import QueueUnavailable
from producer.jobs import JobQueue, _Watcher, check_request
from producer.wakeups import CLIENT_NAME, ResultWakeups, result_wakeups
from tests.factory import Device, TestCA
from tests.stack import Stack
from worker.queue.app import create_celery_app


@contextmanager
def paused(stack: Stack) -> Iterator[None]:
    """The stack's workers stopped (SIGSTOP) for the block: queued jobs wait."""
    procs = [proc for proc in stack.workers if proc.poll() is None]
    for proc in procs:
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGCONT)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``predicate`` on the loop until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


def registration(stack: Stack, ca: TestCA, queue: JobQueue) -> tuple[str, Device]:
    """Submit one registration; return its job id and device."""
    from tests.test_faults import issue, sessions_for

    device = Device(ca=ca)
    with sessions_for(stack.settings.store_url) as sessions:
        [challenge] = issue(sessions, "registration", [None])
    body = check_request(device.registration_body(challenge, now=datetime.now(UTC)))
    return queue.submit(body), device


def watcher_of(queue: JobQueue) -> tuple[_Watcher, ResultWakeups]:
    watcher = queue._watchers[asyncio.get_running_loop()]
    assert watcher._wakeups is not None
    return watcher, watcher._wakeups


def channel(app: Celery, batch_id: str) -> bytes:
    key: bytes = app.backend.get_key_for_task(batch_id)
    return key


def subscribers(client: redis.Redis, app: Celery, batch_ids: list[str]) -> int:
    counts = client.pubsub_numsub(*(channel(app, b) for b in batch_ids))
    return sum(count for _, count in counts)


@pytest.fixture
def celery_app(stack: Stack) -> Iterator[Celery]:
    app = create_celery_app(stack.settings)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def results_redis(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.settings.result_backend)
    try:
        yield client
    finally:
        client.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_only_redis_result_backends_announce(tmp_path: Path) -> None:
    """Celery's Redis backend gets wake-ups; the database backend of the embedded default and
    a Redis reached through Sentinel poll."""

    def wakeups_for(url: str) -> ResultWakeups | None:
        app = Celery(set_as_current=False)
        app.conf.result_backend = url
        try:
            return result_wakeups(app.backend, on_wake=lambda *_: None, on_lost=lambda: None)
        finally:
            app.close()

    assert wakeups_for("redis://127.0.0.1:6379/1") is not None
    assert wakeups_for("redis+socket:///tmp/redis.sock?virtual_host=1") is not None
    assert wakeups_for(f"db+sqlite:///{tmp_path / 'results.db'}") is None
    assert wakeups_for("sentinel://127.0.0.1:26379") is None


def test_a_verdict_stored_during_a_wait_wakes_it(
    stack: Stack, ca: TestCA, celery_app: Celery, results_redis: redis.Redis
) -> None:
    """The wait subscribes to its batch's channel; the worker's result announcement wakes the
    watcher, whose read (through statuses_of) finds the verdict; afterwards the channel has
    no subscriber left and the connection stays open for the next waits."""
    queue = JobQueue(celery_app)

    async def scenario() -> None:
        with paused(stack):
            job_id, device = registration(stack, ca, queue)
            waiting = asyncio.ensure_future(queue.wait_async(job_id, 60))
            await asyncio.sleep(0)
            watcher, wakeups = watcher_of(queue)
            found = open_job_id(queue.owner, job_id)
            assert found is not None
            batch_id = found[0]
            await until(lambda: batch_id in wakeups.subscribed, "the subscription")
            assert subscribers(results_redis, celery_app, [batch_id]) == 1
            assert not waiting.done()
        status = await waiting
        assert status.status == "done" and status.result is not None
        assert status.result.ok and status.result.key_id == device.key_id_b64
        # Found by the read the announcement woke, not by a poll.
        assert watcher.found_on_wakeup == 1 and wakeups.messages >= 1
        await until(lambda: not wakeups.subscribed, "the unsubscription")
        assert subscribers(results_redis, celery_app, [batch_id]) == 0
        assert wakeups.live and wakeups.connections == 1
        names = [
            c["name"] for c in results_redis.client_list() if c["id"] == str(wakeups.client_id)
        ]
        assert names == [CLIENT_NAME]

    run(scenario)


def test_no_subscription_outlives_its_waits(
    stack: Stack, ca: TestCA, celery_app: Celery, results_redis: redis.Redis
) -> None:
    """Waits that end with a verdict, that time out, that are cancelled (a client that went
    away) and that ask for an id never given out leave no subscription behind, while the
    connection stays open."""
    queue = JobQueue(celery_app)

    def batch_of(job_id: str) -> str:
        found = open_job_id(queue.owner, job_id)
        assert found is not None
        return found[0]

    async def scenario() -> None:
        done_id, _ = registration(stack, ca, queue)
        never_sent = seal_job_id(queue.owner, new_batch_id(), 0)
        cancelled = seal_job_id(queue.owner, new_batch_id(), 3)
        batch_ids = [batch_of(j) for j in (done_id, never_sent, cancelled)]
        abandoned = asyncio.ensure_future(queue.wait_async(cancelled, 60))
        await asyncio.sleep(0)
        _, wakeups = watcher_of(queue)
        await until(lambda: batch_ids[2] in wakeups.subscribed, "the subscription")
        statuses = await asyncio.gather(
            queue.wait_async(done_id, 60),
            queue.wait_async(never_sent, 0.5),
            queue.wait_many_async([done_id, "5b7e4a36-6c55-4c6f-9d0e-3b1f1f0d9a11"], 60),
        )
        assert statuses[0].status == "done" and statuses[1].status == "pending"
        assert [s.status for s in statuses[2]] == ["done", "not_found"]
        await until(lambda: wakeups.subscribed == {batch_ids[2]}, "the others unsubscribed")
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        await until(lambda: not wakeups.subscribed, "every unsubscription")
        assert subscribers(results_redis, celery_app, batch_ids) == 0
        announced = set(results_redis.pubsub_channels(b"celery-task-meta-*"))
        assert not announced & {channel(celery_app, b) for b in batch_ids}
        [client] = [c for c in results_redis.client_list() if c["id"] == str(wakeups.client_id)]
        assert client["sub"] == "0" and wakeups.live

    run(scenario)


def test_waits_poll_when_the_subscription_connection_is_killed(
    stack: Stack, ca: TestCA, celery_app: Celery, results_redis: redis.Redis
) -> None:
    """CLIENT KILL of the subscription connection, with pub/sub refused from then on: the
    waits in progress still get their verdicts, by polling. Once pub/sub is back, the
    connection is opened again and a later wait is woken again."""
    queue = JobQueue(celery_app)

    async def refused() -> tuple[object, int]:
        raise ConnectionRefusedError("pub/sub refused for the test")

    async def scenario() -> None:
        with paused(stack):
            job_id, device = registration(stack, ca, queue)
            waiting = asyncio.ensure_future(queue.wait_async(job_id, 60))
            await asyncio.sleep(0)
            watcher, wakeups = watcher_of(queue)
            await until(lambda: bool(wakeups.subscribed), "the subscription")
            connect = wakeups._connect
            wakeups._connect = refused  # type: ignore[assignment]
            assert results_redis.client_kill_filter(_id=str(wakeups.client_id)) == 1
            await until(lambda: not wakeups.live, "the broken connection noticed")
        status = await waiting
        assert status.status == "done" and status.result is not None
        assert status.result.key_id == device.key_id_b64
        assert watcher.found_on_wakeup == 0 and wakeups.failures >= 1
        assert not wakeups.live

        wakeups._connect = connect
        with paused(stack):
            job_id, _ = registration(stack, ca, queue)
            waiting = asyncio.ensure_future(queue.wait_async(job_id, 60))
            await until(lambda: bool(wakeups.subscribed), "subscribed again")
        assert (await waiting).status == "done"
        assert watcher.found_on_wakeup == 1 and wakeups.connections == 2

    run(scenario)


def test_waits_poll_when_pubsub_is_refused(stack: Stack, ca: TestCA, celery_app: Celery) -> None:
    """Wake-ups that cannot connect at all (a Redis that refuses pub/sub): the waits are
    answered by polling, and no request fails for it."""
    queue = JobQueue(celery_app)

    async def refused() -> tuple[object, int]:
        raise ConnectionRefusedError("pub/sub refused for the test")

    async def scenario() -> None:
        # The loop's watcher, with wake-ups that never connect.
        with queue._watchers_lock:
            watcher = queue._watchers[asyncio.get_running_loop()] = _Watcher(queue)
        wakeups = watcher._wakeups
        assert wakeups is not None
        wakeups._connect = refused  # type: ignore[assignment]
        with paused(stack):
            jobs = [registration(stack, ca, queue) for _ in range(3)]
            waiting = asyncio.gather(*(queue.wait_async(j, 60) for j, _ in jobs))
            await until(lambda: wakeups.failures >= 1, "a refused connection")
        statuses = await waiting
        assert [s.result.key_id if s.result else None for s in statuses] == [
            d.key_id_b64 for _, d in jobs
        ]
        assert watcher.found_on_wakeup == 0 and wakeups.connections == 0

    run(scenario)


def test_redis_restart_during_a_wait(ca: TestCA, pg_url: str, tmp_path: Path) -> None:
    """Redis restarts while a request waits: the wait ends as any wait on an unreachable
    backend does (QueueUnavailable: the API answers 202 with the job id), the wake-ups
    reconnect once Redis is back, and waiting again gets the verdict through them."""
    from tests.faults import redis_server
    from tests.test_faults import fault_stack

    with ExitStack() as cleanup:
        server = cleanup.enter_context(redis_server(persistent=True))
        stack = cleanup.enter_context(
            fault_stack(ca, tmp_path, store_url=pg_url, redis=server, env={})
        )
        app = create_celery_app(stack.settings)
        cleanup.callback(app.close)
        queue = JobQueue(app)

        async def scenario() -> None:
            # No worker yet: the job waits in the (persistent) queue.
            job_id, device = registration(stack, ca, queue)
            waiting = asyncio.ensure_future(queue.wait_async(job_id, 60))
            await asyncio.sleep(0)
            watcher, wakeups = watcher_of(queue)
            await until(lambda: bool(wakeups.subscribed), "the subscription")
            await asyncio.to_thread(server.stop, kill=True)
            with pytest.raises(QueueUnavailable):
                await waiting
            await asyncio.to_thread(server.start)
            waiting = asyncio.ensure_future(queue.wait_async(job_id, 60))
            await until(lambda: bool(wakeups.subscribed), "subscribed again", timeout=60)
            await asyncio.to_thread(stack.start_worker, name="a")
            status = await waiting
            assert status.status == "done" and status.result is not None
            assert status.result.key_id == device.key_id_b64
            assert watcher.found_on_wakeup == 1
            assert wakeups.connections == 2 and wakeups.failures >= 1

        asyncio.run(scenario())

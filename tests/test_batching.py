"""The producer's micro-batcher: single submissions arriving together share one message, a
lone job sent ``at_once`` does not wait for company, and the wait budget's total counts every
key's waits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from producer.batching import MicroBatcher
from producer.ratelimit import WaitBudget

# Long enough that a test passing within it cannot have waited for it.
FOREVER = 60.0


class Recorder:
    """A send that records each batch and answers with the items' ids."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()
        self.fail = fail

    def __call__(self, items: Sequence[str]) -> list[str]:
        with self.lock:
            self.batches.append(list(items))
        if self.fail is not None:
            raise self.fail
        return [f"id-{item}" for item in items]


def _submitted(
    pool: ThreadPoolExecutor, batcher: MicroBatcher[str, str], item: str, **kw: bool
) -> Future[str]:
    return pool.submit(batcher.submit, item, **kw)


def test_a_full_batch_is_sent_without_waiting_for_the_window() -> None:
    send = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=FOREVER, max_size=3)
    with ThreadPoolExecutor(3) as pool:
        futures = [_submitted(pool, batcher, item) for item in "abc"]
        assert [f.result(timeout=10) for f in futures] == ["id-a", "id-b", "id-c"]
    assert send.batches == [["a", "b", "c"]]


def test_a_job_sent_at_once_does_not_wait_for_company() -> None:
    send = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=FOREVER, max_size=100)
    assert batcher.submit("lone", at_once=True) == "id-lone"
    assert send.batches == [["lone"]]


def test_a_job_sent_at_once_joins_a_batch_already_open() -> None:
    """``at_once`` sends a batch the job opens; a batch another job opened keeps its window
    (here: it leaves when full), with the at-once job in it."""
    send = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=FOREVER, max_size=2)
    with ThreadPoolExecutor(2) as pool:
        first = _submitted(pool, batcher, "first")
        while not batcher._open.items:  # the first job opened the batch
            threading.Event().wait(0.001)
        second = _submitted(pool, batcher, "second", at_once=True)
        assert first.result(timeout=10) == "id-first"
        assert second.result(timeout=10) == "id-second"
    assert send.batches == [["first", "second"]]


def test_without_at_once_a_lone_job_waits_for_the_window() -> None:
    send = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=0.05, max_size=100)
    assert batcher.submit("alone") == "id-alone"
    assert send.batches == [["alone"]]


def test_every_submitter_of_a_failed_batch_gets_the_error() -> None:
    send = Recorder(fail=ConnectionError("broker down"))
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=FOREVER, max_size=2)
    with ThreadPoolExecutor(2) as pool:
        futures = [_submitted(pool, batcher, item) for item in "xy"]
        for future in futures:
            with pytest.raises(ConnectionError, match="broker down"):
                future.result(timeout=10)
    assert send.batches == [["x", "y"]]


def test_the_wait_budget_total_counts_every_key() -> None:
    budget = WaitBudget(limit=10)
    assert budget.take("a", 3) and budget.take("b", 2)
    assert budget.total == 5
    assert not budget.take("a", 8)  # over a's budget: nothing taken
    assert budget.total == 5
    budget.release("a", 3)
    assert budget.total == 2 and budget.held("a") == 0
    budget.release("b", 5)  # more than b holds: the total never goes below what is held
    assert budget.total == 0 and budget.held("b") == 0


def test_coroutines_share_a_batch_and_only_its_first_job_takes_a_thread() -> None:
    """Twenty coroutines on one loop submit together: one send of all twenty, each gets its
    own id, and the send ran in a thread other than the loop's."""
    send = Recorder()
    sent_from: list[str] = []

    def sending(items: Sequence[str]) -> list[str]:
        sent_from.append(threading.current_thread().name)
        return send(items)

    batcher: MicroBatcher[str, str] = MicroBatcher(sending, window=FOREVER, max_size=20)

    async def main() -> list[str]:
        return await asyncio.gather(*(batcher.submit_async(f"j{n}") for n in range(20)))

    assert asyncio.run(main()) == [f"id-j{n}" for n in range(20)]
    assert send.batches == [[f"j{n}" for n in range(20)]]
    assert sent_from != [threading.current_thread().name]


def test_threads_and_coroutines_share_a_batch() -> None:
    send = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=FOREVER, max_size=3)
    with ThreadPoolExecutor(1) as pool:
        from_thread = _submitted(pool, batcher, "thread")
        while not batcher._open.items:
            threading.Event().wait(0.001)

        async def main() -> list[str]:
            return await asyncio.gather(batcher.submit_async("a"), batcher.submit_async("b"))

        assert asyncio.run(main()) == ["id-a", "id-b"]
        assert from_thread.result(timeout=10) == "id-thread"
    assert send.batches == [["thread", "a", "b"]]


def test_a_coroutine_gets_the_error_of_its_batch() -> None:
    send = Recorder(fail=ConnectionError("broker down"))
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=FOREVER, max_size=2)

    async def main() -> list[BaseException | str]:
        return await asyncio.gather(
            batcher.submit_async("x"), batcher.submit_async("y"), return_exceptions=True
        )

    outcomes = asyncio.run(main())
    assert [type(outcome) for outcome in outcomes] == [ConnectionError, ConnectionError]
    assert send.batches == [["x", "y"]]


def test_a_coroutine_whose_batch_is_not_sent_in_time_gets_a_timeout() -> None:
    """A batch whose first job is held elsewhere (a thread waiting out a long window): a
    coroutine joining it gives up after its own timeout, with TimeoutError."""
    send = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=2.0, max_size=100)
    with ThreadPoolExecutor(1) as pool:
        first = _submitted(pool, batcher, "first")
        while not batcher._open.items:
            threading.Event().wait(0.001)
        with pytest.raises(TimeoutError, match="not sent in time"):
            asyncio.run(batcher.submit_async("late", timeout=0.05))
        assert first.result(timeout=10) == "id-first"
    assert send.batches == [["first", "late"]]


def test_a_batch_is_sent_even_when_the_request_leading_it_is_cancelled() -> None:
    """The first job of a batch hands it to a thread as it joins: cancelling its request
    (a client gone) neither loses the batch nor leaves the jobs that joined it waiting."""
    send = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(send, window=0.2, max_size=100)

    async def main() -> str:
        leader = asyncio.ensure_future(batcher.submit_async("first"))
        await asyncio.sleep(0)  # it joined and handed the batch to a thread
        leader.cancel()
        follower = await batcher.submit_async("second", timeout=10)
        with pytest.raises(asyncio.CancelledError):
            await leader
        return follower

    assert asyncio.run(main()) == "id-second"
    assert send.batches == [["first", "second"]]

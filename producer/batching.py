"""Coalescing jobs into batch messages.

A batch of jobs travels as one Celery message and its verdicts come back as one result,
so a burst pays the queue's per-message cost once per batch instead of once per job. Every
job keeps its own id: a batch job id is a UUID that carries the batch's id and the job's
position, so any producer process can find a verdict from the job id alone.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

# Bytes 10-11 of a batch job id; the last four bytes hold the job's index (0xFFFFFFFF names
# the batch itself). Ids of jobs sent on their own are drawn until they do not carry the mark.
_MARK: Final = b"\xba\x7c"
_BATCH_INDEX: Final = 0xFFFFFFFF


def new_batch(size: int) -> tuple[str, list[str]]:
    """A fresh batch id and the ids of its ``size`` jobs."""
    prefix = uuid.uuid4().bytes[:10] + _MARK
    batch_id = str(uuid.UUID(bytes=prefix + _BATCH_INDEX.to_bytes(4, "big")))
    return batch_id, [str(uuid.UUID(bytes=prefix + i.to_bytes(4, "big"))) for i in range(size)]


def batch_of(job_id: str) -> tuple[str, int] | None:
    """The batch id and index a job id carries, or None for a job sent on its own."""
    try:
        raw = uuid.UUID(job_id).bytes
    except ValueError:
        return None
    index = int.from_bytes(raw[12:], "big")
    if raw[10:12] != _MARK or index == _BATCH_INDEX:
        return None
    return str(uuid.UUID(bytes=raw[:12] + _BATCH_INDEX.to_bytes(4, "big"))), index


T = TypeVar("T")


@dataclass
class _Open(Generic[T]):
    items: list[T] = field(default_factory=list)
    closed: bool = False
    sent: threading.Event = field(default_factory=threading.Event)
    ids: list[str] = field(default_factory=list)
    error: BaseException | None = None


class MicroBatcher(Generic[T]):
    """Gathers items submitted from many threads into batches for ``send``.

    The first item of a batch waits up to ``window`` seconds for company, or until the batch
    holds ``max_size`` items, then sends the whole batch; every submitter returns its own id
    only once its batch was handed to the broker (or raises the error that sending raised), so
    an id is never returned for a job that was not queued. At low load a job waits at most
    ``window`` seconds longer than it would alone.
    """

    def __init__(
        self, send: Callable[[Sequence[T]], list[str]], *, window: float, max_size: int
    ) -> None:
        if window < 0 or max_size < 1:
            raise ValueError("window must be >= 0 and max_size >= 1")
        self._send = send
        self._window = window
        self._max_size = max_size
        self._lock = threading.Condition()
        self._open: _Open[T] = _Open()

    def submit(self, item: T, *, timeout: float = 30.0) -> str:
        """Queue one item; return its id once its batch was sent."""
        with self._lock:
            batch = self._open
            index = len(batch.items)
            batch.items.append(item)
            if len(batch.items) >= self._max_size:
                self._close(batch)
        if index == 0:
            with self._lock:
                self._lock.wait_for(lambda: batch.closed, timeout=self._window)
                self._close(batch)
            try:
                batch.ids = self._send(batch.items)
            except BaseException as exc:
                batch.error = exc
            finally:
                batch.sent.set()
        elif not batch.sent.wait(timeout):
            raise TimeoutError("the batch holding this job was not sent in time")
        if batch.error is not None:
            raise batch.error
        return batch.ids[index]

    def _close(self, batch: _Open[T]) -> None:
        # Called with the lock held.
        if not batch.closed:
            batch.closed = True
            if self._open is batch:
                self._open = _Open()
            self._lock.notify_all()

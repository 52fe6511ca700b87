"""Coalescing jobs into batch messages, and job ids that carry their batch unreadably.

A batch of jobs travels as one Celery message and its verdicts come back as one result,
so a burst pays the queue's per-message cost once per batch instead of once per job. Every
job keeps its own id. A job id is the batch's id (the day it was made and a unique number)
and the job's position, sealed with a key of the submitting caller's own (one AES block): to
anyone else it is 128 random bits, so the ids of a batch's other jobs cannot be guessed from
it, and only the caller who submitted a job can open its id to find the batch, so another
caller's lookup of it finds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final, Generic, TypeVar

import anyio.to_thread
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# A sealed id holds 9 random bytes of batch id, 2 bytes of index and 5 bytes of this mark: an
# id not sealed by this caller opens to the mark by chance once in 2**40.
_MARK: Final = b"\xba\x7c\x4a\x0b\x51"
_BATCH_BYTES: Final = 9
BATCH_PREFIX: Final = "batch-"
MAX_BATCH_SIZE: Final = 0xFFFF


@dataclass(frozen=True)
class Owner:
    """Who submits jobs: a name recorded with each verdict (never a secret) and the key that
    seals the ids of its jobs."""

    name: str
    seal_key: bytes = field(repr=False)

    @cached_property
    def _cipher(self) -> Cipher[modes.ECB]:
        # The key schedule, made once: a fresh Cipher per id cost 7 us, this 1.5.
        return Cipher(algorithms.AES(self.seal_key), modes.ECB())  # noqa: S305

    @classmethod
    def from_secret(cls, name: str, secret: bytes) -> Owner:
        """An owner whose sealing key is derived from a secret only it and the service share
        (the digest of its API key)."""
        key = hmac.new(secret, b"appattest job ids v1", hashlib.sha256).digest()[:16]
        return cls(name=name, seal_key=key)

    @classmethod
    def ephemeral(cls, name: str) -> Owner:
        """An owner with a random key: its job ids can be read only through this object."""
        return cls(name=name, seal_key=os.urandom(16))


class _BatchIds:
    """Batch ids: the day they were made (2 bytes, days since 1970, UTC), a random prefix of
    this process (4 bytes) and a counter (3 bytes). The day tells how old a job is, so that a
    job whose verdict was purged (``verdict_retention_days``) answers ``job_expired`` rather
    than ``lost``; the prefix and the counter keep ids unique (a random 7 bytes per day would
    not, at millions of batches a day). A new prefix is drawn when the counter wraps and in a
    forked process. Job ids stay unguessable: they are sealed with the owner's key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._prefix = b""
        self._counter = 0

    def next(self) -> str:
        day = int(time.time() // 86_400) & 0xFFFF
        with self._lock:
            if self._pid != os.getpid() or self._counter >= 0xFFFFFF:
                self._pid, self._prefix, self._counter = os.getpid(), os.urandom(4), 0
            self._counter += 1
            raw = day.to_bytes(2, "big") + self._prefix + self._counter.to_bytes(3, "big")
        return BATCH_PREFIX + raw.hex()


_batch_ids = _BatchIds()


def new_batch_id() -> str:
    """A fresh batch id (the task id of its message), unique, carrying the day it was made."""
    return _batch_ids.next()


def batch_day(batch_id: str) -> int | None:
    """The day (days since 1970-01-01, UTC) ``batch_id`` was made; None when it is not a batch
    id. Ids made before the day was kept carry a random number here."""
    if not batch_id.startswith(BATCH_PREFIX):
        return None
    try:
        raw = bytes.fromhex(batch_id.removeprefix(BATCH_PREFIX))
    except ValueError:
        return None
    return int.from_bytes(raw[:2], "big") if len(raw) == _BATCH_BYTES else None


def seal_job_id(owner: Owner, batch_id: str, index: int) -> str:
    """The id of the job at ``index`` of batch ``batch_id``, as ``owner`` sees it."""
    if not batch_id.startswith(BATCH_PREFIX) or not 0 <= index <= MAX_BATCH_SIZE:
        raise ValueError("not a batch id, or an index out of range")
    plain = bytes.fromhex(batch_id.removeprefix(BATCH_PREFIX)) + index.to_bytes(2, "big") + _MARK
    encryptor = owner._cipher.encryptor()
    return str(uuid.UUID(bytes=encryptor.update(plain) + encryptor.finalize()))


def open_job_id(owner: Owner, job_id: str) -> tuple[str, int] | None:
    """The batch id and index that ``owner`` sealed into ``job_id``, or None when ``job_id``
    is not an id this owner was given."""
    try:
        raw = uuid.UUID(job_id).bytes
    except ValueError:
        return None
    # One AES block encrypts one unique plaintext (a fresh batch id and an index): ECB is the
    # block cipher itself here, a pseudorandom permutation of ids, not a mode over a message.
    decryptor = owner._cipher.decryptor()
    plain = decryptor.update(raw) + decryptor.finalize()
    if not hmac.compare_digest(plain[_BATCH_BYTES + 2 :], _MARK):
        return None
    index = int.from_bytes(plain[_BATCH_BYTES : _BATCH_BYTES + 2], "big")
    return BATCH_PREFIX + plain[:_BATCH_BYTES].hex(), index


T = TypeVar("T")


@dataclass
class _Open(Generic[T]):
    items: list[T] = field(default_factory=list)
    closed: bool = False
    sent: threading.Event = field(default_factory=threading.Event)
    ids: list[Any] = field(default_factory=list)  # the outcomes, once sent
    error: BaseException | None = None
    # Submitters waiting on an event loop: each loop's future, set once the batch was sent.
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(
        default_factory=list
    )


R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Gathers items submitted from many threads and event loops into batches for ``send``.

    The first item of a batch waits up to ``window`` seconds for company, or until the batch
    holds ``max_size`` items, then sends the whole batch; every submitter returns its own id
    only once its batch was handed to the broker (or raises the error that sending raised), so
    an id is never returned for a job that was not queued. At low load a job waits at most
    ``window`` seconds longer than it would alone, and an item submitted ``at_once`` that
    finds no batch open is sent without waiting.

    ``submit_async`` is the same for a coroutine: only the first item of a batch takes a
    thread (to wait for company and send); the others wait on the event loop.
    """

    def __init__(
        self, send: Callable[[Sequence[T]], list[R]], *, window: float, max_size: int
    ) -> None:
        if window < 0 or max_size < 1:
            raise ValueError("window must be >= 0 and max_size >= 1")
        self._send = send
        self._window = window
        self._max_size = max_size
        self._lock = threading.Condition()
        self._open: _Open[T] = _Open()

    def _join(self, item: T) -> tuple[_Open[T], int]:
        # Called with the lock held.
        batch = self._open
        index = len(batch.items)
        batch.items.append(item)
        if len(batch.items) >= self._max_size:
            self._close(batch)
        return batch, index

    def submit(self, item: T, *, timeout: float = 30.0, at_once: bool = False) -> R:
        """Queue one item; return its outcome (its id) once its batch was sent. With
        ``at_once``, an item that opens a batch sends it without waiting for company."""
        with self._lock:
            batch, index = self._join(item)
        if index == 0:
            self._lead(batch, at_once)
        elif not batch.sent.wait(timeout):
            raise TimeoutError("the batch holding this job was not sent in time")
        return self._outcome(batch, index)

    async def submit_async(self, item: T, *, timeout: float = 30.0, at_once: bool = False) -> R:
        """Like ``submit``, from a coroutine."""
        loop = asyncio.get_running_loop()
        with self._lock:
            batch, index = self._join(item)
            if index:
                # Registered before the batch can be sent: it is sent after it is closed, and
                # its waiters are read under this lock.
                future: asyncio.Future[None] = loop.create_future()
                batch.waiters.append((loop, future))
        if index == 0:
            # A task of its own, shielded: whatever becomes of this request (a cancellation
            # before a thread was free), the batch is sent and its members told.
            leading = asyncio.ensure_future(anyio.to_thread.run_sync(self._lead, batch, at_once))
            await asyncio.shield(leading)
        else:
            try:
                async with asyncio.timeout(timeout):
                    await future
            except TimeoutError:
                raise TimeoutError("the batch holding this job was not sent in time") from None
        return self._outcome(batch, index)

    def _lead(self, batch: _Open[T], at_once: bool) -> None:
        """Wait for company (unless ``at_once``), then send the batch and tell its
        submitters."""
        with self._lock:
            if not at_once:
                self._lock.wait_for(lambda: batch.closed, timeout=self._window)
            self._close(batch)
        try:
            batch.ids = self._send(batch.items)
        except BaseException as exc:
            batch.error = exc
        finally:
            with self._lock:
                batch.sent.set()
                waiters, batch.waiters = batch.waiters, []
            for loop, future in waiters:
                with contextlib.suppress(RuntimeError):  # that loop was closed
                    loop.call_soon_threadsafe(_settle, future)

    @staticmethod
    def _outcome(batch: _Open[T], index: int) -> R:
        if batch.error is not None:
            raise batch.error
        outcome: R = batch.ids[index]
        return outcome

    def _close(self, batch: _Open[T]) -> None:
        # Called with the lock held.
        if not batch.closed:
            batch.closed = True
            if self._open is batch:
                self._open = _Open()
            self._lock.notify_all()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

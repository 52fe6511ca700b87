"""The queue contract: every message a producer of work puts on a queue, in one module.

A message is a typed, frozen model. This module owns the task names, the queues, the
encoding of a message to the JSON argument of its task (with a version field ``v``), its
decoding back, and the one function that publishes work: ``publish``. The API's producer, the
bulk import, re-verification and the ledger's resend all publish through it.

Adding a kind of message is one place: a model subclassing ``Message`` with its ``task`` and
``queue``, and its entry in ``_MESSAGES``. A field that older workers may ignore (say a
submission time or a request id for log correlation) is added as optional and keeps the
version; a change that an older worker would misread raises ``VERSION``, and a worker refuses
what it cannot read with a logged ``UnsupportedMessage`` and a result saying so, never a retry.

Messages written before versions existed carry no ``v``; they read as version 1, the shapes
are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Protocol

from celery import Celery, states
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The version this code writes and the versions it reads.
VERSION: Final = 1
READABLE_VERSIONS: Final = frozenset({1})

# Queues. Jobs of another kind get a queue of their own, named here: Android jobs wait on
# Google's network answers, so a pool of threads serves their queue, apart from the processes
# that run Apple's CPU-bound checks.
QUEUE: Final = "appattest"
# Receipt refreshes wait on Apple's fraud-metric service (I/O): a queue of their own, served by
# a pool of threads, so that the CPU-bound verification workers never wait on Apple.
RECEIPTS_QUEUE: Final = "appattest.receipts"
ANDROID_QUEUE: Final = "appattest.android"

# Task names: running deployments hold queued messages under these names; never rename them.
VERIFY_TASK: Final = "appattest.verify"
REVERIFY_TASK: Final = "appattest.reverify"
VERIFY_BATCH_TASK: Final = "appattest.verify_batch"
VERIFY_ANDROID_BATCH_TASK: Final = "appattest.verify_android_batch"
REFRESH_TASK: Final = "appattest.refresh_receipts"

# The largest batch a message may carry: bounds the memory and the transaction of one task.
MAX_BATCH_JOBS: Final = 1000
# The most keys one refresh message carries (each costs a call to Apple).
MAX_REFRESH_KEYS: Final = 1000

# The printable copy of a message's arguments in its headers, for monitoring tools and worker
# logs: tokens, challenges and payloads stay out of it.
REDACTED_ARGS: Final = "(<job>,)"

# What a publish raises when the broker cannot be reached.
PUBLISH_ERRORS: Final[tuple[type[BaseException], ...]] = (
    KombuOperationalError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)


class MessageError(ValueError):
    """A task's argument is not a message of that task: the detail says why."""

    def __init__(self, task: str, detail: str) -> None:
        super().__init__(f"{task}: {detail}")
        self.task = task
        self.detail = detail


class UnsupportedMessage(MessageError):
    """A message of a version this worker cannot read (written by a newer producer)."""

    def __init__(self, task: str, version: object) -> None:
        supported = ", ".join(str(v) for v in sorted(READABLE_VERSIONS))
        super().__init__(
            task, f"message version {version!r} is not supported (this worker reads {supported})"
        )
        self.version = version


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("the instant has no time zone")
    return value


_Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]
_KeyId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Message(BaseModel):
    """A queue message: its task, its queue, and its fields (the wire names are aliases).

    Unknown fields are ignored, so that a producer may add an optional field without a new
    version. A plugin body travels as the JSON it was (``Any``): the task validates it against
    the plugin contract, so a bad body becomes that job's rejection, not the batch's."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    task: ClassVar[str]
    queue: ClassVar[str] = QUEUE

    # When the work was handed to ``publish`` (set there when absent; a resend keeps the
    # first): the workers' submission-to-verdict histogram and the broker's oldest-job age
    # read it. Optional, so older workers ignore it and messages without it still read.
    submitted_at: Annotated[datetime | None, AfterValidator(_aware)] = Field(
        default=None, validation_alias="submittedAt", serialization_alias="submittedAt"
    )


class VerifyJob(BaseModel):
    """One job of a verify batch: its (sealed) id, the plugin body, the submitting key's name."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    job_id: _Id = Field(validation_alias="jobId", serialization_alias="jobId")
    body: Any
    submitted_by: _Id | None = Field(
        default=None, validation_alias="submittedBy", serialization_alias="submittedBy"
    )
    # The HTTP request that submitted the job (``X-Request-ID``), for log correlation.
    request_id: _Id | None = Field(
        default=None, validation_alias="requestId", serialization_alias="requestId"
    )


class VerifyBatch(Message):
    """``appattest.verify_batch``: jobs of the HTTP producer, decided together."""

    task: ClassVar[str] = VERIFY_BATCH_TASK

    jobs: tuple[VerifyJob, ...] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


class VerifyAndroidBatch(Message):
    """``appattest.verify_android_batch``: Android jobs of the HTTP producer (bodies with
    ``"platform": "android"``), on the Android queue; the same jobs as ``VerifyBatch``."""

    task: ClassVar[str] = VERIFY_ANDROID_BATCH_TASK
    queue: ClassVar[str] = ANDROID_QUEUE

    jobs: tuple[VerifyJob, ...] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


class VerifyOne(Message):
    """``appattest.verify``: one plugin body, the job id being the task id.

    ``challenges_given`` (wire ``"challenges": "given"``) and ``at`` are for operator imports
    (``appattest verify --queue``, an operator with broker access): challenges issued elsewhere
    are taken as given, and the body may be verified as of an instant. The HTTP producer never
    sets them."""

    task: ClassVar[str] = VERIFY_TASK

    body: Any = None
    challenges_given: bool = False
    at: Annotated[datetime | None, AfterValidator(_aware)] = None


class ReverifyBatch(Message):
    """``appattest.reverify``: keys of a re-verification run; idempotent per (run, key)."""

    task: ClassVar[str] = REVERIFY_TASK

    run_id: _Id = Field(validation_alias="runId", serialization_alias="runId")
    key_ids: tuple[_KeyId, ...] = Field(
        validation_alias="keyIds", serialization_alias="keyIds", max_length=100_000
    )


class RefreshReceipts(Message):
    """``appattest.refresh_receipts``: keys whose receipts are to be exchanged at Apple's
    fraud-metric service, on the receipts queue. ``run_id`` names the ``appattest receipts
    refresh`` run they belong to; the periodic refresh sends none. Idempotent per (run, key):
    a key already decided in the run is not exchanged again."""

    task: ClassVar[str] = REFRESH_TASK
    queue: ClassVar[str] = RECEIPTS_QUEUE

    run_id: _Id | None = Field(default=None, validation_alias="runId", serialization_alias="runId")
    key_ids: tuple[_KeyId, ...] = Field(
        validation_alias="keyIds",
        serialization_alias="keyIds",
        min_length=1,
        max_length=MAX_REFRESH_KEYS,
    )


_MESSAGES: Final[dict[str, type[Message]]] = {
    m.task: m for m in (VerifyBatch, VerifyAndroidBatch, VerifyOne, ReverifyBatch, RefreshReceipts)
}


def queues() -> tuple[str, ...]:
    """Every queue a message is published to, in a stable order (for monitoring)."""
    return tuple(sorted({m.queue for m in _MESSAGES.values()}))


def queue_of(task: str) -> str:
    """The queue the messages of ``task`` travel on (the default queue for an unknown task)."""
    model = _MESSAGES.get(task)
    return model.queue if model is not None else QUEUE


def encode(message: Message) -> dict[str, Any]:
    """The JSON argument of ``message``'s task, with its version."""
    payload: dict[str, Any] = message.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude={"challenges_given"}
    )
    if isinstance(message, VerifyOne) and message.challenges_given:
        payload["challenges"] = "given"
    return {"v": VERSION, **payload}


def decode(task: str, payload: object) -> Message:
    """The message of ``task`` that ``payload`` (its JSON argument) holds.

    Raises ``UnsupportedMessage`` for a version this code cannot read and ``MessageError``
    for anything else that is not such a message (an unknown task, a missing field)."""
    model = _MESSAGES.get(task)
    if model is None:
        raise MessageError(task, "no message of this task is known")
    if not isinstance(payload, dict):
        raise MessageError(task, "the message is not a JSON object")
    version = payload.get("v", 1)  # messages from before versions are version 1
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UnsupportedMessage(task, version)
    fields = {k: v for k, v in payload.items() if k not in ("v", "challenges")}
    if model is VerifyOne:
        challenges = payload.get("challenges")
        if challenges not in (None, "given"):
            raise MessageError(task, f"challenges must be 'given', not {challenges!r}")
        fields["challenges_given"] = challenges == "given"
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise MessageError(task, f"{where}: {first['msg']}") from exc


class LedgerEntries(Protocol):
    """What ``publish`` needs of the ledger (``worker.queue.ledger.Ledger``)."""

    def record(self, entries: Sequence[tuple[str, str, dict[str, Any]]]) -> None: ...


def publish(
    app: Celery,
    task_id: str,
    message: Message,
    *,
    ledger: LedgerEntries | None,
    producer: Any = None,
    unreachable: tuple[type[BaseException], ...] = PUBLISH_ERRORS,
) -> bool:
    """Publish ``message`` under ``task_id``: the one way work is put on a queue.

    ``ledger`` is the broker's ledger (``worker.queue.ledger.ledger_for``; None when the broker
    needs none, or for a resend of an entry already there). With a ledger the entry is written
    first and is what accepts the job: a publish that then fails with one of ``unreachable``
    is logged by the caller's choice and left to the ledger's sweep, which sends it again;
    returns False then, True once published. Without a ledger a failed publish raises.

    Celery's own message layer publishes (routing, retry policy and signals are Celery's), but
    not ``send_task``: with the Redis result backend it subscribes to every job's result
    channel. The headers carry ``REDACTED_ARGS``, never the message.
    """
    if message.submitted_at is None:
        message = message.model_copy(update={"submitted_at": datetime.now(UTC)})
    payload = encode(message)
    if ledger is not None:
        ledger.record([(task_id, message.task, payload)])
    try:
        if producer is None:
            with app.producer_or_acquire() as acquired:
                _send(app, acquired, task_id, message, payload)
        else:
            _send(app, producer, task_id, message, payload)
    except unreachable:
        if ledger is None:
            raise
        return False
    return True


def _send(app: Celery, producer: Any, task_id: str, message: Message, payload: Any) -> None:
    args = (payload,)
    amqp = app.amqp
    celery_message = amqp.create_task_message(
        task_id,
        message.task,
        args,
        {},
        reply_to=app.thread_oid,
        create_sent_event=app.conf.task_send_sent_event,
        argsrepr=REDACTED_ARGS,
        kwargsrepr="{}",
    )
    options = amqp.router.route({"queue": message.queue}, message.task, args, {})
    amqp.send_task_message(producer, message.task, celery_message, **options)


def read_task_metas(backend: Any, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored states of these tasks in ``backend``: one read (MGET) on a key-value backend
    such as Redis, one read per task on any other. A task with nothing stored reads PENDING."""
    if not task_ids:
        return {}
    values = None
    if hasattr(backend, "mget") and hasattr(backend, "get_key_for_task"):
        keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
        try:
            values = backend.mget(keys)
        except NotImplementedError:  # a key-value backend without bulk reads
            values = None
    if values is None:
        return {task_id: backend.get_task_meta(task_id, cache=False) for task_id in task_ids}
    return {
        task_id: backend.decode_result(value)
        if value
        else {"status": states.PENDING, "result": None}
        for task_id, value in zip(task_ids, values, strict=True)
    }

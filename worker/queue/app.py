"""The Celery application, built from settings; no settings are read at import."""

from __future__ import annotations

from typing import Final

from celery import Celery

from worker.queue.messaging import QUEUE
from worker.settings import Settings

_EMBEDDED_TRANSPORT: Final = "worker.queue.embedded_transport:Transport"
_REDIS_TRANSPORT: Final = "worker.queue.redis_transport:Transport"


def create_celery_app(settings: Settings) -> Celery:
    """Build the Celery app for these settings and register the tasks on it: the workers'."""
    app = queue_app(settings)
    from worker.queue import tasks

    tasks.register(app, settings)
    return app


def queue_app(settings: Settings) -> Celery:
    """The Celery app for these settings without the tasks: what a process that only
    publishes and reads results needs (the API), which so loads no verification code."""
    app = Celery("appattest", set_as_current=False)
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        # JSON only: task arguments and results are the contract's JSON, never pickles.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        # Late acknowledgement: a message is acknowledged after its task finished, so a worker
        # killed mid-task leaves it to be redelivered; verdicts are idempotent per job id.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message in flight per worker process beyond the one it runs: a dying process
        # strands little, and a burst spreads over all processes instead of piling on one.
        worker_prefetch_multiplier=1,
        result_expires=settings.result_ttl_seconds,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Hide task arguments (tokens, challenges) from Celery's own logs and events.
        worker_log_format="%(asctime)s %(levelname)s %(processName)s %(message)s",
        # Celery's task events (-E, and "task-sent" from publishers) for Flower and exporters;
        # APPATTEST_CELERY_EVENTS=false turns them off. Arguments in events are redacted
        # (worker.queue.messaging.REDACTED_ARGS).
        worker_send_task_events=settings.celery_events,
        task_send_sent_event=settings.celery_events,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Verdicts take milliseconds, so a message unacknowledged for this long belongs to a
        # worker that died; it is redelivered, and the verdicts table makes that idempotent.
        timeout = settings.visibility_timeout_seconds
        app.conf.broker_transport_options = {
            "visibility_timeout": timeout,
            # Look for messages of dead workers often (kombu's default is every 100 s, or when
            # a worker starts), so that they come back soon after the visibility timeout.
            "unacked_restore_interval": max(1, min(10, timeout // 2)),
            "unacked_restore_throttle": 1,
        }
    if settings.broker_url.startswith("redis://"):
        # kombu's Redis transport with a fix for a channel left behind by a connection that
        # Redis closed as it died (see the module): the worker would exit, and a producer's
        # pooled publisher would raise AttributeError (a 500) instead of a connection error
        # that kombu recovers from. Not for rediss://, whose defaults kombu picks by the
        # transport's name.
        app.conf.broker_transport = _REDIS_TRANSPORT
    if settings.broker_url.startswith("sqla+"):
        # The embedded broker is a polled database table; poll often enough that a single job
        # is not held back by the default one-second interval (see worker.queue.embedded_transport).
        # The transport is named by its class for this app alone (kombu's global table of
        # transport aliases is left as it is): the URL loses its "sqla+" prefix, which would
        # otherwise choose kombu's own transport.
        app.conf.broker_transport = _EMBEDDED_TRANSPORT
        app.conf.broker_url = settings.broker_url.removeprefix("sqla+")
    app.conf.appattest_settings = settings
    return app

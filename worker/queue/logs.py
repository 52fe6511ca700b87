"""Logging: the worker's own wording of Celery's task lines, and structured (JSON) lines.

Celery logs every task that succeeded at INFO, with its return value: for a batch, every
verdict of every job. Those are the service's answers (key ids, app ids, reasons) and can run
to megabytes per line, so the worker's line says which task succeeded and how long it took.
The verdicts themselves are in the store and the result backend.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Final

from celery import current_task
from celery.app import trace

# Celery's own line up to the result, so that what reads the log still finds it.
SUCCESS_LINE = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


class _SuccessWithoutResult(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == trace.LOG_SUCCESS:
            record.msg = SUCCESS_LINE
        return True


_FILTER = _SuccessWithoutResult()


def omit_task_results() -> None:
    """Log Celery's task success lines without the task's return value, in this process and
    in the pool processes it starts afterwards."""
    logging.getLogger(trace.logger.name).addFilter(_FILTER)


# Structured logs ----------------------------------------------------------------------------

# The request being served (the producer) or that submitted the job being decided (a worker).
request_id_var: ContextVar[str | None] = ContextVar("appattest_request_id", default=None)

# Attributes a log call may set (``extra=``) that a JSON line carries as fields of its own.
CONTEXT_FIELDS: Final = ("request_id", "job_id", "task_id", "kind", "app_id", "reason")


def _current_task_id() -> str | None:
    task = current_task
    request = getattr(task, "request", None) if task is not None else None
    task_id = getattr(request, "id", None)
    return task_id if isinstance(task_id, str) else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, and the job's and the
    request's ids when the line is about one (``CONTEXT_FIELDS``). A traceback, when there is
    one, is a field too. Nothing else of the record is written: a record's arguments may hold
    what a line must not show, and only the message built from them is."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if "request_id" not in entry and (request_id := request_id_var.get()) is not None:
            entry["request_id"] = request_id
        if "task_id" not in entry and (task_id := _current_task_id()) is not None:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_format: str) -> None:
    """Give the root logger's handlers (a standard-error handler when it has none) the
    ``json`` or ``text`` format; the processes a worker forks inherit it."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)

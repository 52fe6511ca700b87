"""The worker's own wording of Celery log lines that would print whole results.

Celery logs every task that succeeded at INFO, with its return value: for a batch, every
verdict of every job. Those are the service's answers (key ids, app ids, reasons) and can run
to megabytes per line, so the worker's line says which task succeeded and how long it took.
The verdicts themselves are in the store and the result backend.
"""

from __future__ import annotations

import logging

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

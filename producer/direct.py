"""Direct enqueueing for Python callers that share the broker: no HTTP in between.

The same checks as the HTTP API apply before a body is queued, and verdicts are read by
polling the result backend, never through a pub/sub subscription. Challenges still come from
the challenge store (``POST /v1/challenges``, or ``new_challenge`` and ``store_challenges`` of
``worker.store.challenges``).
"""

from __future__ import annotations

from celery import Celery

from producer.jobs import JobQueue, PluginBody, check_request
from producer.schemas import JobStatus
from worker.contract import VerificationResult


class QueueClient:
    """Queue plugin bodies through a Celery app and wait for their verdicts.

    Takes a Celery app configured like the workers' (``worker.queue.app.create_celery_app``);
    the caller owns it and closes it.
    """

    def __init__(self, celery_app: Celery) -> None:
        self._queue = JobQueue(celery_app)

    def submit(self, body: PluginBody) -> str:
        """Validate one plugin body and queue it; return its job id.

        Takes JSON text, a decoded object or a contract model. Raises ``worker.core.Rejected``
        with ``invalid_request`` or ``unsupported_format`` for a body that could never be
        judged, and ``producer.errors.QueueUnavailable`` when the broker is down.
        """
        return self._queue.submit(check_request(body))

    def status(self, job_id: str) -> JobStatus:
        """Where the job stands now (``not_found`` for an id this client did not submit)."""
        return self._queue.status(job_id)

    def result(self, job_id: str, timeout: float = 30.0) -> VerificationResult:
        """Poll until the job's verdict is in; return it.

        Raises ``TimeoutError`` when it is not in after ``timeout`` seconds, ``LookupError``
        for a job this client did not submit (or whose record is gone), and
        ``QueueUnavailable`` when the result backend is down.
        """
        status = self._queue.wait(job_id, timeout)
        if status.result is None:
            if status.final and status.error is not None:
                raise LookupError(f"job {job_id}: {status.error.code}: {status.error.detail}")
            raise TimeoutError(f"job {job_id} has no verdict after {timeout} s")
        return status.result

    def verify(self, body: PluginBody, timeout: float = 30.0) -> VerificationResult:
        """Submit, then wait for the verdict: ``result(submit(body), timeout)``."""
        return self.result(self.submit(body), timeout)

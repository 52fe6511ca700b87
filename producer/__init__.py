"""The producer: the HTTP API and Python clients in front of the verification workers.

It validates plugin bodies against the contract, issues challenges, queues jobs and answers
with the workers' verdicts; it does no cryptography itself. ``create_app(settings)`` builds the
FastAPI app; ``AppAttestClient`` / ``AsyncAppAttestClient`` call it over HTTP; ``QueueClient``
queues through the broker directly.
"""

from producer.app import create_app
from producer.client import AppAttestClient, AppAttestError, AsyncAppAttestClient
from producer.direct import QueueClient
from producer.errors import ErrorCode, QueueUnavailable
from producer.schemas import BatchJob, IssuedChallenge, JobAccepted, JobStatus
from worker.version import __version__

__all__ = [
    "AppAttestClient",
    "AppAttestError",
    "AsyncAppAttestClient",
    "BatchJob",
    "ErrorCode",
    "IssuedChallenge",
    "JobAccepted",
    "JobStatus",
    "QueueClient",
    "QueueUnavailable",
    "__version__",
    "create_app",
]

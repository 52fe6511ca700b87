"""The queue adapters: the Celery app and its tasks, the one message contract and its publish
path, the Redis ledger, the broker transports, the worker's supervision and health check, and
the client of Google's Play Integrity API that Android jobs need."""

"""The queue adapters: the Celery app and its tasks, the one message contract and its publish
path, the Redis ledger, the broker transports, and the worker's supervision and health check."""

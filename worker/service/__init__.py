"""The service shell: the clock, the key store and the intermediate cache around the pure core."""

from worker.service.verification import VerificationService, utc_now

__all__ = ["VerificationService", "utc_now"]

"""The local fake of Google's Play Integrity endpoints, from the package (``appattest
simulate`` uses it too), re-exported for the tests and benchmarks."""

from worker.simulator.google import (
    CLIENT_EMAIL,
    FakeGoogle,
    b64url,
    fake_google,
    load_service_account,
    payload,
)

__all__ = ["CLIENT_EMAIL", "FakeGoogle", "b64url", "fake_google", "load_service_account", "payload"]

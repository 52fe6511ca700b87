"""Stable rejection reason codes and the one exception family that carries them."""

from __future__ import annotations

# The codes are a public contract the Python client reads too; they are defined once, in the
# client's package (shipped with this one, standard library only), and re-exported here.
from appattest_client.codes import Reason

__all__ = ["Reason", "Rejected"]


class Rejected(Exception):
    """A verification rejected its input.

    ``reason`` is the stable code callers branch on; ``detail`` is a human explanation that may
    change between releases and must never be parsed.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

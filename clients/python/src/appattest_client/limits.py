"""The size limits of the plugin contract's strings (standard library only).

The client's models enforce them on the bodies it sends, the service on the bodies it
receives, and the verification core again on the bytes it decodes.
"""

from __future__ import annotations

from typing import Final

# A real attestation object is about 5.5 KiB (most of it the receipt) and an assertion about
# 120 bytes. 32 KiB leaves room for larger receipts while keeping every parse cheap; the limit is
# enforced on the base64 text before anything is decoded.
MAX_TOKEN_BYTES: Final = 32 * 1024
MAX_TOKEN_CHARS: Final = 4 * ((MAX_TOKEN_BYTES + 2) // 3)
MAX_CHALLENGE_CHARS: Final = 1024
MAX_PAYLOAD_CHARS: Final = 64 * 1024

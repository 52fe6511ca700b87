"""Strict decoding of the untrusted bytes a device sends: base64 text and CBOR objects."""

from __future__ import annotations

import binascii
import io
import re
from collections.abc import Iterator, Mapping
from typing import Any

import cbor2

# The token limits belong to the plugin contract (the client validates bodies with them too);
# they are defined with it and re-exported here.
from appattest_client.limits import MAX_TOKEN_BYTES as MAX_TOKEN_BYTES
from appattest_client.limits import MAX_TOKEN_CHARS as MAX_TOKEN_CHARS
from worker.core.reasons import Reason, Rejected

# App Attest objects nest at most three levels (attestation -> attStmt -> x5c). A little slack,
# but nothing like the decoder's default of 400.
_MAX_CBOR_DEPTH = 8

_STANDARD_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def b64decode_strict(text: str, *, reason: Reason, what: str, max_chars: int) -> bytes:
    """Decode standard, padded base64 and nothing else.

    Takes the text, the reason code to raise with and a name for messages; returns the bytes.
    Raises ``Rejected`` for any character outside the standard alphabet (so base64url, spaces and
    line breaks are refused), missing padding, text longer than ``max_chars``, and non-canonical
    encodings whose unused bits are not zero (two texts must never decode to the same bytes).
    """
    if len(text) > max_chars:
        raise Rejected(reason, f"{what} is longer than {max_chars} characters")
    if len(text) % 4 != 0 or _STANDARD_BASE64.fullmatch(text) is None:
        raise Rejected(reason, f"{what} is not standard padded base64")
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise Rejected(reason, f"{what} is not standard padded base64") from exc
    if binascii.b2a_base64(raw, newline=False).decode("ascii") != text:
        raise Rejected(reason, f"{what} is not canonical base64")
    return raw


def _reject_tag(*_args: object) -> object:
    raise cbor2.CBORDecodeError("CBOR tags are not allowed in App Attest objects")


class _EveryTag(Mapping[int, Any]):
    """Claims a decoder for every semantic tag, so that cbor2 builds no dates, regexes or
    fractions from attacker bytes: App Attest objects carry no tags at all."""

    def __getitem__(self, key: int) -> Any:
        return _reject_tag

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_TAGS = _EveryTag()
_DECODE_ERRORS = (
    cbor2.CBORError,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
    EOFError,
    MemoryError,
)


def _decoder(stream: io.BytesIO, read_size: int) -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        stream,
        semantic_decoders=_NO_TAGS,
        tag_hook=_reject_tag,
        max_depth=_MAX_CBOR_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        read_size=read_size,
    )


def _decode_canonical(stream: io.BytesIO, read_size: int) -> tuple[object, bytes]:
    """Decode one item with the strict settings; return it and its deterministic encoding."""
    try:
        item = _decoder(stream, read_size).decode()
        # Devices emit deterministic (canonical) CBOR. Requiring it leaves exactly one encoding
        # per object, so no byte of an accepted object can change without a rejection, even in
        # framing that no signature covers.
        return item, cbor2.dumps(item, canonical=True)
    except _DECODE_ERRORS as exc:
        raise Rejected(Reason.MALFORMED_TOKEN, f"invalid CBOR: {exc}") from exc


def decode_cbor_prefix(data: bytes, offset: int = 0) -> tuple[object, int]:
    """Decode one CBOR item starting at ``offset`` with the strict settings.

    Returns the item and the offset just past it. Raises ``Rejected(malformed_token)`` for any
    decoding error, tags, indefinite lengths, duplicate map keys, nesting deeper than a real
    object has, and encodings that are not deterministic (shortest lengths, sorted map keys).
    """
    if offset >= len(data):
        raise Rejected(Reason.MALFORMED_TOKEN, "CBOR item expected but the data ended")
    stream = io.BytesIO(memoryview(data)[offset:])
    # Read byte by byte: the stream position must be exactly the item's end.
    item, canonical = _decode_canonical(stream, read_size=1)
    end = offset + stream.tell()
    if canonical != data[offset:end]:
        raise Rejected(Reason.MALFORMED_TOKEN, "CBOR is not in deterministic encoding")
    return item, end


def decode_cbor_exact(data: bytes) -> object:
    """Decode exactly one CBOR item that spans all of ``data``.

    Returns the item; raises ``Rejected(malformed_token)`` as ``decode_cbor_prefix`` does and
    also when bytes trail the item.
    """
    if not data:
        raise Rejected(Reason.MALFORMED_TOKEN, "CBOR item expected but the data ended")
    # Buffered reads: comparing the deterministic encoding with all of ``data`` also catches
    # trailing bytes, so the stream position is not needed.
    item, canonical = _decode_canonical(io.BytesIO(data), read_size=4096)
    if canonical != data:
        if data.startswith(canonical):
            raise Rejected(
                Reason.MALFORMED_TOKEN, f"{len(data) - len(canonical)} bytes trail the CBOR object"
            )
        raise Rejected(Reason.MALFORMED_TOKEN, "CBOR is not in deterministic encoding")
    return item

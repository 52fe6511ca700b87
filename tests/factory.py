"""The test suite's name for the project's App Attest generator, ``worker.simulator.devices``.

There is one generator: it lives in the package so that ``appattest simulate`` can mint
devices too. Tests and benchmarks import it from here.
"""

from __future__ import annotations

from worker.simulator.devices import (
    AAGUID_DEVELOPMENT,
    AAGUID_PRODUCTION,
    APP_ID,
    DEFAULT_RECEIPT,
    INTERMEDIATE_NAME,
    IOS27_EXTENSIONS,
    NONCE_EXTENSION_OID,
    PLUGIN_FORMAT,
    PLUGIN_PLATFORM,
    RECEIPT_INTERMEDIATE_MARKER_OID,
    RECEIPT_INTERMEDIATE_NAME,
    RECEIPT_ROOT_NAME,
    RECEIPT_SIGNER_MARKER_OID,
    RECEIPT_SIGNER_NAME,
    ROOT_NAME,
    Device,
    ReceiptCA,
    TestCA,
    client_data_hash,
    default_ca,
    make_receipt,
    nonce_extension,
    receipt_content,
    sign_receipt_content,
    uncompressed_point,
)

__all__ = [
    "AAGUID_DEVELOPMENT",
    "AAGUID_PRODUCTION",
    "APP_ID",
    "DEFAULT_RECEIPT",
    "INTERMEDIATE_NAME",
    "IOS27_EXTENSIONS",
    "NONCE_EXTENSION_OID",
    "PLUGIN_FORMAT",
    "PLUGIN_PLATFORM",
    "RECEIPT_INTERMEDIATE_MARKER_OID",
    "RECEIPT_INTERMEDIATE_NAME",
    "RECEIPT_ROOT_NAME",
    "RECEIPT_SIGNER_MARKER_OID",
    "RECEIPT_SIGNER_NAME",
    "ROOT_NAME",
    "Device",
    "ReceiptCA",
    "TestCA",
    "client_data_hash",
    "default_ca",
    "make_receipt",
    "nonce_extension",
    "receipt_content",
    "sign_receipt_content",
    "uncompressed_point",
]

"""The project's version, read from the installed package's metadata (its one source is
``version`` in pyproject.toml).

The version follows semantic versioning over three public contracts: the HTTP API, the reason
and error codes, and the Python client. Adding a code, a route, a field, a setting or a client
method is a minor release; renaming or removing one is a major release.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Final

DISTRIBUTION: Final = "appattest-backend"


def _installed_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        # Imported from a source tree that was never installed: there is no metadata to read.
        # Say so rather than guess a number that could be taken for a release.
        return "0+unknown"


__version__: Final = _installed_version()

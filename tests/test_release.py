"""The released contract kept in step with its documents: one version reported everywhere, the
README's table of reason codes equal to the code's enum (both ways), and a changelog that names
every code, route, setting, client method and command that exists."""

from __future__ import annotations

import inspect
import itertools
import re
import tomllib
from datetime import date
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from appattest.cli import main as cli
from producer import AppAttestClient, AsyncAppAttestClient, ErrorCode, QueueClient
from producer import __version__ as producer_version
from producer.app import create_app
from producer.routes import api_routes
from tests.faults import serve_app
from worker.core import Reason
from worker.settings import Settings
from worker.version import DISTRIBUTION, __version__

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
_RELEASE = re.compile(r"^## \[(?P<version>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?$", re.M)


def _settings() -> Settings:
    return Settings(app_ids=["ABCDE12345.com.example.app"], store_url="sqlite://")


# One version -----------------------------------------------------------------------------------


def test_installed_metadata_is_this_checkouts() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _SEMVER.fullmatch(pyproject), pyproject
    assert version(DISTRIBUTION) == pyproject, "stale install: run pip install -e '.[dev]'"


def test_one_version_everywhere() -> None:
    """The CLI, the package attributes, /healthz and the OpenAPI document all report the
    installed metadata's version."""
    assert __version__ == version(DISTRIBUTION) == producer_version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"appattest {__version__}\n"

    with serve_app(create_app(_settings())) as url, httpx.Client(base_url=url) as client:
        assert client.get("/healthz").json() == {"status": "ok", "version": __version__}
        assert client.get("/openapi.json").json()["info"]["version"] == __version__


# README tables ---------------------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match is not None, f"no section {heading!r}"
    return match.group(1)


def _table_codes(section: str) -> list[str]:
    """The backquoted codes in the first column of the first table of a section."""
    lines = section.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("| "))
    rows = list(itertools.takewhile(lambda line: line.startswith("| "), lines[start:]))
    assert len(rows) > 2, "no table"
    codes: list[str] = []
    for row in rows[2:]:
        codes += re.findall(r"`([a-z_]+)`", row.split("|")[1])
    return codes


def test_readme_reason_table_is_the_reason_enum() -> None:
    documented = _table_codes(_section(README, "Reason codes"))
    assert len(documented) == len(set(documented)), "a code is documented twice"
    in_code = {reason.value for reason in Reason}
    assert sorted(in_code - set(documented)) == [], "reason codes missing from the README table"
    assert sorted(set(documented) - in_code) == [], "README documents codes the code lacks"


# CHANGELOG -------------------------------------------------------------------------------------


def test_changelog_has_unreleased_then_this_release() -> None:
    releases = [(m["version"], m["date"]) for m in _RELEASE.finditer(CHANGELOG)]
    assert releases[0] == ("Unreleased", None)
    assert releases[1][0] == __version__, "the latest release section is not this version"
    dated = [(v, d) for v, d in releases[1:] if d is not None]
    assert dated, "no dated release"
    for name, day in releases[1:]:
        assert _SEMVER.fullmatch(name), name
        if day is not None:
            date.fromisoformat(day)
    numbers = [tuple(int(n) for n in name.split(".")) for name, _ in releases[1:]]
    assert numbers == sorted(numbers, reverse=True), "releases are not newest first"


def _public_methods(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, callable) if not name.startswith("_")}


def _contract() -> dict[str, set[str]]:
    """Everything a release must name when it adds it, as it would be written in the log."""
    routes = {f"{method} {route.path}" for route in api_routes() for method in route.methods}
    return {
        "reason code": {reason.value for reason in Reason},
        "error code": {code.value for code in ErrorCode},
        "route": routes,
        "setting": {f"APPATTEST_{name.upper()}" for name in Settings.model_fields},
        "client method": set().union(
            *(_public_methods(c) for c in (AppAttestClient, AsyncAppAttestClient, QueueClient))
        ),
        "command": {f"appattest {name}" for name in cli.commands},
    }


@pytest.mark.parametrize("kind", sorted(_contract()))
def test_changelog_names_every_part_of_the_contract(kind: str) -> None:
    """A code, route, setting, client method or command added without a changelog entry fails
    here: add it under [Unreleased]."""
    named = set(re.findall(r"`([^`]+)`", CHANGELOG))
    missing = sorted(item for item in _contract()[kind] if item not in named)
    assert missing == [], f"CHANGELOG.md names no {kind} {missing}"

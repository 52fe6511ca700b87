"""The Python client on its own: ``clients/python`` builds a distribution, ``appattest-client``,
that installs into a fresh virtual environment with httpx and pydantic and nothing of the
server (no FastAPI, Celery, SQLAlchemy, kombu or cryptography), and from there talks to a real
running service. In the full install, importing the client loads none of the server's
dependencies either, and the server's wire models are the client's own classes (one
definition, not two copies).

The fresh environment gets the client's dependencies from the package index pip is set up
with (pip's cache makes repeats quick); it sees nothing of the test environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from producer import create_app
from tests.factory import Device, TestCA
from tests.stack import Stack
from tests.test_producer_api import KEY, serve

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"
CLIENT_PROJECT = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
BACKEND_PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = CLIENT_PROJECT["version"]

# What a team that only calls the service must not have to install.
SERVER_MODULES = ("fastapi", "starlette", "celery", "kombu", "sqlalchemy", "cryptography")

# Run in a fresh interpreter of the full install: which top-level modules an import loads.
_LOADED = """
import json, sys
{statement}
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""

# Run with the client distribution's own interpreter, against a live service.
USER_SCRIPT = """
import asyncio, json, sys

from appattest_client import AppAttestClient, AsyncAppAttestClient, Reason, VerificationResult

mode, url, key = sys.argv[1:4]
with AppAttestClient(url, key) as client:
    if mode == "challenge":
        print(client.create_challenge("registration").challenge)
        sys.exit(0)
    body = json.loads(sys.stdin.read())
    job_id = client.submit_attestation(body)
    verdict = client.wait(job_id, timeout=30)
    assert isinstance(verdict, VerificationResult)
    replay = client.verify_attestation(body, timeout=30)
    assert isinstance(replay.reason, Reason)


async def read_again() -> dict:
    async with AsyncAppAttestClient(url, key) as client:
        status = await client.get_job(job_id)
        return status.model_dump(mode="json", by_alias=True)


print(json.dumps({
    "verdict": verdict.to_json_dict(),
    "replay": replay.reason.value,
    "status": asyncio.run(read_again()),
    "loaded": sorted({name.split(".")[0] for name in sys.modules}),
}))
"""


def _clean_env() -> dict[str, str]:
    """The environment less what would point Python or the project at this checkout."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV"} and not k.startswith("APPATTEST_")
    }


def _loaded_by(statement: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _LOADED.format(statement=statement)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


# The full install ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "import producer.client",
        "from producer import AppAttestClient, AsyncAppAttestClient, AppAttestError",
        "from producer.client import AppAttestClient, AsyncAppAttestClient",
        "import appattest_client; appattest_client.AppAttestClient",
    ],
)
def test_importing_the_client_loads_no_server_dependency(statement: str) -> None:
    loaded = _loaded_by(statement)
    assert {"httpx", "pydantic"} <= loaded
    assert sorted(loaded & {*SERVER_MODULES, "redis", "cbor2", "uvicorn"}) == []


def test_the_server_still_gets_everything_from_producer() -> None:
    # The lazy names of the package resolve to the server's objects when asked for.
    loaded = _loaded_by("from producer import create_app, QueueClient, ErrorCode")
    assert {"fastapi", "celery", "sqlalchemy"} <= loaded


def test_the_codes_load_without_httpx() -> None:
    # The verification core reads the reason codes from the client's package: that import must
    # not bring the HTTP client (or pydantic) into every worker.
    loaded = _loaded_by("import appattest_client.codes, appattest_client.limits")
    assert "httpx" not in loaded and "pydantic" not in loaded


def test_one_definition_of_the_wire_models() -> None:
    import appattest_client
    import producer
    import producer.client
    import producer.schemas
    import worker.contract
    import worker.core
    from appattest_client import api, client, codes, contract

    assert producer.AppAttestClient is producer.client.AppAttestClient is client.AppAttestClient
    assert producer.AsyncAppAttestClient is client.AsyncAppAttestClient
    assert producer.AppAttestError is client.AppAttestError
    assert producer.schemas.JobStatus is producer.JobStatus is api.JobStatus
    assert producer.schemas.BatchItem is api.BatchItem
    assert worker.contract.VerificationResult is contract.VerificationResult
    assert worker.contract.RegistrationRequest is contract.RegistrationRequest
    assert worker.core.Reason is codes.Reason and worker.core.Environment is codes.Environment
    # Every name the client's package lists resolves.
    for name in appattest_client.__all__:
        assert getattr(appattest_client, name) is not None
    with pytest.raises(AttributeError):
        _ = appattest_client.create_app  # type: ignore[attr-defined]


def test_client_version_is_the_backends() -> None:
    assert CLIENT_PROJECT["version"] == BACKEND_PROJECT["version"]
    assert CLIENT_PROJECT["requires-python"] == BACKEND_PROJECT["requires-python"]
    # The client's dependencies are the backend's too, at the same floors.
    assert set(CLIENT_PROJECT["dependencies"]) <= set(BACKEND_PROJECT["dependencies"])


# The client distribution -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("client-dist")
    # The sdist first, then the wheel from it (build's default), so the wheel proves the sdist
    # complete. Without isolation: the dev extra's setuptools, no network.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(CLIENT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = outdir.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "src/appattest_client/client.py"} <= names
    (built,) = outdir.glob("*.whl")
    return built


def test_client_wheel_holds_only_the_client(wheel: Path) -> None:
    assert wheel.name == f"appattest_client-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"appattest_client-{VERSION}.dist-info/METADATA").decode()
    packages = {name.split("/")[0] for name in names if not name.endswith(".dist-info/")}
    assert packages == {"appattest_client", f"appattest_client-{VERSION}.dist-info"}
    assert {
        "appattest_client/py.typed",
        "appattest_client/client.py",
        "appattest_client/api.py",
        "appattest_client/contract.py",
        "appattest_client/codes.py",
    } <= names
    requires = sorted(
        line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist")
    )
    assert requires == ["httpx>=0.27", "pydantic>=2.11"]


@pytest.fixture(scope="module")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the client's wheel and its declared dependencies,
    installed by pip; returns its interpreter."""
    home = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    python = home / "bin" / "python"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return python


def _in_venv(python: Path, *args: str, stdin: str | None = None) -> str:
    # -I: isolated, so neither the working directory nor PYTHONPATH can reach this checkout.
    result = subprocess.run(
        [str(python), "-I", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=python.parent,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_client_venv_has_none_of_the_server(client_venv: Path) -> None:
    found = json.loads(
        _in_venv(
            client_venv,
            "-c",
            "import importlib.util, json, sys; "
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))",
            *SERVER_MODULES,
            "producer",
            "worker",
            "httpx",
            "pydantic",
            "appattest_client",
        )
    )
    assert found == {
        **dict.fromkeys(SERVER_MODULES, False),
        "producer": False,
        "worker": False,
        "httpx": True,
        "pydantic": True,
        "appattest_client": True,
    }
    where = _in_venv(client_venv, "-c", "import appattest_client; print(appattest_client.__file__)")
    assert Path(where.strip()).is_relative_to(client_venv.parent.parent)


@pytest.fixture(scope="module")
def service_url(stack: Stack) -> Iterator[str]:
    settings = stack.settings.model_copy(update={"api_keys": [SecretStr(KEY)]})
    with serve(create_app(settings)) as url:
        yield url


def test_client_venv_talks_to_the_service(client_venv: Path, service_url: str, ca: TestCA) -> None:
    script = client_venv.parent.parent / "user.py"
    script.write_text(USER_SCRIPT)
    challenge = _in_venv(client_venv, str(script), "challenge", service_url, KEY).strip()
    assert challenge

    device = Device(ca=ca)
    body = device.registration_body(challenge, now=datetime.now(UTC))
    answer = json.loads(
        _in_venv(client_venv, str(script), "verify", service_url, KEY, stdin=json.dumps(body))
    )
    verdict = answer["verdict"]
    assert verdict["ok"] is True and verdict["reason"] is None
    assert verdict["kind"] == "registration" and verdict["keyId"] == device.key_id_b64
    assert verdict["counter"] == 0
    # The same body again: its challenge is spent.
    assert answer["replay"] == "challenge_used"
    assert answer["status"]["status"] == "done" and answer["status"]["result"] == verdict
    assert sorted(set(answer["loaded"]) & set(SERVER_MODULES)) == []

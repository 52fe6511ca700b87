"""The distribution as users get it: ``python -m build`` makes an sdist and a wheel; the wheel
carries the migrations, the root certificates and the PEP 561 markers, installs into a fresh
virtual environment, and there ``appattest --version``, ``GET /healthz`` and ``/openapi.json``
report the version of pyproject.toml, and a user's mypy reads the client's and the core's types.

The build runs without network (``--no-isolation``, with the dev extra's setuptools and build).
The fresh environment gets the project only from the wheel; its dependencies, already
installed in the test's own environment, are made importable there through a ``.pth`` file
instead of being downloaded again. That file adds directories to ``sys.path`` without running
their own ``.pth`` files, so the test environment's editable install of this checkout stays
out of sight.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]

# A user's code, type-checked against the installed package. The assignment is wrong on
# purpose: mypy can only see it when it reads the client's annotations.
USER_CODE = """
from producer import AppAttestClient
from worker.core import Reason, verify_attestation

client = AppAttestClient("http://127.0.0.1:8000", "key")
challenge: int = client.create_challenge("registration").challenge
reveal_type(verify_attestation)
reason: Reason = Reason.KEY_UNKNOWN
"""


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    log: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    outdir = tmp_path_factory.mktemp("dist")
    # The sdist first, then the wheel from the unpacked sdist (build's default), so the wheel
    # proves the sdist complete.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = outdir.glob("*.tar.gz")
    (wheel,) = outdir.glob("*.whl")
    return Built(sdist=sdist, wheel=wheel, log=result.stdout + result.stderr)


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with the wheel installed; yields its ``bin`` folder."""
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    python = home / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "test-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    result = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--quiet", str(built.wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield home / "bin"


def _clean_env() -> dict[str, str]:
    """The environment less what would point Python or the project at this checkout."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV"} and not k.startswith("APPATTEST_")
    }


def test_build_has_no_warnings(built: Built) -> None:
    # The licence as a table, for one, is deprecated (the SPDX string replaced it). The one
    # warning that is not about the project: PYTHONDONTWRITEBYTECODE turns byte-compiling off.
    warnings = [
        line
        for line in built.log.splitlines()
        if re.search("warn|deprecat", line, re.IGNORECASE)
        and "byte-compiling is disabled" not in line
    ]
    assert warnings == [], built.log


def test_wheel_contents(built: Built) -> None:
    assert built.wheel.name == f"appattest_backend-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"appattest_backend-{VERSION}.dist-info/METADATA").decode()
    assert {"worker/py.typed", "producer/py.typed", "appattest_client/py.typed"} <= names
    # The client's package ships in the backend too: the server's wire models are defined there.
    assert {"appattest_client/client.py", "appattest_client/codes.py"} <= names
    for pem in (ROOT / "worker/core/data").glob("*.pem"):
        assert f"worker/core/data/{pem.name}" in names
    assert "worker/core/data/apple-app-attestation-root-ca.pem" in names
    migrations = ROOT / "worker/store/migrations"
    expected = {
        path.relative_to(ROOT).as_posix()
        for path in [*migrations.glob("*.py"), *migrations.glob("versions/*.py")]
    }
    assert len(expected) > 5
    assert expected | {"worker/store/migrations/script.py.mako"} <= names
    assert not {name for name in names if name.startswith("tests/")}
    headers = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line]
    assert ["Version", VERSION] in headers
    assert ["License-Expression", "LicenseRef-Proprietary"] in headers
    assert not [h for h in headers if h[0] == "License" or h[1].startswith("License ::")]
    assert ["Classifier", "Typing :: Typed"] in headers


def test_sdist_contents(built: Built) -> None:
    with tarfile.open(built.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "worker/py.typed"} <= names
    assert "clients/python/src/appattest_client/contract.py" in names
    assert "worker/core/data/apple-app-attestation-root-ca.pem" in names


def test_installed_wheel_reports_one_version(venv: Path) -> None:
    result = subprocess.run(
        [str(venv / "appattest"), "--version"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=venv,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"appattest {VERSION}\n"

    # The API served by the installed command answers with the same version.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _clean_env() | {
        "APPATTEST_APP_IDS": "ABCDE12345.com.example.app",
        "APPATTEST_API_KEYS": "a-long-random-key",
        "APPATTEST_STORE_URL": f"sqlite:///{venv.parent / 'keys.db'}",
        # Nothing listens there: the routes read need no broker, and no test's Redis is touched.
        "APPATTEST_BROKER_URL": "redis://127.0.0.1:1/0",
        "APPATTEST_RESULT_BACKEND": "redis://127.0.0.1:1/1",
    }
    server = subprocess.Popen(
        [str(venv / "appattest"), "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=venv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            health = _get_when_up(client, server, "/healthz")
            openapi = client.get("/openapi.json").json()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert health == {"status": "ok", "version": VERSION}, stderr
    assert openapi["info"]["version"] == VERSION


def _get_when_up(client: httpx.Client, server: subprocess.Popen[bytes], path: str) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        try:
            return client.get(path).json()
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the server did not answer within 30 s")


def test_installed_code_comes_from_the_wheel(venv: Path) -> None:
    result = subprocess.run(
        [str(venv / "python"), "-c", "import producer, worker; print(worker.__file__)"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=venv,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(venv.parent)


def test_users_type_checker_reads_the_package(venv: Path, tmp_path: Path) -> None:
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    mypy = [sys.executable, "-m", "mypy", "--python-executable", str(venv / "python")]
    result = subprocess.run(
        [*mypy, "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(user)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert "py.typed" not in output and "import-untyped" not in output, output
    assert 'expression has type "str", variable has type "int"' in output, output
    assert "def (*, attestation_object: bytes, key_id: bytes" in output, output
    assert result.returncode == 1

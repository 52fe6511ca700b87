"""Where users stumble, the words they get: the App ID message, ``migrate``'s report, the
readiness of an unmigrated store, the postgres extra, blank input lines, the default store,
the offline API docs and the worker's log of succeeded tasks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from appattest.cli import main
from producer import create_app
from tests.conftest import NOW
from tests.factory import APP_ID, Device, TestCA
from tests.faults import serve_app
from tests.stack import Stack
from tests.test_cli import results, run_verify
from worker.queue.embedded import embedded_overrides
from worker.settings import Settings
from worker.store import bulk
from worker.store.db import (
    DEFAULT_STORE_URL,
    MissingDriver,
    create_store_engine,
    head_revision,
    session_factory,
    upgrade,
)

KEY = "usability-key"


def _appattest(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "appattest", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**base, **(env or {})},
    )


@pytest.mark.parametrize(
    "command", [["verify", "/dev/null"], ["worker", "--no-supervise"], ["api"]]
)
def test_a_missing_app_id_names_the_option_and_the_variable(
    command: list[str], tmp_path: Path
) -> None:
    proc = _appattest(*command, env={"APPATTEST_STORE_URL": f"sqlite:///{tmp_path / 'k.db'}"})
    assert proc.returncode == 2, proc.stderr
    assert "--app-id" in proc.stderr and "APPATTEST_APP_IDS" in proc.stderr


def test_verify_takes_the_app_ids_of_the_environment(ca: TestCA, tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(Device(ca=ca).registration_body("c", now=NOW)) + "\n")
    proc = _appattest(
        "verify",
        str(source),
        "--root-ca",
        str(root),
        "--at",
        NOW.isoformat(),
        "--store",
        f"sqlite:///{tmp_path / 'k.db'}",
        env={"APPATTEST_APP_IDS": APP_ID},
    )
    assert proc.returncode == 0, proc.stderr
    assert results(proc)[0]["ok"] is True


def test_migrate_says_what_it_did(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    created = _appattest("migrate", "--store", url)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == (
        f"created the key store schema at {url!r} (revision {head_revision()})"
    )
    again = _appattest("migrate", "--store", url)
    assert (
        again.stdout.strip()
        == f"the key store at {url!r} is up to date (revision {head_revision()})"
    )

    older = f"sqlite:///{tmp_path / 'older.db'}"
    engine = create_store_engine(older)
    upgrade(engine, "0001")
    engine.dispose()
    upgraded = _appattest("migrate", "--store", older)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == (
        f"upgraded the key store at {older!r} from revision 0001 to {head_revision()}"
    )


def test_a_postgresql_url_without_its_driver_names_the_postgres_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without psycopg, opening a PostgreSQL store says which extra installs it, whether the
    URL names the driver or not (a bare postgresql:// gets psycopg, the extra's driver)."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    for url in ("postgresql://u@127.0.0.1/db", "postgresql+psycopg://u@127.0.0.1/db"):
        with pytest.raises(MissingDriver, match=re.escape("appattest-backend[postgres]")):
            create_store_engine(url)
    code = "import sys; sys.modules['psycopg'] = None; from appattest.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "migrate", "--store", "postgresql://u@127.0.0.1/db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "pip install 'appattest-backend[postgres]'" in proc.stderr


def test_verify_skips_blank_lines_and_keeps_line_numbers(ca: TestCA, tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    device = Device(ca=ca)
    lines = [
        "",
        device.registration_body("c", now=NOW),
        "   ",
        "\t",
        device.assertion_body("p"),
        "",
    ]
    proc = run_verify(
        tmp_path, lines, "--app-id", APP_ID, "--root-ca", str(root), "--at", NOW.isoformat()
    )
    assert proc.returncode == 0, proc.stderr
    assert [(r["line"], r["ok"]) for r in results(proc)] == [(2, True), (5, True)]
    assert "2 lines: 2 accepted, 0 rejected" in proc.stderr


def test_verify_and_serve_default_to_the_same_store(
    ca: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``verify`` with no --store writes where ``serve`` with no --data-dir keeps its keys."""
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    device = Device(ca=ca)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(device.registration_body("c", now=NOW)) + "\n")
    proc = _appattest(
        "verify", str(source), "--app-id", APP_ID, "--root-ca", str(root), "--at",
        NOW.isoformat(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    key_id = results(proc)[0]["keyId"]

    serve_default = next(p.default for p in main.commands["serve"].params if p.name == "data_dir")
    monkeypatch.chdir(tmp_path)
    serve_store = embedded_overrides(Path(serve_default), {})["store_url"]
    assert isinstance(serve_store, str)
    assert serve_store == f"sqlite:///{tmp_path / 'appattest-data' / 'keys.db'}"
    assert DEFAULT_STORE_URL == "sqlite:///appattest-data/keys.db"
    engine = create_store_engine(serve_store)
    try:
        with session_factory(engine)() as session:
            assert set(bulk.get_keys(session, [key_id])) == {key_id}
    finally:
        engine.dispose()


def test_docs_load_no_external_url(tmp_path: Path) -> None:
    """/docs references only the app's own assets, each served without an API key."""
    settings = Settings(
        api_keys=[SecretStr(KEY)],
        app_ids=[APP_ID],
        store_url=f"sqlite:///{tmp_path / 'keys.db'}",
    )
    with serve_app(create_app(settings)) as base, httpx.Client(base_url=base) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert "http://" not in page.text and "https://" not in page.text
        referenced = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assets = {u.rsplit("/", 1)[1] for u in referenced if u.startswith("/docs/assets/")}
        assert assets >= {"swagger-ui-bundle.js", "swagger-ui.css"}
        for url in referenced:
            assert url.startswith("/"), url
            assert client.get(url).status_code == 200, url


def test_readiness_of_an_unmigrated_store_says_to_run_migrate(stack: Stack, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    settings = stack.settings.model_copy(update={"api_keys": [SecretStr(KEY)], "store_url": url})
    with serve_app(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as api:
        response = api.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["database"] == (
            "error: the key store has no schema; run `appattest migrate`"
        )
        engine = create_store_engine(url)
        upgrade(engine, "0001")
        response = api.get("/readyz")
        assert response.status_code == 503
        assert "is at schema 0001" in response.json()["checks"]["database"]
        assert "run `appattest migrate`" in response.json()["checks"]["database"]
        upgrade(engine)
        engine.dispose()
        response = api.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json()["checks"]["database"] == "ok"


def test_the_worker_log_names_succeeded_tasks_without_their_results(
    stack: Stack, ca: TestCA
) -> None:
    """A job's success line carries the task's name, id and time, never the verdicts."""
    settings = stack.settings.model_copy(update={"api_keys": [SecretStr(KEY)]})
    auth = {"Authorization": f"Bearer {KEY}"}
    device = Device(ca=ca)
    with (
        serve_app(create_app(settings)) as base,
        httpx.Client(base_url=base, headers=auth, timeout=30) as api,
    ):
        issued = api.post("/v1/challenges", json={"purpose": "registration"})
        assert issued.status_code == 201, issued.text
        body = device.registration_body(issued.json()["challenge"], now=datetime.now(UTC))
        response = api.post("/v1/attestations", params={"wait": 20}, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["result"]["ok"] is True
    key_id = response.json()["result"]["keyId"]
    success = re.compile(r"Task appattest\.\w+\[[\w-]+\] succeeded in [0-9.e-]+s$")
    deadline = time.monotonic() + 10
    while True:
        lines = [
            line
            for log in stack.workdir.glob("worker-*.log")
            for line in log.read_text(errors="replace").splitlines()
        ]
        succeeded = [line for line in lines if " succeeded in " in line]
        if succeeded or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert succeeded, "no success line in the workers' logs"
    for line in succeeded:
        assert success.search(line), line
    assert not [line for line in lines if key_id in line]
    assert uuid.UUID(response.json()["jobId"])


def _synopses(readme: str) -> dict[str, str]:
    """The text of the README's ``appattest COMMAND ...`` lines in shell blocks (with their
    continuation lines), by command; the global options under ``""``."""
    found: dict[str, str] = {}
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            words = line.split()
            if len(words) < 2 or words[0] != "appattest":
                continue
            command = "" if words[1].startswith("[") else words[1]
            found[command] = found.get(command, "") + " " + line
    return found


def test_the_readme_synopses_list_every_option() -> None:
    import click

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopses = _synopses(readme)
    missing = [
        option
        for param in main.params
        for option in param.opts
        if option not in synopses.get("", "")
    ]
    commands = [(name, command) for name, command in main.commands.items()]
    # A group's commands (`appattest receipts refresh`) are in the synopses of the group.
    commands += [
        (name, sub)
        for name, command in main.commands.items()
        if isinstance(command, click.Group)
        for sub in command.commands.values()
    ]
    for name, command in commands:
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            for option in (*param.opts, *param.secondary_opts):
                if not re.search(rf"{re.escape(option)}(?![\w-])", synopses.get(name, "")):
                    missing.append(f"appattest {name} {option}")
    assert missing == []

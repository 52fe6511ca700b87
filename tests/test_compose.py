"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every command and
module they name exists in the project, the services' settings agree with each other, the image
installs what requirements.lock pins and runs as an unprivileged user, and the health checks
they declare run against real servers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from appattest.cli import main as cli
from tests.stack import Stack
from worker.settings import Settings
from worker.version import __version__

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ENV = {
    "APPATTEST_APP_IDS": "ABCDE12345.com.example.app",
    "APPATTEST_API_KEYS": "a-long-random-key",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Docker Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} interpolation."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return dict(_interpolate(raw, SAMPLE_ENV))


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_required_variables_are_demanded() -> None:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    with pytest.raises(KeyError, match="APPATTEST_APP_IDS"):
        _interpolate(raw, {})


def test_expected_services(compose: dict[str, Any]) -> None:
    assert {"redis", "postgres", "migrate", "worker", "producer"} <= set(_services(compose))


def test_project_commands_exist_and_parse(compose: dict[str, Any]) -> None:
    """Every ``appattest`` command line in the file parses with the real CLI."""
    checked = 0
    for name, service in _services(compose).items():
        if "build" not in service:
            continue
        args = _command(service)
        assert args[0] == "appattest", f"{name} runs {args[0]!r}, not the project's command"
        assert args[1] in cli.commands, f"{name}: no subcommand {args[1]!r}"
        command = cli.commands[args[1]]
        with command.make_context(args[1], args[2:]) as ctx:
            assert isinstance(ctx, click.Context)
        checked += 1
    assert checked == 3


def test_image_builds_from_project_files(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert "appattest" in dockerfile
    for service in _services(compose).values():
        if "build" in service:
            assert service["build"] == "."


def test_settings_are_valid_and_shared(compose: dict[str, Any]) -> None:
    services = _services(compose)
    envs = {n: dict(s.get("environment", {})) for n, s in services.items() if "build" in s}
    for name, env in envs.items():
        for key in env:
            assert key.startswith("APPATTEST_"), f"{name}: {key}"
            assert key.removeprefix("APPATTEST_").lower() in Settings.model_fields, key
        fields = {k.removeprefix("APPATTEST_").lower(): v for k, v in env.items()}
        settings = Settings(**fields)
        assert settings.policy().apps, f"{name}: no app configured"
    store_urls = {env["APPATTEST_STORE_URL"] for env in envs.values()}
    assert len(store_urls) == 1, "migrate, worker and producer must share one key store"
    for key in ("APPATTEST_BROKER_URL", "APPATTEST_RESULT_BACKEND"):
        assert envs["worker"][key] == envs["producer"][key]
    assert envs["producer"].get("APPATTEST_API_KEYS"), "the producer refuses all calls without keys"


def test_urls_point_at_the_compose_services(compose: dict[str, Any]) -> None:
    services = _services(compose)
    env = dict(services["worker"]["environment"])
    store = urlparse(env["APPATTEST_STORE_URL"])
    pg = dict(services["postgres"]["environment"])
    assert store.hostname == "postgres"
    assert (store.username, store.password, store.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    for key in ("APPATTEST_BROKER_URL", "APPATTEST_RESULT_BACKEND"):
        assert urlparse(env[key]).hostname == "redis"
    assert env["APPATTEST_BROKER_URL"] != env["APPATTEST_RESULT_BACKEND"]


def test_dependencies_and_health(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, service in services.items():
        for dependency, rule in dict(service.get("depends_on", {})).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    assert services["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    for name in ("redis", "postgres", "producer", "worker"):
        assert "healthcheck" in services[name], name
    # The one-shot migration serves no HTTP: the image's API check is switched off there.
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_worker_scales(compose: dict[str, Any]) -> None:
    """``--scale worker=N`` needs no fixed name or host port on the worker."""
    worker = _services(compose)["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_producer_healthcheck_targets_a_real_route(compose: dict[str, Any]) -> None:
    from producer.app import create_app

    producer = _services(compose)["producer"]
    args = _command(producer)
    port = args[args.index("--port") + 1]
    assert f"{port}:{port}" in producer["ports"]
    probe = " ".join(producer["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", probe)
    assert match is not None and match.group(1) == port
    settings = Settings(app_ids=["ABCDE12345.com.example.app"], store_url="sqlite://")
    paths = set(create_app(settings).openapi()["paths"])
    assert match.group(2) in paths


# The worker's health check -----------------------------------------------------------------


def test_worker_healthcheck_pings_its_own_default_node(compose: dict[str, Any]) -> None:
    worker = _services(compose)["worker"]
    probe = list(worker["healthcheck"]["test"])
    assert probe[:4] == ["CMD", "python", "-m", "worker.queue.healthcheck"]
    assert importlib.util.find_spec("worker.queue.healthcheck") is not None
    # The check's default node is celery@HOST, the worker's own name only while the worker
    # command does not choose another.
    assert not any(arg.startswith("--hostname") for arg in _command(worker))
    # Connecting and the ping take at most --timeout each, and Python needs time to start.
    timeout = float(probe[probe.index("--timeout") + 1])
    assert 2 * timeout + 2 <= _seconds(worker["healthcheck"]["timeout"])


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match is not None, duration
    return float(match.group(1))


def _healthcheck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.queue.healthcheck", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_worker_healthcheck_against_real_workers(stack: Stack) -> None:
    """A running worker's node passes, a node that does not run fails; the worker logged its
    version as it started."""
    host = socket.gethostname()
    started = time.monotonic()
    result = _healthcheck(stack.env, "--node", f"a0@{host}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 5, "the check waits for one answer, not the timeout"
    result = _healthcheck(stack.env, "--node", f"nobody@{host}", "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    log = (stack.workdir / "worker-a-0.log").read_text()
    assert f"appattest-backend {__version__}: worker ready" in log


def test_worker_healthcheck_fails_when_the_broker_is_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPATTEST_")}
    env["APPATTEST_BROKER_URL"] = "redis://:secret@127.0.0.1:1/0"
    started = time.monotonic()
    result = _healthcheck(env, "--timeout", "1")
    assert result.returncode == 1
    assert time.monotonic() - started < 6, "the check retried the connection"
    assert "secret" not in result.stdout + result.stderr


# The Dockerfile ------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions with their arguments, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    parsed = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(words[0].upper(), words[1] if len(words) > 1 else "") for words in parsed]


def _exec_form(argument: str) -> list[str]:
    words = json.loads(argument)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), argument
    return words


def _runs() -> list[list[str]]:
    """Each command of each RUN instruction (split at ``&&``) as words."""
    commands = []
    for instruction, argument in _instructions():
        if instruction == "RUN":
            commands += [shlex.split(part) for part in argument.split("&&")]
    return commands


def _lock() -> dict[str, tuple[str, str, list[str]]]:
    """requirements.lock as {name: (version, environment marker, hashes)}."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --hash=")
        spec, _, marker = requirement.partition(";")
        name, _, version = spec.strip().partition("==")
        assert version, f"not pinned: {line}"
        pins[canonicalize_name(name)] = (version, marker.strip(), [o.strip() for o in options])
    return pins


def test_image_installs_from_the_lock() -> None:
    copied = [a.split() for i, a in _instructions() if i == "COPY"]
    assert ["requirements.lock", "./"] in copied
    pip = [words for words in _runs() if words[:2] == ["pip", "install"]]
    locked = [words for words in pip if "requirements.lock" in words]
    assert locked and all("--require-hashes" in words for words in locked)
    # Anything else pip installs brings no dependency of its own: the lock holds them all.
    assert all("--no-deps" in words for words in pip if words not in locked)
    assert ["pip", "check"] in _runs()


def test_lock_pins_every_dependency_with_hashes() -> None:
    """requirements.lock is complete for the project and its postgres extra: each requirement,
    extras included, is pinned at a version its specifier admits, with hashes."""
    pins = _lock()
    assert all(
        hashes and all(h.startswith("sha256:") for h in hashes) for *_, hashes in pins.values()
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for r in project["optional-dependencies"]["postgres"]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock: regenerate it"
        version, _, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (name, version)
    # The extras' own requirements: psycopg[binary] and celery[redis].
    assert {"psycopg-binary", "redis", "kombu"} <= set(pins)


def test_lock_regeneration_command_is_documented() -> None:
    header = (ROOT / "requirements.lock").read_text().splitlines()[:2]
    command = header[1].removeprefix("#").strip()
    assert command.startswith("uv pip compile pyproject.toml") and "--generate-hashes" in command
    assert command in (ROOT / "README.md").read_text()


def test_image_runs_as_a_numeric_unprivileged_user() -> None:
    instructions = _instructions()
    users = [(index, argument) for index, (i, argument) in enumerate(instructions) if i == "USER"]
    assert users, "the image runs as root"
    index, user = users[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert index > max(n for n, (i, _) in enumerate(instructions) if i == "RUN")
    created = [words for words in _runs() if words[0] == "useradd"]
    assert created and created[0][created[0].index("--uid") + 1] == uid


def _image_command() -> list[str]:
    (command,) = [_exec_form(a) for i, a in _instructions() if i == "CMD"]
    return command


def test_image_default_command_parses() -> None:
    args = _image_command()
    assert args[0] == "appattest" and args[1] in cli.commands
    with cli.commands[args[1]].make_context(args[1], args[2:]) as ctx:
        assert isinstance(ctx, click.Context)


def _image_probe() -> tuple[list[str], str, str]:
    """The HEALTHCHECK command, the port and the path it probes."""
    (healthcheck,) = [a for i, a in _instructions() if i == "HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    probe = _exec_form(command)
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(probe))
    assert match is not None, probe
    return probe, match.group(1), match.group(2)


def test_image_healthcheck_probes_the_default_command() -> None:
    from producer.app import create_app

    _, port, path = _image_probe()
    args = _image_command()
    assert args[args.index("--port") + 1] == port
    assert ("EXPOSE", port) in _instructions()
    settings = Settings(app_ids=["ABCDE12345.com.example.app"], store_url="sqlite://")
    assert path in create_app(settings).openapi()["paths"]


def test_image_healthcheck_against_a_real_server() -> None:
    """The probe, pointed at a running API, passes; at a port where nothing listens, fails."""
    from producer.app import create_app
    from tests.faults import serve_app

    probe, port, _ = _image_probe()
    assert probe[0] == "python"
    settings = Settings(app_ids=["ABCDE12345.com.example.app"], store_url="sqlite://")
    with serve_app(create_app(settings)) as url:
        live_port = url.rsplit(":", 1)[1]
        at = [word.replace(f":{port}/", f":{live_port}/") for word in probe]
        result = subprocess.run([sys.executable, *at[1:]], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, *at[1:]], capture_output=True, timeout=30)
    assert result.returncode != 0

"""docker-compose.yml, checked without a Docker engine: every command and module it names
exists in the project, and the services' settings agree with each other."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml

from worker.cli import main as cli
from worker.settings import Settings

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
    for name in ("redis", "postgres", "producer"):
        assert "healthcheck" in services[name], name


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
    paths = {getattr(route, "path", None) for route in create_app(settings).routes}
    assert match.group(2) in paths

"""Operating the service: Prometheus metrics scraped after real jobs through real workers,
JSON logs that carry the request id from the API to the worker, Celery events, the
dashboard and alert rules against the metrics that exist, and the job_expired answer."""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import select

from producer import create_app
from producer.batching import BATCH_PREFIX, Owner, seal_job_id
from tests.factory import APP_ID, Device, TestCA
from tests.faults import serve_app
from tests.stack import Stack, key_owner, service_stack
from worker.queue.app import create_celery_app
from worker.queue.logs import JsonFormatter
from worker.queue.messaging import QUEUE
from worker.store.db import create_store_engine, session_factory
from worker.store.models import Verdict

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
KEY = f"ops-key-{secrets.token_urlsafe(16)}"
AUTH = {"Authorization": f"Bearer {KEY}"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(url: str) -> Samples:
    """Every sample of a Prometheus text page, by (name, sorted labels)."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, found), value in samples.items()
        if sample == name and set(labels.items()) <= set(found)
    )


def added(*pages: Samples) -> Samples:
    """The samples of several pages (workers of several machines) added up."""
    out: Samples = {}
    for page in pages:
        for key, value in page.items():
            out[key] = out.get(key, 0.0) + value
    return out


def by_label(samples: Samples, name: str, label: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (sample, labels), value in samples.items():
        if sample == name and value:
            counts[dict(labels)[label]] += int(value)
    return counts


def delta(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] - before[k]}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


@contextmanager
def api_client(stack: Stack, **update: Any) -> Iterator[httpx.Client]:
    settings = stack.settings.model_copy(update={"api_keys": [SecretStr(KEY)], **update})
    with (
        serve_app(create_app(settings)) as url,
        httpx.Client(base_url=url, headers=AUTH, timeout=30) as client,
    ):
        yield client


def challenge(api: httpx.Client, purpose: str) -> str:
    response = api.post("/v1/challenges", json={"purpose": purpose})
    assert response.status_code == 201, response.text
    return str(response.json()["challenge"])


def verdict(
    api: httpx.Client, path: str, body: dict[str, Any], request_id: str | None = None
) -> tuple[str, dict[str, Any], httpx.Response]:
    headers = {"X-Request-ID": request_id} if request_id else {}
    response = api.post(path, params={"wait": 20}, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["jobId"], response.json()["result"], response


def run_traffic(api: httpx.Client, ca: TestCA, request_id: str) -> tuple[Counter[str], list[str]]:
    """Registrations and assertions, accepted and rejected; returns the verdicts by
    ``kind/reason`` and every secret sent (challenges, tokens, payloads)."""
    now = datetime.now(UTC)
    expected: Counter[str] = Counter()
    sent: list[str] = []

    def run(path: str, body: dict[str, Any], request: str | None = None) -> dict[str, Any]:
        sent.extend(v for k, v in body.items() if k in ("challenge", "token", "payload"))
        _, result, _ = verdict(api, path, body, request)
        kind = "registration" if path.endswith("attestations") else "assertion"
        expected[f"{kind}/{'ok' if result['ok'] else result['reason']}"] += 1
        return result

    devices = [Device(ca=ca) for _ in range(3)]
    for n, device in enumerate(devices):
        body = device.registration_body(challenge(api, "registration"), now=now)
        assert run("/v1/attestations", body, request_id if n == 0 else None)["ok"]
    for device in devices[:2]:
        assert run("/v1/assertions", device.assertion_body(challenge(api, "assertion")))["ok"]
    replay = devices[0].assertion_body(challenge(api, "assertion"))
    assert run("/v1/assertions", replay)["ok"]
    assert run("/v1/assertions", replay)["reason"] == "challenge_used"
    stranger = Device(ca=ca).assertion_body(challenge(api, "assertion"))
    assert run("/v1/assertions", stranger)["reason"] == "key_unknown"
    corrupt = Device(ca=ca).registration_body(challenge(api, "registration"), now=now)
    corrupt["token"] = corrupt["token"][:-8] + "AAAAAAA="
    assert not run("/v1/attestations", corrupt)["ok"]
    return expected, sent


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\b(appattest_[a-z0-9_]+)", text))


def test_metrics_logs_and_events_through_two_real_workers(
    ca: TestCA, pg_url: str, redis_server: str, tmp_path: Path
) -> None:
    """Redis + PostgreSQL, two workers with their own metrics ports (one with two prefork
    children), JSON logs: after real jobs, the workers' counters match the verdicts by kind
    and reason, the histograms moved by the number of jobs, the producer counted its requests,
    the request id reached the worker's log line and the verdict row, and no secret is in any
    log line or metric."""
    ports = [free_port(), free_port()]
    with service_stack(
        store_url=pg_url,
        root_pem=ca.root_pem,
        workdir=tmp_path,
        app_ids=APP_ID,
        extra_env={"APPATTEST_LOG_FORMAT": "json"},
    ) as stack:
        stack.start_worker(concurrency=2, name="m", args=[f"--metrics-port={ports[0]}"])
        stack.start_worker(concurrency=1, name="n", args=[f"--metrics-port={ports[1]}"])
        urls = [f"http://127.0.0.1:{port}/metrics" for port in ports]
        before = added(*(scrape(url) for url in urls))
        assert by_label(before, "appattest_verdicts_total", "reason") == Counter()
        request_id = f"req-{uuid.uuid4().hex}"
        with api_client(stack) as api:
            expected, sent = run_traffic(api, ca, request_id)
            # Answers of the router itself: 405 on a known path, 404 on an unknown one.
            assert api.get("/v1/challenges").status_code == 405
            assert api.delete(f"/v1/jobs/{uuid.uuid4()}").status_code == 405
            assert api.get("/v1/nothing-here").status_code == 404
            producer = scrape(str(api.base_url.join("/metrics")))
            # No API key is needed for /metrics; the answer names the request id.
            bare = httpx.get(str(api.base_url.join("/metrics")), headers={"X-Request-ID": "x1"})
            assert bare.status_code == 200 and bare.headers["x-request-id"] == "x1"
            generated = api.get("/healthz").headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated)
            refused = api.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
            assert refused.headers["x-request-id"] != "bad id\twith spaces"
            metrics_text = bare.text
        jobs = sum(expected.values())

        workers = [scrape(url) for url in urls]
        after = added(*workers)
        found: Counter[str] = Counter()
        for (name, labels), value in after.items():
            if name == "appattest_verdicts_total" and value:
                found[f"{dict(labels)['kind']}/{dict(labels)['reason']}"] += int(value)
        assert found == expected
        # Accepted verdicts carry the configured App ID and environment as labels.
        assert total(after, "appattest_verdicts_total", reason="ok", app_id=APP_ID) == sum(
            n for k, n in expected.items() if k.endswith("/ok")
        )
        for histogram in (
            "appattest_verification_seconds",
            "appattest_submission_to_verdict_seconds",
        ):
            assert total(after, f"{histogram}_count") == jobs, histogram
            assert total(after, f"{histogram}_sum") > 0
        # Every job rode in a batch message of one or more jobs.
        assert total(after, "appattest_batch_jobs_sum") == jobs
        assert 1 <= total(after, "appattest_batch_jobs_count") <= jobs
        # Both workers served a page; the work was spread as the broker chose.
        assert all(total(page, "appattest_batch_jobs_count") >= 0 for page in workers)
        assert total(after, "appattest_cache_misses_total", cache="intermediate") >= 1
        assert (
            total(after, "appattest_cache_hits_total", cache="public_key")
            + total(after, "appattest_cache_misses_total", cache="public_key")
            >= 3
        )  # three accepted-or-replayed assertions loaded a key
        assert total(after, "appattest_worker_cpu_seconds_total") > 0

        # The producer: requests by route template, jobs by kind, challenges by purpose.
        assert total(producer, "appattest_jobs_submitted_total", kind="registration") == sum(
            n for k, n in expected.items() if k.startswith("registration/")
        )
        assert total(producer, "appattest_jobs_submitted_total", kind="assertion") == sum(
            n for k, n in expected.items() if k.startswith("assertion/")
        )
        assert total(producer, "appattest_challenges_issued_total", purpose="registration") == 4
        assert total(producer, "appattest_challenges_issued_total", purpose="assertion") == 4
        assert (
            total(
                producer,
                "appattest_http_requests_total",
                route="/v1/attestations",
                method="POST",
                status="200",
            )
            == 4
        )
        assert (
            total(producer, "appattest_http_requests_total", route="/v1/challenges", method="POST")
            == 8
        )
        # A 405 is counted under its path's template; a path of no route under "other".
        for route, method, status in [
            ("/v1/challenges", "GET", "405"),
            ("/v1/jobs/{jobId}", "DELETE", "405"),
            ("other", "GET", "404"),
        ]:
            assert (
                total(
                    producer,
                    "appattest_http_requests_total",
                    route=route,
                    method=method,
                    status=status,
                )
                == 1
            ), (route, method, status)
        assert (
            total(producer, "appattest_http_request_duration_seconds_count", route="/v1/assertions")
            == 5
        )
        assert total(producer, "appattest_queue_messages", queue=QUEUE) == 0
        assert total(producer, "appattest_broker_up") == 1
        labels = {dict(labels).get("route") for (name, labels) in producer if "http" in name}
        assert not any(label and re.search(r"[0-9a-f]{8}-", label) for label in labels)

        # The dashboard and the alert rules query only metrics that exist.
        exposed = {name for name, _ in producer} | {name for name, _ in after}
        dashboard = (ROOT / "monitoring/grafana/dashboards/appattest.json").read_text()
        queries = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p["targets"]]
        rules = yaml.safe_load((ROOT / "monitoring/alerts.yml").read_text())
        exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
        referenced = metric_names_in("\n".join(queries + exprs))
        assert len(referenced) >= 12
        assert sorted(referenced - exposed) == []

        # The request id: in the API's answer, in the worker's JSON log line, in the verdict.
        worker_lines = []
        for path in tmp_path.glob("worker-*.log"):
            for line in path.read_text().splitlines():
                if line.startswith("{"):
                    worker_lines.append(json.loads(line))
        assert worker_lines, "the workers wrote no JSON lines"
        mine = [e for e in worker_lines if e.get("request_id") == request_id]
        assert len(mine) == 1, mine
        assert mine[0]["kind"] == "registration" and mine[0]["reason"] == "ok"
        assert mine[0]["app_id"] == APP_ID and mine[0]["job_id"]
        verdict_lines = [e for e in worker_lines if "job_id" in e and "reason" in e]
        assert len(verdict_lines) == jobs
        engine = create_store_engine(pg_url)
        try:
            with session_factory(engine)() as session:
                row = session.scalar(select(Verdict).where(Verdict.job_id == mine[0]["job_id"]))
        finally:
            engine.dispose()
        assert row is not None and row.request_id == request_id

        # No secret in any log line or metric.
        logs = "\n".join(p.read_text() for p in tmp_path.glob("worker-*.log"))
        pages = metrics_text + "".join(httpx.get(url).text for url in urls)
        for secret in [*sent, KEY]:
            assert secret not in logs and secret not in pages


def test_celery_events_are_sent_with_redacted_arguments(stack: Stack, ca: TestCA) -> None:
    """Celery events are on: a job's task-sent (from the producer), task-received and
    task-succeeded (from the worker) reach an event receiver, without the job's body."""
    app = create_celery_app(stack.settings)
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    done = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": seen.append})
            ready.set()
            for _ in receiver.itercapture(limit=None, timeout=30, wakeup=False):
                if done.is_set():
                    return

    def finished() -> bool:
        return any(e["type"] == "task-succeeded" for e in seen)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        time.sleep(0.5)  # the receiver's queue is bound
        with api_client(stack) as api:
            body = Device(ca=ca).registration_body(
                challenge(api, "registration"), now=datetime.now(UTC)
            )
            job_id, result, _ = verdict(api, "/v1/attestations", body)
            assert result["ok"]
            wait_for(finished, 20, "task-succeeded event")
    finally:
        done.set()
        app.close()
    types = {e["type"] for e in seen}
    assert {"task-sent", "task-received", "task-succeeded"} <= types
    events = json.dumps(seen, default=str)
    assert body["token"][:40] not in events and body["challenge"] not in events
    for kind in ("task-sent", "task-received"):
        event = next(e for e in seen if e["type"] == kind)
        assert event["args"] == "(<job>,)", event
    # task-succeeded shows (a bounded repr of) the verdicts, as the result backend holds them.
    succeeded = next(e for e in seen if e["type"] == "task-succeeded")
    assert job_id in succeeded["result"] and len(succeeded["result"]) <= 1100


def test_a_job_older_than_the_verdict_retention_answers_job_expired(
    stack: Stack, ca: TestCA
) -> None:
    """A job whose batch was made before the retention and whose verdict is gone answers
    404 job_expired, and no job_lost verdict is recorded for it; a recent job found nowhere
    is still lost."""
    owner: Owner = key_owner(KEY)
    today = int(time.time() // 86_400)

    def made_on(day: int) -> str:
        raw = day.to_bytes(2, "big") + secrets.token_bytes(7)
        return seal_job_id(owner, BATCH_PREFIX + raw.hex(), 0)

    old, recent = made_on(today - 40), made_on(today - 5)
    with api_client(stack, verdict_retention_days=30) as api:
        response = api.get(f"/v1/jobs/{old}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_expired"
        many = api.post("/v1/jobs/status", json={"jobIds": [old, recent]})
        assert many.status_code == 200, many.text
        statuses = {s["jobId"]: s for s in many.json()["jobs"]}
        assert statuses[old]["status"] == "not_found"
        assert statuses[old]["error"]["code"] == "job_expired"
        assert statuses[recent]["status"] == "lost"
    engine = create_store_engine(stack.settings.store_url)
    try:
        with session_factory(engine)() as session:
            rows = session.scalars(select(Verdict.job_id).where(Verdict.job_id.in_([old]))).all()
    finally:
        engine.dispose()
    assert rows == []
    with api_client(stack, verdict_retention_days=0) as api:
        # Retention off: nothing is purged, so a job found nowhere is lost, however old.
        assert api.get(f"/v1/jobs/{made_on(today - 400)}").json()["status"] == "lost"


def test_metrics_can_be_turned_off(stack: Stack) -> None:
    with api_client(stack, metrics_enabled=False) as api:
        response = api.get("/metrics")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_json_log_lines_parse_and_carry_the_ids() -> None:
    import logging

    formatter = JsonFormatter()
    record = logging.LogRecord(
        "appattest.worker", logging.INFO, __file__, 1, "job %s", ("j",), None
    )
    record.job_id, record.kind, record.reason = "j", "assertion", "ok"
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "job j" and entry["job_id"] == "j"
    assert entry["kind"] == "assertion" and entry["reason"] == "ok"
    assert entry["level"] == "INFO" and entry["logger"] == "appattest.worker"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failing = logging.LogRecord(
            "appattest", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = formatter.format(failing)
    assert "\n" not in line and "ValueError" in json.loads(line)["exception"]


def test_the_compose_monitoring_profile_parses() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), source
    prometheus = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["appattest-producer"]["static_configs"][0]["targets"] == ["producer:8000"]
    port = int(
        services["worker"]["environment"]["APPATTEST_WORKER_METRICS_PORT"].split("-")[-1].strip("}")
    )
    assert jobs["appattest-worker"]["dns_sd_configs"][0]["port"] == port
    assert "/etc/prometheus/alerts.yml" in prometheus["rule_files"]
    dashboard = json.loads((ROOT / "monitoring/grafana/dashboards/appattest.json").read_text())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("by reason", "p50, p99", "queue depth", "cpu"):
        assert needed in titles


def test_ledger_republishes_and_verdict_lines_off(
    ca: TestCA, pg_url: str, redis_server: str, tmp_path: Path
) -> None:
    """A job whose message never reached the queue is published again by the worker's ledger
    sweep: ``appattest_ledger_republished_total`` counts it once. With
    APPATTEST_LOG_VERDICTS=false the worker writes no per-job line."""
    port = free_port()
    env = {
        "APPATTEST_LEDGER_SWEEP_SECONDS": "0.5",
        "APPATTEST_LEDGER_RESEND_SECONDS": "1",
        "APPATTEST_LOG_VERDICTS": "false",
    }
    with service_stack(
        store_url=pg_url, root_pem=ca.root_pem, workdir=tmp_path, app_ids=APP_ID, extra_env=env
    ) as stack:
        stack.start_worker(args=[f"--metrics-port={port}"])
        url = f"http://127.0.0.1:{port}/metrics"
        assert total(scrape(url), "appattest_ledger_republished_total") == 0
        with api_client(stack) as api:
            body = Device(ca=ca).registration_body(
                challenge(api, "registration"), now=datetime.now(UTC)
            )
            app = create_celery_app(stack.settings)
            try:
                ledger = __import__("worker.queue.ledger", fromlist=["ledger_for"]).ledger_for(app)
                task_id = str(uuid.uuid4())
                # Entered in the ledger, never sent: the message was lost.
                ledger.record([(task_id, "appattest.verify", {"body": body})])
                wait_for(
                    lambda: app.backend.get_task_meta(task_id).get("status") == "SUCCESS",
                    30,
                    "the lost job's verdict",
                )
                assert app.backend.get_task_meta(task_id)["result"]["ok"] is True
                ledger.close()
            finally:
                app.close()
        page = scrape(url)
        assert total(page, "appattest_ledger_republished_total") == 1
        assert total(page, "appattest_verdicts_total", kind="registration", reason="ok") == 1
        # The resend stamps a message that had no submission time (this one, entered by hand).
        assert total(page, "appattest_submission_to_verdict_seconds_count") == 1
    log = "\n".join(p.read_text() for p in tmp_path.glob("worker-*.log"))
    assert "published again" in log
    assert f"job {task_id}:" not in log


# kombu's SQL transport (the embedded broker) uses an API SQLAlchemy 2 deprecates.
@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_queue_depth_and_oldest_age_are_read_from_the_broker(
    broker: str, ca: TestCA, pg_url: str, redis_server: str, tmp_path: Path
) -> None:
    """With no worker running, jobs wait in the queue: the producer's page shows how many
    messages and how old the oldest is; on Redis and on the embedded (SQL) broker."""
    extra: dict[str, str] = {}
    if broker == "embedded":
        extra = {"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"}
    with (
        service_stack(
            store_url=pg_url,
            root_pem=ca.root_pem,
            workdir=tmp_path,
            app_ids=APP_ID,
            **extra,  # type: ignore[arg-type]
        ) as stack,
        api_client(stack) as api,
    ):
        page = scrape(str(api.base_url.join("/metrics")))
        assert total(page, "appattest_queue_messages", queue=QUEUE) == 0
        for _ in range(3):
            body = Device(ca=ca).registration_body(
                challenge(api, "registration"), now=datetime.now(UTC)
            )
            response = api.post("/v1/attestations", json=body)
            assert response.status_code == 202, response.text
            time.sleep(0.3)  # one batch message each
        time.sleep(1.0)
        page = scrape(str(api.base_url.join("/metrics")))
    assert total(page, "appattest_broker_up") == 1
    assert total(page, "appattest_queue_messages", queue=QUEUE) == 3
    age = total(page, "appattest_queue_oldest_age_seconds", queue=QUEUE)
    assert 1.5 <= age <= 30, age


def test_infrastructure_retries_are_counted(
    ca: TestCA, pg_url: str, redis_server: str, tmp_path: Path
) -> None:
    """A worker whose store cannot be reached retries the batch (APPATTEST_TASK_MAX_RETRIES=3
    in the stack), then ends it as internal_error: the retry counter moves by exactly 3 and
    the verdict is counted as internal_error."""
    port = free_port()
    with service_stack(
        store_url=pg_url, root_pem=ca.root_pem, workdir=tmp_path, app_ids=APP_ID
    ) as stack:
        # Only the worker's store is a port where nothing listens; the API's works.
        stack.env["APPATTEST_STORE_URL"] = (
            f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
        )
        stack.start_worker(args=[f"--metrics-port={port}"])
        with api_client(stack) as api:
            body = Device(ca=ca).registration_body(
                challenge(api, "registration"), now=datetime.now(UTC)
            )
            response = api.post("/v1/attestations", params={"wait": 30}, json=body)
            assert response.status_code == 200, response.text
            assert response.json()["result"]["reason"] == "internal_error"
        page = scrape(f"http://127.0.0.1:{port}/metrics")
    assert total(page, "appattest_task_retries_total", task="appattest.verify_batch") == 3
    assert total(page, "appattest_task_retries_total") == 3
    assert total(page, "appattest_verdicts_total", reason="internal_error") == 1

"""The queue contract (worker.queue.messaging): typed messages, their versions, and how a task
refuses a message it cannot read; and the settings the embedded worker is given."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr

from worker.queue.embedded import worker_environment
from worker.queue.messaging import (
    ANDROID_QUEUE,
    QUEUE,
    REVERIFY_TASK,
    VERIFY_ANDROID_BATCH_TASK,
    VERIFY_BATCH_TASK,
    VERIFY_TASK,
    MessageError,
    ReverifyBatch,
    UnsupportedMessage,
    VerifyAndroidBatch,
    VerifyBatch,
    VerifyJob,
    VerifyOne,
    decode,
    encode,
    queue_of,
)
from worker.queue.tasks import run_batch, run_job, run_reverify
from worker.settings import Settings

BODY = {"platform": "ios", "format": "apple-app-attest", "keyId": "k", "challenge": "c"}


def test_messages_written_before_versions_read_as_version_one() -> None:
    # The exact shapes earlier producers queued: running deployments still hold them.
    batch = decode(
        VERIFY_BATCH_TASK, {"jobs": [{"jobId": "j1", "body": BODY, "submittedBy": "ci"}]}
    )
    assert batch == VerifyBatch(jobs=(VerifyJob(job_id="j1", body=BODY, submitted_by="ci"),))
    one = decode(VERIFY_TASK, {"body": BODY, "challenges": "given", "at": "2026-01-02T03:04:05Z"})
    assert one == VerifyOne(
        body=BODY, challenges_given=True, at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    )
    assert decode(VERIFY_TASK, {"body": BODY}) == VerifyOne(body=BODY)
    assert decode(REVERIFY_TASK, {"runId": "r", "keyIds": ["a", "b"]}) == ReverifyBatch(
        run_id="r", key_ids=("a", "b")
    )


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (VERIFY_BATCH_TASK, VerifyBatch(jobs=(VerifyJob(job_id="j", body=BODY),))),
        (VERIFY_ANDROID_BATCH_TASK, VerifyAndroidBatch(jobs=(VerifyJob(job_id="j", body=BODY),))),
        (VERIFY_TASK, VerifyOne(body=BODY)),
        (VERIFY_TASK, VerifyOne(body=BODY, challenges_given=True, at=datetime.now(UTC))),
        (REVERIFY_TASK, ReverifyBatch(run_id="r", key_ids=("k",))),
    ],
)
def test_encoded_messages_carry_their_version_and_decode_to_themselves(
    task: str, message: Any
) -> None:
    payload = encode(message)
    assert payload["v"] == 1
    assert message.task == task
    assert decode(task, payload) == message


def test_the_wire_names_are_the_earlier_ones() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    assert encode(VerifyOne(body=BODY, challenges_given=True, at=at)) == {
        "v": 1,
        "body": BODY,
        "challenges": "given",
        "at": "2026-01-02T00:00:00Z",
    }
    assert encode(VerifyBatch(jobs=(VerifyJob(job_id="j", body=BODY, submitted_by="k"),))) == {
        "v": 1,
        "jobs": [{"jobId": "j", "body": BODY, "submittedBy": "k"}],
    }


@pytest.mark.parametrize(
    ("task", "payload"),
    [
        (VERIFY_BATCH_TASK, {"jobs": []}),
        (VERIFY_BATCH_TASK, {"jobs": [{"body": BODY}]}),
        (VERIFY_TASK, {"body": BODY, "at": "2026-01-02T00:00:00"}),
        (VERIFY_TASK, {"body": BODY, "challenges": "taken"}),
        (REVERIFY_TASK, {"keyIds": []}),
        (REVERIFY_TASK, ["r"]),
        ("appattest.unknown", {}),
    ],
)
def test_malformed_messages_are_refused(task: str, payload: Any) -> None:
    with pytest.raises(MessageError) as caught:
        decode(task, payload)
    assert not isinstance(caught.value, UnsupportedMessage)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_versions_are_refused(version: object) -> None:
    with pytest.raises(UnsupportedMessage):
        decode(VERIFY_TASK, {"v": version, "body": BODY})


def _task(task_id: str) -> Any:
    # What the task functions read of Celery's task before they decode: nothing else runs.
    return SimpleNamespace(request=SimpleNamespace(id=task_id, retries=0), app=None)


def test_a_task_given_a_newer_version_ends_with_a_result_and_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings()
    newer = {"v": 2, "jobs": [{"jobId": "j1", "body": BODY}, {"jobId": "j2", "body": BODY}]}
    with caplog.at_level(logging.ERROR, logger="appattest.worker"):
        result = run_batch(_task("batch-1"), settings, newer)
    assert result["jobIds"] == ["j1", "j2"]
    assert [r["reason"] for r in result["results"]] == ["invalid_request"] * 2
    assert "version 2 is not supported" in result["error"]
    assert "task batch-1: refused" in caplog.text
    assert "version 2 is not supported" in caplog.text

    single = run_job(_task("job-1"), settings, {"v": 2, "body": BODY})
    assert single["ok"] is False and single["reason"] == "invalid_request"
    assert single["keyId"] == "k"

    reverify = run_reverify(_task("rv-1"), settings, {"v": 9, "runId": "r", "keyIds": []})
    assert reverify["decided"] == 0 and "version 9" in reverify["error"]


def test_android_batches_travel_on_the_android_queue() -> None:
    assert VerifyAndroidBatch.queue == queue_of(VERIFY_ANDROID_BATCH_TASK) == ANDROID_QUEUE
    assert queue_of(VERIFY_BATCH_TASK) == queue_of(REVERIFY_TASK) == QUEUE
    with pytest.raises(MessageError, match="jobs"):
        decode(VERIFY_ANDROID_BATCH_TASK, {"v": 1, "jobs": []})


def test_the_embedded_worker_gets_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root.pem"
    root.write_text("not read here")
    monkeypatch.setenv("APPATTEST_STRAY", "dropped")
    settings = Settings(
        broker_url="redis://127.0.0.1:6379/7",
        result_backend="redis://127.0.0.1:6379/8",
        store_url="sqlite:///x.db",
        app_ids=["T.a", "T.b"],
        dev_app_ids=["T.dev"],
        root_ca=root,
        api_keys=[SecretStr("k1"), SecretStr("k2")],
        public_key_cache_size=7,
        ledger_resend_seconds=12.5,
        max_waits_per_key=3,
        task_max_retries=2,
        android_apps={"com.example.app": {"certificateDigests": ["ab" * 32], "maxAgeSeconds": 60}},
        google_credentials_file=root,
        play_integrity_timeout_seconds=2.5,
    )
    env = worker_environment(settings)
    assert "APPATTEST_STRAY" not in env
    assert env["APPATTEST_PUBLIC_KEY_CACHE_SIZE"] == "7"
    for name in list(env):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings

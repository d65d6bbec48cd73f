"""The contract as the running processes write it: real API, real worker, real Redis.

What a worker writes into its heartbeat record and what the API and the worker
write into a job record must be the fields :mod:`heimdall.contract` declares,
and the job message the API sends must be a :class:`~heimdall.contract.JobMessage`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, get_type_hints

import pytest
import redis
from flask import Flask

from app import create_app
from app.dispatch import JobRecord
from app.services import services
from heimdall import contract
from heimdall.config import Settings
from heimdall.heartbeats import parse_heartbeat
from heimdall.iq import decode_request

JOB_FIELDS = {
    contract.JOB_KIND,
    contract.JOB_CREATED_AT,
    contract.JOB_REQUEST_ID,
    contract.JOB_DIGESTS,
    contract.JOB_OUTCOME,
    contract.JOB_FINISHED_AT,
}


@pytest.fixture(scope="module")
def settings(service_env: dict[str, str]) -> Settings:
    """The service's settings (service_env has patched this process's environment)."""
    return Settings()


@pytest.fixture(scope="module")
def app(settings: Settings, celery_worker_proc: Any) -> Flask:
    """The API wired to the session's Redis and worker."""
    return create_app(settings)


@pytest.fixture
def state(settings: Settings) -> redis.Redis:
    """A client of the state Redis (job records, heartbeats)."""
    return redis.Redis.from_url(settings.redis_url)


def test_worker_heartbeat_has_the_declared_fields(
    celery_worker_proc: Any, state: redis.Redis
) -> None:
    declared = contract.HeartbeatRecord
    records = state.hgetall(contract.workers_key(celery_worker_proc.hostname))

    assert records, "the worker's children write heartbeats"
    for pid, raw in records.items():
        written = json.loads(raw)
        assert declared.__required_keys__ <= written.keys() <= set(get_type_hints(declared)), pid
        assert parse_heartbeat(raw) == written


def test_job_record_fields_written_by_both_sides_are_the_declared_ones(
    app: Flask, state: redis.Redis, request_factory: Callable[..., dict[str, Any]]
) -> None:
    client = app.test_client()
    accepted = client.post("/api/v1/predict/async", json=request_factory(9100))
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    job_id = accepted.get_json()["job_id"]

    # The worker adds its outcome to the record the API wrote.
    deadline = time.monotonic() + 120.0
    raw = state.hgetall(contract.job_key(job_id))
    while contract.JOB_OUTCOME.encode() not in raw and time.monotonic() < deadline:
        time.sleep(0.1)
        raw = state.hgetall(contract.job_key(job_id))

    assert {key.decode() for key in raw} == JOB_FIELDS
    record = JobRecord.from_hash(job_id, raw)
    assert record.kind == "predict" and record.created_at > 0 and record.finished_at
    assert isinstance(record.outcome, dict) and record.outcome["status"] == "ok"
    assert set(record.outcome) <= set(get_type_hints(contract.OkItem))


def test_api_job_messages_are_job_messages(
    app: Flask, settings: Settings, request_factory: Callable[..., dict[str, Any]]
) -> None:
    svc = services(app)
    card = svc.model.current().card
    decoded = decode_request(
        request_factory(9200),
        stations=card.slots,
        band_mhz=card.band_mhz,
        min_stations=settings.min_stations,
    )

    messages = svc.dispatcher.jobs_for([decoded], [decoded.digest()], "req-contract")

    declared = contract.JobMessage

    for message in messages:
        assert declared.__required_keys__ <= message.keys() <= set(get_type_hints(declared))
        assert message[contract.MSG_REQUEST_ID] == "req-contract"
    state = redis.Redis.from_url(settings.redis_url)
    state.delete(*[m[contract.MSG_PAYLOAD_KEY] for m in messages if m[contract.MSG_PAYLOAD_KEY]])

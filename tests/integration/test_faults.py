"""Faults injected into real processes: what the service does, and that nothing is lost.

Each test starts its own worker (on its own queue, or on its own Redis
databases) so killing it never disturbs the session's shared worker. The
fault table in docs/reliability.md names these tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from flask import Flask

from app import create_app
from heimdall import contract
from heimdall.config import Settings, get_settings
from heimdall.iq import decode_request
from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME, ModelCard
from heimdall.registry import register_model, shipped_model_dir

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

ANSWER_TIMEOUT_S = 120.0


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def state(service_env: dict[str, str]) -> redis.Redis:
    """Client of the state Redis (payloads, job records, heartbeats)."""
    return redis.Redis.from_url(service_env["HEIMDALL_REDIS_URL"])


@pytest.fixture(scope="module")
def make_job(
    state: redis.Redis, request_factory: Callable[..., dict[str, Any]]
) -> Callable[..., dict[str, Any]]:
    """``make_job(seed, **request_kwargs)``: a claim-checked job as the API dispatches it."""
    card = ModelCard.load(shipped_model_dir() / CARD_FILENAME)

    def make(seed: int, **kwargs: Any) -> dict[str, Any]:
        decoded = decode_request(
            request_factory(seed, **kwargs),
            stations=card.slots,
            band_mhz=card.band_mhz,
            min_stations=get_settings().min_stations,
        )
        key = contract.payload_key(decoded.digest())
        state.set(key, decoded.to_bytes(), ex=600)
        return {"payload_key": key, "payload_b64": None, "request_id": f"req-{seed}"}

    return make


def _started_pid(result: AsyncResult, timeout: float = 60.0) -> int:
    """Pid of the pool child running the task, as soon as it reports STARTED."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = result.backend.get_task_meta(result.id)
        if meta["status"] == "STARTED":
            return int(meta["result"]["pid"])
        if meta["status"] in ("SUCCESS", "FAILURE"):
            pytest.fail(f"task finished before it could be interrupted: {meta['status']}")
        time.sleep(0.01)
    pytest.fail(f"task {result.id} did not start within {timeout} s")


def _long_chunk(make_job: Callable[..., dict[str, Any]], seed: int, items: int) -> list[Any]:
    # Many items sharing one long payload: a task that runs for about a second.
    return [make_job(seed, n_samples=65_536)] * items


def test_a_request_that_kills_its_child_is_failed_not_requeued_forever(
    worker_factory: Callable[..., Any],
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
    state: redis.Redis,
) -> None:
    # With one attempt allowed, the first kill is enough to call it poison;
    # the default (2) works the same, one more kill later.
    worker = worker_factory(
        "poison-worker@%h", env_overrides={"HEIMDALL_MAX_TASK_ATTEMPTS": "1"}, queues="poison"
    )
    chunk = _long_chunk(make_job, 87000, 60)
    result = celery_client.send_task(contract.CHUNK_TASK, args=[chunk], queue="poison")

    os.kill(_started_pid(result), signal.SIGKILL)
    answers = result.get(timeout=ANSWER_TIMEOUT_S)

    assert len(answers) == 60
    assert {a["status"] for a in answers} == {"error"}
    problem = answers[0]["problem"]
    assert problem["status"] == 422
    assert problem["type"].endswith("request-crashed-worker")
    assert "die" in problem["detail"]
    log = worker.log_path.read_text()
    assert log.count(f"task_id={result.id}") >= 2
    # Its payload and its attempt counter go once it is answered (just after).
    leftovers = (chunk[0]["payload_key"], contract.attempts_key(result.id))
    deadline = time.monotonic() + 30
    while state.exists(*leftovers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(*leftovers) == 0


def test_a_hard_killed_worker_task_is_redelivered_within_a_minute(
    worker_factory: Callable[..., Any],
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
) -> None:
    # Time limit 10 s -> visibility timeout 30 s (two limits plus a margin).
    overrides = {"HEIMDALL_TASK_TIME_LIMIT_S": "10"}
    worker = worker_factory("crash-worker@%h", env_overrides=overrides, queues="crash")
    result = celery_client.send_task(
        contract.CHUNK_TASK, args=[_long_chunk(make_job, 87100, 30)], queue="crash"
    )
    _started_pid(result)

    assert worker.proc is not None
    os.killpg(worker.proc.pid, signal.SIGKILL)  # main process and children, no goodbye
    worker.proc.wait(timeout=10)
    killed_at = time.monotonic()
    worker.proc = None
    worker.start()
    answers = result.get(timeout=ANSWER_TIMEOUT_S)
    redelivered_after = time.monotonic() - killed_at

    assert [a["status"] for a in answers] == ["ok"] * 30
    # Visibility timeout (30 s here) + the worker's restart + one 5 s restore
    # sweep; generous for a busy machine.
    assert redelivered_after < 90, redelivered_after


def test_warm_shutdown_then_restart_loses_no_queued_job(
    worker_factory: Callable[..., Any],
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
) -> None:
    worker = worker_factory("term-worker@%h", queues="term")
    results = [
        celery_client.send_task(contract.PREDICT_TASK, args=[make_job(87200 + i)], queue="term")
        for i in range(20)
    ]

    worker.stop(timeout=60)  # SIGTERM: finish what runs, leave the rest queued
    worker.start()

    answers = [r.get(timeout=ANSWER_TIMEOUT_S) for r in results]
    assert [a["status"] for a in answers] == ["ok"] * 20


def test_registry_down_at_start_serves_the_last_verified_model(
    worker_factory: Callable[..., Any],
    celery_client: Celery,
    celery_worker_proc: Any,
    make_job: Callable[..., dict[str, Any]],
) -> None:
    # The session's worker resolved and verified the champion into this var dir;
    # this worker shares it but its registry does not answer.
    overrides = {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}",
        "HEIMDALL_REGISTRY_RETRY_S": "2",
    }
    worker = worker_factory("fallback-worker@%h", env_overrides=overrides, queues="fallback")

    status = worker.status(timeout=5.0)
    answer = celery_client.send_task(
        contract.PREDICT_TASK, args=[make_job(87300)], queue="fallback"
    ).get(timeout=ANSWER_TIMEOUT_S)

    assert status is not None
    assert status["source"] == "local-fallback"
    assert "registry unreachable" in status["error"]
    assert all(c["state"] == "loaded" for c in status["children"])
    assert answer["status"] == "ok"
    assert answer["result"]["model"]["version"] == status["model"]["version"]
    assert "REGISTRY UNREACHABLE" in worker.log_path.read_text()


# -- readiness from heartbeats ---------------------------------------------------------------


def _spin(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


@contextlib.contextmanager
def busy_cores() -> Iterator[None]:
    """Every core kept busy by a spinning process inside the block (at most 2 min)."""
    stop_at = time.monotonic() + 120
    spinners = [
        multiprocessing.Process(target=_spin, args=(stop_at,), daemon=True)
        for _ in range(os.cpu_count() or 2)
    ]
    for spinner in spinners:
        spinner.start()
    yield
    for spinner in spinners:
        spinner.terminate()
        spinner.join(timeout=5)


def test_ready_tells_the_truth_on_a_busy_machine(
    worker_factory: Callable[..., Any],
    app_settings: Settings,
    redis_server: Any,
) -> None:
    # A service of its own: state, broker and results on databases nobody else uses.
    urls = {
        "HEIMDALL_REDIS_URL": redis_server.url_for(7),
        "CELERY_BROKER_URL": redis_server.url_for(8),
        "CELERY_RESULT_BACKEND": redis_server.url_for(9),
        "HEIMDALL_HEARTBEAT_INTERVAL_S": "2",
        "HEIMDALL_HEARTBEAT_TIMEOUT_S": "8",
    }
    worker = worker_factory("ready-worker@%h", env_overrides=urls, wait=None)
    settings = app_settings.model_copy(
        update={
            "redis_url": urls["HEIMDALL_REDIS_URL"],
            "broker_url": urls["CELERY_BROKER_URL"],
            "result_backend": urls["CELERY_RESULT_BACKEND"],
            "heartbeat_interval_s": 2.0,
            "heartbeat_timeout_s": 8.0,
        }
    )
    app: Flask = create_app(settings)
    client = app.test_client()

    deadline = time.monotonic() + 90
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, f"never ready:\n{worker.log()}"
        time.sleep(0.5)

    # 15 s of probes while every core is busy: never a false 503.
    refusals = []
    probes = 0
    with busy_cores():
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            response = client.get("/ready")
            probes += 1
            if response.status_code != 200:
                refusals.append(response.get_json())
            time.sleep(0.2)
    assert probes > 10
    assert refusals == []

    assert worker.proc is not None
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    worker.proc = None
    killed_at = time.monotonic()
    while client.get("/ready").status_code == 200:
        assert time.monotonic() - killed_at < 60, "still ready a minute after the worker died"
        time.sleep(0.2)
    # Within the heartbeat timeout (8 s) plus the probe memo, with slack for the busy cores.
    assert time.monotonic() - killed_at < 30
    body = client.get("/ready").get_json()
    assert "no worker heartbeat" in body["detail"]


# -- jobs survive a Redis restart --------------------------------------------------------------


def test_redis_restart_under_load_loses_no_job(
    app_settings: Settings,
    redis_server: Any,
    request_factory: Callable[..., dict[str, Any]],
    celery_worker_proc: Any,
) -> None:
    client = create_app(app_settings).test_client()
    bodies = [request_factory(87400 + i) for i in range(8)]
    outcomes: list[tuple[int, str, float, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        # Sync and async requests back to back, through the Redis outage.
        i = 0
        while not stop.is_set():
            path = "/api/v1/predict" if i % 2 else "/api/v1/predict/async"
            started = time.monotonic()
            response = client.post(path, json=bodies[i % len(bodies)])
            outcomes.append(
                (
                    response.status_code,
                    response.mimetype,
                    time.monotonic() - started,
                    response.headers.get("Location"),
                )
            )
            i += 1

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    time.sleep(3.0)
    redis_server.stop()  # snapshot first: a persistent Redis comes back with its data
    time.sleep(3.0)
    redis_server.start()
    time.sleep(5.0)
    stop.set()
    sender.join(timeout=ANSWER_TIMEOUT_S)

    statuses = {status for status, _, _, _ in outcomes}
    assert statuses <= {200, 202, 503}, outcomes
    assert 503 in statuses, "the outage was not seen"
    assert all(m == "application/problem+json" for s, m, _, _ in outcomes if s == 503)
    # No request hangs past its wait budget plus the publish and backend retries.
    assert max(elapsed for _, _, elapsed, _ in outcomes) < app_settings.predict_timeout_s + 15
    # Every job URL handed out, before, during or after the outage, is answered.
    pending = [url for status, _, _, url in outcomes if status == 202 and url]
    assert pending
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            response = client.get(url)
            assert response.status_code in (200, 503), response.get_data(as_text=True)
            if response.status_code == 200:
                job = response.get_json()
                assert job["status"] != "failed", job
                if job["status"] == "succeeded":
                    pending.remove(url)
        time.sleep(0.5)
    assert pending == [], f"{len(pending)} jobs never answered after the restart"


@pytest.fixture(scope="module")
def app_settings(service_env: dict[str, str]) -> Settings:
    """The service's settings (service_env has patched this process's environment)."""
    return Settings()


def test_sync_answers_and_payloads_leave_no_state_behind(
    app_settings: Settings,
    state: redis.Redis,
    request_factory: Callable[..., dict[str, Any]],
    celery_worker_proc: Any,
) -> None:
    # A wait long enough for a busy machine: this test is about the state a 200 leaves.
    client = create_app(app_settings.model_copy(update={"predict_timeout_s": 120.0})).test_client()
    card = ModelCard.load(shipped_model_dir() / CARD_FILENAME)
    bodies = [request_factory(87500 + i) for i in range(5)]
    digests = [
        decode_request(
            body,
            stations=card.slots,
            band_mhz=card.band_mhz,
            min_stations=1,
        ).digest()
        for body in bodies
    ]

    answers = [client.post("/api/v1/predict", json=body) for body in bodies]

    assert [a.status_code for a in answers] == [200] * 5
    # Payloads are deleted once their task is done (the worker's after_return
    # runs just after the API got the result, hence the short wait).
    deadline = time.monotonic() + 30
    leftovers = ["?"]
    while leftovers and time.monotonic() < deadline:
        leftovers = [k for d in digests for k in state.keys(f"{contract.PAYLOAD_PREFIX}{d}*")]
        time.sleep(0.2)
    assert leftovers == []
    # Answered jobs stay pollable briefly, not for the hour a 202 gets.
    for answer in answers:
        job_id = answer.get_json()["job_id"]
        assert uuid.UUID(job_id)
        ttl = state.ttl(contract.job_key(job_id))
        assert 0 < ttl <= app_settings.answered_job_ttl_s


# -- reload to a model that cannot serve -------------------------------------------------------


def _unservable_model(folder: Path) -> Path:
    """A copy of the shipped model whose card puts a station 1 km from where it is.

    The card is consistent with its ONNX file (the registry accepts it), but
    no worker may serve it on this network.
    """
    import onnx

    shutil.copytree(shipped_model_dir(), folder)
    # Other ONNX bytes (metadata only): the registry makes it a version of its own.
    model = onnx.load(str(folder / MODEL_FILENAME))
    model.doc_string = "same weights, card for another network"
    onnx.save(model, str(folder / MODEL_FILENAME))
    card = json.loads((folder / CARD_FILENAME).read_text())
    card["onnx_sha256"] = hashlib.sha256((folder / MODEL_FILENAME).read_bytes()).hexdigest()
    card["stations"][0]["latitude"] += 0.01
    (folder / CARD_FILENAME).write_text(json.dumps(card))
    return folder


def test_reload_to_an_unservable_model_under_load_keeps_the_old_one(
    worker_factory: Callable[..., Any],
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
    tmp_path: Path,
) -> None:
    worker = worker_factory("reload-worker@%h", queues="reload")
    before = worker.status(timeout=5.0)
    assert before is not None
    register_model(get_settings(), _unservable_model(tmp_path / "unservable"), alias="unservable")
    stop = threading.Event()
    answers: list[dict[str, Any]] = []

    def stream() -> None:
        i = 0
        while not stop.is_set():
            job = make_job(87600 + i % 6)  # each job owns its payload, as the API's do
            result = celery_client.send_task(contract.PREDICT_TASK, args=[job], queue="reload")
            answers.append(result.get(timeout=ANSWER_TIMEOUT_S))
            i += 1

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    try:
        reply = worker.broadcast(contract.RELOAD_COMMAND, {"alias": "unservable"}, timeout=150)
        time.sleep(2.0)
    finally:
        stop.set()
        sender.join(timeout=ANSWER_TIMEOUT_S)

    assert reply is not None and reply["ok"] is False
    assert "refused" in reply["error"] and "trained" in reply["error"]
    assert reply["model"] == before["model"]
    assert answers and all(a["status"] == "ok" for a in answers)
    assert {a["result"]["model"]["version"] for a in answers} == {before["model"]["version"]}
    after = worker.status(timeout=5.0)
    assert after is not None and all(c["state"] == "loaded" for c in after["children"])

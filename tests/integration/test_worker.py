"""The worker end to end: real worker processes, real Redis, real registry, real model.

Tasks are sent by name from a client app configured like the API's, exactly
as the API does; payloads are claim-checked in Redis (or sent inline) in the
canonical blob form the API produces.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chord
from celery.result import AsyncResult

from heimdall import contract
from heimdall.config import Settings, get_settings
from heimdall.iq import decode_request
from heimdall.modelcard import CARD_FILENAME, ModelCard
from heimdall.registry import register_model, resolve_version, shipped_model_dir
from heimdall.stations import load_network

pytestmark = pytest.mark.timeout(180)

RESULT_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def card() -> ModelCard:
    """Card of the shipped (and registered) model."""
    return ModelCard.load(shipped_model_dir() / CARD_FILENAME)


@pytest.fixture(scope="module")
def cache(service_env: dict[str, str]) -> redis.Redis:
    """Client of the state Redis, where the API claim-checks payloads."""
    return redis.Redis.from_url(service_env["HEIMDALL_REDIS_URL"])


@pytest.fixture(scope="module")
def make_job(
    card: ModelCard, cache: redis.Redis, request_factory: Callable[..., dict[str, Any]]
) -> Callable[..., dict[str, Any]]:
    """``make_job(seed, inline=False, **request_kwargs)``: a job as the API dispatches it."""
    settings = get_settings()

    def make(seed: int, *, inline: bool = False, **kwargs: Any) -> dict[str, Any]:
        body = request_factory(seed, **kwargs)
        decoded = decode_request(
            body,
            stations=card.slots,
            band_mhz=card.band_mhz,
            min_stations=settings.min_stations,
        )
        blob = decoded.to_bytes()
        job: dict[str, Any] = {
            "payload_key": None,
            "payload_b64": None,
            "request_id": f"req-{seed}-{uuid.uuid4().hex[:8]}",
        }
        if inline:
            job["payload_b64"] = base64.b64encode(blob).decode("ascii")
        else:
            # Each dispatch owns its payload (the task deletes it when done).
            key = contract.payload_key(decoded.digest())
            cache.set(key, blob, ex=settings.payload_ttl_s)
            job["payload_key"] = key
        return job

    return make


def _region() -> tuple[float, float, float, float]:
    """(lat_min, lat_max, lon_min, lon_max): the network's box grown by ~0.6 degrees."""
    network = load_network()
    lats = [s.latitude for s in network.stations]
    lons = [s.longitude for s in network.stations]
    return min(lats) - 0.6, max(lats) + 0.6, min(lons) - 0.8, max(lons) + 0.8


def _assert_sane(result: dict[str, Any], version: str, alias: str = "champion") -> None:
    lat_min, lat_max, lon_min, lon_max = _region()
    assert lat_min <= result["position"]["latitude"] <= lat_max
    assert lon_min <= result["position"]["longitude"] <= lon_max
    assert result["uncertainty"]["sigma_x_m"] > 0
    assert result["uncertainty"]["sigma_y_m"] > 0
    assert -1 < result["uncertainty"]["rho"] < 1
    assert [e["confidence"] for e in result["uncertainty"]["ellipses"]] == [0.68, 0.95]
    assert result["model"] == {"name": "heimdall-localizer", "version": version, "alias": alias}
    assert result["inference_time_ms"] >= 0


@pytest.fixture(scope="module")
def version(celery_worker_proc: Any) -> str:
    """Registered version of heimdall-localizer@champion (the worker serves it)."""
    return resolve_version(get_settings()).version


def test_predict_by_name_returns_localization(
    celery_worker_proc: Any, celery_client: Celery, make_job: Callable[..., Any], version: str
) -> None:
    job = make_job(1)
    async_result = celery_client.send_task("heimdall.predict", args=[job])
    answer = async_result.get(timeout=RESULT_TIMEOUT_S)

    assert answer["status"] == "ok", answer
    _assert_sane(answer["result"], version)
    # The task's log lines carry its id and the client's request id.
    ids = f"task_id={async_result.id} request_id={job['request_id']}"
    wanted = f"task.done task=heimdall.predict {ids} state=SUCCESS outcome=ok"
    deadline = time.monotonic() + 5
    while wanted not in celery_worker_proc.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = celery_worker_proc.log_path.read_text()
    assert f"task.start task=heimdall.predict {ids}" in log
    assert wanted in log


def test_predict_inline_payload_matches_claim_check(
    celery_worker_proc: Any, celery_client: Celery, make_job: Callable[..., Any], version: str
) -> None:
    by_key = celery_client.send_task("heimdall.predict", args=[make_job(2)])
    inline = celery_client.send_task("heimdall.predict", args=[make_job(2, inline=True)])

    a, b = by_key.get(timeout=RESULT_TIMEOUT_S), inline.get(timeout=RESULT_TIMEOUT_S)
    assert a["status"] == b["status"] == "ok"
    assert a["result"]["position"] == b["result"]["position"]
    _assert_sane(b["result"], version)


def test_pairs_and_base64_requests_give_the_same_answer(
    celery_worker_proc: Any, celery_client: Celery, make_job: Callable[..., Any]
) -> None:
    jobs = [make_job(3, encoding="base64"), make_job(3, encoding="pairs")]

    a, b = celery_client.send_task("heimdall.predict_chunk", args=[jobs]).get(timeout=20)
    assert a["status"] == b["status"] == "ok"
    # Same features to the byte; onnxruntime's GEMM may round rows of one batch
    # differently in the last float32 bit (millimetres), hence the tolerance.
    for key in ("latitude", "longitude"):
        assert a["result"]["position"][key] == pytest.approx(b["result"]["position"][key], abs=1e-6)


@pytest.mark.parametrize(
    ("job", "status", "type_"),
    [
        (
            {"payload_key": "heimdall:payload:" + "0" * 64, "payload_b64": None},
            410,
            "payload-expired",
        ),
        ({"payload_key": None, "payload_b64": None}, 400, "invalid-request"),
        ({"payload_key": "celery", "payload_b64": None}, 400, "invalid-request"),
        ({"payload_key": None, "payload_b64": "bm90IGEgYmxvYg=="}, 422, "invalid-input"),
        ("not a job", 400, "invalid-request"),
    ],
)
def test_predict_bad_job_returns_problem_not_exception(
    celery_worker_proc: Any, celery_client: Celery, job: Any, status: int, type_: str
) -> None:
    if isinstance(job, dict):
        job = {**job, "request_id": "req-bad"}
    async_result = celery_client.send_task("heimdall.predict", args=[job])

    answer = async_result.get(timeout=RESULT_TIMEOUT_S)
    assert async_result.state == "SUCCESS"
    assert answer["status"] == "error"
    assert answer["problem"]["status"] == status
    assert answer["problem"]["type"] == f"urn:heimdall:problem:{type_}"
    assert answer["problem"]["detail"]


def test_a_second_delivery_after_the_first_answered_keeps_its_answer(
    celery_worker_proc: Any, celery_client: Celery, cache: redis.Redis
) -> None:
    """Two deliveries of one message at once: the late one finds no payload.

    The first run stored its answer and deleted the payload; the second must
    answer that stored result, not a 410 that would overwrite it.
    """
    task_id = str(uuid.uuid4())
    first = {"status": "ok", "result": {"answered": "by the first delivery"}}
    celery_client.backend.store_result(task_id, first, "SUCCESS")
    gone = {"payload_key": "heimdall:payload:" + "0" * 64 + ":deleted", "payload_b64": None}

    celery_client.send_task("heimdall.predict", args=[gone], task_id=task_id)

    # The worker writes each run's outcome into the job record: wait for it.
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    outcome = None
    while outcome is None and time.monotonic() < deadline:
        outcome = cache.hget(f"heimdall:job:{task_id}", "outcome")
        time.sleep(0.2)
    assert outcome is not None, "the second delivery never ran"
    assert json.loads(outcome) == first
    assert celery_client.backend.get_task_meta(task_id, cache=False)["result"] == first


def test_predict_chunk_answers_each_item_in_order(
    celery_worker_proc: Any, celery_client: Celery, make_job: Callable[..., Any], version: str
) -> None:
    seeds = [11, 12, 13, 14]
    jobs = [make_job(s) for s in seeds]
    missing = {"payload_key": "heimdall:payload:" + "f" * 64, "request_id": "req-gone"}
    chunk = [*jobs[:2], missing, *jobs[2:]]

    answers = celery_client.send_task("heimdall.predict_chunk", args=[chunk]).get(
        timeout=RESULT_TIMEOUT_S
    )
    singles = [
        celery_client.send_task("heimdall.predict", args=[make_job(s)]).get(
            timeout=RESULT_TIMEOUT_S
        )
        for s in seeds
    ]

    assert [a["status"] for a in answers] == ["ok", "ok", "error", "ok", "ok"]
    assert answers[2]["problem"]["status"] == 410
    for got, single in zip([*answers[:2], *answers[3:]], singles, strict=True):
        _assert_sane(got["result"], version)
        # Batched and single runs agree to float32 precision (~1e-4 deg is ~10 m).
        for axis in ("latitude", "longitude"):
            assert got["result"]["position"][axis] == pytest.approx(
                single["result"]["position"][axis], abs=1e-4
            )
    positions = {a["result"]["position"]["latitude"] for a in singles}
    assert len(positions) == len(seeds), "seeds should give distinct transmitters"


def test_chord_of_chunks_assembles_batch_in_request_order(
    celery_worker_proc: Any, celery_client: Celery, make_job: Callable[..., Any], version: str
) -> None:
    jobs = {i: make_job(20 + i) for i in (0, 2, 3, 5, 6)}
    cached_item = {"status": "ok", "result": {"cached": "from the API"}, "cached": True}
    invalid_item = {"status": "error", "problem": {"status": 422, "type": "x", "detail": "bad"}}
    chunks = [[0, 2], [3, 5], [6]]
    meta = {
        "total": 7,
        "chunks": chunks,
        "answered": {"1": cached_item, "4": invalid_item},
        "request_id": "req-batch",
    }
    header = [
        celery_client.signature("heimdall.predict_chunk", args=[[jobs[i] for i in indices]])
        for indices in chunks
    ]
    callback = celery_client.signature("heimdall.collect_batch", args=[meta])

    document = chord(header)(callback).get(timeout=RESULT_TIMEOUT_S)

    assert [it["index"] for it in document["items"]] == list(range(7))
    assert [it["status"] for it in document["items"]] == [
        "ok", "ok", "ok", "ok", "error", "ok", "ok",
    ]  # fmt: skip
    assert document["items"][1]["cached"] is True
    assert document["items"][4]["problem"]["status"] == 422
    assert document["counts"] == {"total": 7, "succeeded": 6, "failed": 1, "cached": 1}
    assert document["request_id"] == "req-batch"
    # Each computed item is the one for its own payload.
    for i in jobs:
        job = make_job(20 + i)  # the chunks' payloads were deleted once they were done
        single = celery_client.send_task("heimdall.predict", args=[job]).get(timeout=20)
        assert document["items"][i]["result"]["position"] == pytest.approx(
            single["result"]["position"], abs=1e-4
        )
        _assert_sane(document["items"][i]["result"], version)


def test_model_status_lists_loaded_children(celery_worker_proc: Any, version: str) -> None:
    status = celery_worker_proc.status()

    assert status is not None
    assert status["hostname"] == celery_worker_proc.hostname
    assert status["model"]["version"] == version
    assert status["error"] is None
    assert status["models"][0] == status["model"]
    assert len(status["children"]) == 2
    for child in status["children"]:
        assert child["state"] == "loaded", child
        assert child["model"] == {
            "name": "heimdall-localizer",
            "version": version,
            "alias": "champion",
        }
        assert child["error"] is None
        assert child["pid"] != celery_worker_proc.pid
        # Every version the child holds, the champion first; a served target
        # the registry does not know is listed with why it is not held.
        assert child["models"][0] == child["model"]
        assert {m["alias"] for m in child["models"]} | set(child["errors"]) >= {
            "champion",
            *get_settings().extra_models,
        }


def _reload(worker: Any, alias: str | None) -> dict[str, Any]:
    reply = worker.broadcast("heimdall_reload_model", {"alias": alias} if alias else {}, 30)
    assert reply is not None, f"no reply to heimdall_reload_model:\n{worker.log()}"
    return reply


def _serving(alias: str, old_pids: set[int]) -> Callable[[dict[str, Any]], bool]:
    def check(status: dict[str, Any]) -> bool:
        children = status["children"]
        return (
            len(children) == 2
            and all(c["state"] == "loaded" and c["model"]["alias"] == alias for c in children)
            and not old_pids & {c["pid"] for c in children}
        )

    return check


def test_reload_model_switches_children_to_new_alias(
    celery_worker_proc: Any,
    celery_client: Celery,
    make_job: Callable[..., Any],
    version: str,
) -> None:
    identity, created = register_model(get_settings(), alias="challenger")
    assert (identity.version, created) == (version, False)
    before = {c["pid"] for c in celery_worker_proc.status()["children"]}
    try:
        reply = _reload(celery_worker_proc, "challenger")
        assert reply["ok"] is True, reply
        assert reply["model"]["alias"] == "challenger"
        status = celery_worker_proc.wait_for(_serving("challenger", before), timeout=30)
        assert status["model"]["alias"] == "challenger"

        answer = celery_client.send_task("heimdall.predict", args=[make_job(30)]).get(timeout=20)
        _assert_sane(answer["result"], version, alias="challenger")
    finally:
        now = {c["pid"] for c in (celery_worker_proc.status() or {}).get("children", [])}
        assert _reload(celery_worker_proc, None)["ok"] is True
        celery_worker_proc.wait_for(_serving("champion", now), timeout=30)


def test_reload_to_unknown_alias_keeps_the_current_model(celery_worker_proc: Any) -> None:
    before = celery_worker_proc.status()

    reply = _reload(celery_worker_proc, "no-such-alias")

    assert reply["ok"] is False
    assert "no-such-alias" in reply["error"]
    assert "no-such-alias" in reply["errors"]["no-such-alias"]
    assert reply["model"] == before["model"]
    assert reply["models"] == before["models"]
    after = celery_worker_proc.status()
    assert {c["pid"] for c in after["children"]} == {c["pid"] for c in before["children"]}
    assert all(c["state"] == "loaded" for c in after["children"])


def test_worker_with_empty_registry_reports_failed_children(
    worker_factory: Callable[..., Any],
    celery_client: Celery,
    make_job: Callable[..., Any],
    tmp_path: Path,
) -> None:
    worker = worker_factory(
        "empty-worker@%h",
        {"HEIMDALL_VAR_DIR": str(tmp_path / "empty-var")},
        wait="failed",
        # Its own queue, so it never takes the shared worker's tasks.
        queues="heimdall-empty",
    )
    try:
        status = worker.status()
        assert status["model"] is None
        assert "no version of 'heimdall-localizer' has alias 'champion'" in status["error"]
        assert len(status["children"]) == 2
        for child in status["children"]:
            assert child["state"] == "failed"
            assert child["model"] is None
            assert "could not be resolved" in child["error"]
        assert "NO MODEL" in worker.log()

        job = make_job(40, inline=True)
        answer = celery_client.send_task(
            "heimdall.predict", args=[job], queue="heimdall-empty"
        ).get(timeout=20)
        assert answer["status"] == "error"
        assert answer["problem"]["status"] == 503
        assert answer["problem"]["type"] == "urn:heimdall:problem:model-unavailable"
        assert "could not be resolved" in answer["problem"]["detail"]

        # Recovery without a restart: register a model there, then reload.
        empty_registry = Settings(var_dir=tmp_path / "empty-var")
        identity, _ = register_model(empty_registry)
        reply = _reload(worker, None)
        assert reply["ok"] is True, reply
        status = worker.wait_for(lambda s: _all_loaded(s, identity.version), timeout=30)
        assert status["error"] is None
    finally:
        worker.stop()


def _all_loaded(status: dict[str, Any], version: str) -> bool:
    children = status["children"]
    return bool(children) and all(
        c["state"] == "loaded" and c["model"]["version"] == version for c in children
    )


def test_killed_child_does_not_lose_the_job(
    celery_worker_proc: Any, celery_client: Celery, make_job: Callable[..., Any], version: str
) -> None:
    # One long task: many items sharing one long claim-checked payload (the
    # blob is fetched once; features are computed per item), ~a few seconds.
    job = make_job(50, n_samples=65_536)
    chunk = [job] * 120
    async_result: AsyncResult = celery_client.send_task("heimdall.predict_chunk", args=[chunk])

    victim = _started_pid(async_result)
    os.kill(victim, signal.SIGKILL)

    answers = async_result.get(timeout=60)

    assert len(answers) == 120
    assert all(a["status"] == "ok" for a in answers)
    _assert_sane(answers[0]["result"], version)
    log = celery_worker_proc.log_path.read_text()
    assert f"pid:{victim} exited with 'signal 9 (SIGKILL)'" in log
    # It ran twice: interrupted, then redelivered (acks_late + reject_on_worker_lost).
    assert log.count(f"task.start task=heimdall.predict_chunk task_id={async_result.id}") == 2
    # The pool replaced the killed child, and the new one loaded the model.
    celery_worker_proc.wait_for(lambda s: _serving("champion", {victim})(s), timeout=30)


@pytest.mark.timeout(360)
def test_worker_survives_a_redis_restart_with_a_task_in_flight(
    celery_worker_proc: Any,
    celery_client: Celery,
    redis_server: Any,
    make_job: Callable[..., Any],
) -> None:
    # A task running (its message unacknowledged) when the broker goes away.
    in_flight = celery_client.send_task(
        "heimdall.predict_chunk", args=[[make_job(60, n_samples=65_536)] * 12]
    )
    _started_pid(in_flight)
    redis_server.stop()
    time.sleep(1.0)
    redis_server.start()
    try:
        celery_worker_proc.wait_for(lambda s: _serving("champion", set())(s), timeout=60)
        # kombu puts the unacknowledged chunk back when the connection drops, so a
        # second child may run it again: revoke it, and wait generously, since a
        # child may still be busy with it on a machine with both cores loaded.
        in_flight.revoke()
        answer = celery_client.send_task("heimdall.predict", args=[make_job(61)]).get(timeout=300)
        assert answer["status"] == "ok"
        assert celery_worker_proc.pid is not None
        assert "Unrecoverable error" not in celery_worker_proc.log_path.read_text()
    finally:
        # Its message comes back after the visibility timeout: don't run it then.
        in_flight.revoke()


def _started_pid(async_result: AsyncResult, timeout: float = 20.0) -> int:
    """Pid of the pool child running the task, as soon as it reports STARTED."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = async_result.backend.get_task_meta(async_result.id)
        if meta["status"] == "STARTED":
            return int(meta["result"]["pid"])
        if meta["status"] in ("SUCCESS", "FAILURE"):
            pytest.fail(f"task finished before it could be interrupted: {meta['status']}")
        time.sleep(0.01)
    pytest.fail(f"task {async_result.id} did not start within {timeout} s")

"""The Flask API against real Redis and a real prefork worker (no mocks, no eager mode).

Each test builds its requests from its own seeds, so cache state left by one
test never decides another. Apps with other settings (a dead cache, a dead
broker, tiny limits) are built with ``create_app(settings.model_copy(...))``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app, schemas
from heimdall.config import Settings
from heimdall.heartbeats import live_workers
from heimdall.iq import encode_base64

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"
MakeRequest = Callable[..., dict[str, Any]]


def _closed_port() -> int:
    """A local port nobody listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _problem(response: Any, status: int, type_slug: str | None = None) -> dict[str, Any]:
    """Assert a problem response and return its body."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = response.get_json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    if type_slug is not None:
        assert body["type"] == f"urn:heimdall:problem:{type_slug}", body
    return dict(body)


def _poll(client: FlaskClient, url: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET a job until it is succeeded or failed."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        response = client.get(url)
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        seen.append(body["status"])
        assert body["status"] in ("queued", "running", "succeeded", "failed")
        if body["status"] in ("succeeded", "failed"):
            return dict(body)
        time.sleep(0.05)
    pytest.fail(f"job {url} not done in {timeout} s; states seen {seen}")


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total


def _assert_localization(body: dict[str, Any]) -> None:
    # The packaged network lies in north-west Italy; the answer must be near it.
    assert 43.0 < body["position"]["latitude"] < 47.5
    assert 6.0 < body["position"]["longitude"] < 11.0
    assert body["uncertainty"]["sigma_x_m"] > 0
    assert [e["confidence"] for e in body["uncertainty"]["ellipses"]] == [0.68, 0.95]
    # A client can redraw each ellipse from the covariance and the ellipse's own k.
    u = body["uncertainty"]
    cov = [
        [u["sigma_x_m"] ** 2, u["covariance_xy_m2"]],
        [u["covariance_xy_m2"], u["sigma_y_m"] ** 2],
    ]
    minor_sd, major_sd = np.sqrt(np.linalg.eigvalsh(np.array(cov)))
    for e in u["ellipses"]:
        assert e["semi_major_m"] == pytest.approx(e["scale_k"] * major_sd, rel=1e-3)
        assert e["semi_minor_m"] == pytest.approx(e["scale_k"] * minor_sd, rel=1e-3)
    assert body["geojson"]["type"] == "FeatureCollection"
    assert body["model"]["name"] == "heimdall-localizer"
    assert body["model"]["version"]


@pytest.fixture(scope="module")
def settings(service_env: dict[str, str]) -> Settings:
    """The service's settings (service_env has patched this process's environment)."""
    return Settings()


@pytest.fixture(scope="module")
def app(settings: Settings, celery_worker_proc: Any) -> Flask:
    """The API wired to the session's Redis and worker."""
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the API."""
    return app.test_client()


@pytest.fixture(scope="module")
def make_app(settings: Settings, celery_worker_proc: Any) -> Callable[..., Flask]:
    """``make_app(**overrides)``: an API whose settings differ from the service's."""

    def build(**overrides: Any) -> Flask:
        return create_app(settings.model_copy(update=overrides))

    return build


# -- single predictions --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["base64", "pairs"])
def test_predict_sync(client: FlaskClient, request_factory: MakeRequest, encoding: str) -> None:
    body = request_factory(1000 + len(encoding), encoding=encoding)
    body["truth"] = {"latitude": 45.0, "longitude": 7.6}  # unknown keys are ignored

    response = client.post("/api/v1/predict", json=body)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    result = response.get_json()
    _assert_localization(result)
    assert result["cached"] is False
    assert re.fullmatch(r"[0-9a-f]{32}", result["request_id"])
    assert response.headers["X-Request-ID"] == result["request_id"]
    assert result["job_id"]


def test_repeat_is_a_cache_hit(client: FlaskClient, request_factory: MakeRequest) -> None:
    body = request_factory(1100)
    first = client.post("/api/v1/predict", json=body).get_json()

    second = client.post("/api/v1/predict", json=body)

    assert second.status_code == 200
    cached = second.get_json()
    assert cached["cached"] is True
    assert cached["job_id"] is None
    assert cached["position"] == first["position"]
    assert cached["model"] == first["model"]
    assert cached["request_id"] != first["request_id"]


def test_same_scene_as_pairs_hits_the_base64_entry(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    # The cache key is the canonical decoded input, not the JSON text.
    first = client.post("/api/v1/predict", json=request_factory(1150, encoding="base64"))
    assert first.get_json()["cached"] is False

    second = client.post("/api/v1/predict", json=request_factory(1150, encoding="pairs"))

    assert second.get_json()["cached"] is True


def test_client_request_id_is_kept_when_sane(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    body = request_factory(1200)

    kept = client.post("/api/v1/predict", json=body, headers={"X-Request-ID": "trace-42.a:b"})
    replaced = client.post(
        "/api/v1/predict", json=body, headers={"X-Request-ID": "bad id\twith spaces"}
    )

    assert kept.headers["X-Request-ID"] == "trace-42.a:b"
    assert kept.get_json()["request_id"] == "trace-42.a:b"
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["X-Request-ID"])


@pytest.mark.parametrize("timeout", ["0", "0.001"])
def test_wait_timeout_answers_202_then_job_succeeds(
    client: FlaskClient, request_factory: MakeRequest, timeout: str
) -> None:
    body = request_factory(1300 + len(timeout))

    response = client.post(f"/api/v1/predict?timeout={timeout}", json=body)

    assert response.status_code == 202, response.get_data(as_text=True)
    accepted = response.get_json()
    assert accepted["status"] in ("queued", "running", "succeeded")
    assert accepted["status_url"] == f"/api/v1/jobs/{accepted['job_id']}"
    assert response.headers["Location"] == accepted["status_url"]
    job = _poll(client, accepted["status_url"])
    assert job["status"] == "succeeded", job
    assert job["kind"] == "predict"
    assert job["request_id"] == accepted["request_id"]
    _assert_localization(job["result"])
    # The polled result went into the cache.
    again = client.post("/api/v1/predict", json=body).get_json()
    assert again["cached"] is True
    assert again["position"] == job["result"]["position"]


def test_async_submit_and_poll(client: FlaskClient, request_factory: MakeRequest) -> None:
    response = client.post("/api/v1/predict/async", json=request_factory(1400))

    assert response.status_code == 202
    accepted = response.get_json()
    assert accepted["status"] == "queued"
    assert response.headers["Location"] == accepted["status_url"]
    job = _poll(client, accepted["status_url"])
    assert job["status"] == "succeeded"
    _assert_localization(job["result"])


def test_stations_describe_what_a_valid_request_needs(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    resp = client.get("/api/v1/stations")
    assert resp.status_code == 200
    body = resp.get_json()
    ids = [s["id"] for s in body["stations"]]
    assert len(ids) == 7 and "torino" in ids
    assert body["sample_rate_hz"] == 16_000
    assert body["band_mhz"][0] < 145.0 < body["band_mhz"][1]
    torino = next(s for s in body["stations"] if s["id"] == "torino")
    assert torino["calibration_db"] == -30.0
    # A request built from this description is accepted.
    req = request_factory(5)
    assert {r["station"] for r in req["receivers"]} <= set(ids)


def test_unknown_job_is_404(client: FlaskClient) -> None:
    _problem(client.get("/api/v1/jobs/0b7e4a0c-6c5d-4bb0-9a43-6b1f5d0c7a11"), 404, "job-not-found")
    _problem(client.get("/api/v1/jobs/not%20an%20id"), 404, "job-not-found")


# -- batches -------------------------------------------------------------------------------


def _bad_iq(body: dict[str, Any]) -> dict[str, Any]:
    body["receivers"][0]["iq"] = "###not base64###"
    return body


def _unknown_station(body: dict[str, Any]) -> dict[str, Any]:
    body["receivers"][1]["station"] = "atlantis"
    return body


def test_batch_mixed_items_in_order(
    make_app: Callable[..., Flask], request_factory: MakeRequest
) -> None:
    client = make_app(batch_chunk_size=2).test_client()
    warm = request_factory(2000)
    assert client.post("/api/v1/predict", json=warm).status_code == 200
    items = [
        request_factory(2001),
        _bad_iq(request_factory(2002)),
        warm,  # cached
        request_factory(2003, encoding="pairs"),
        _unknown_station(request_factory(2004)),
        request_factory(2005),
        request_factory(2006),
    ]

    response = client.post("/api/v1/predict/batch", json={"items": items})

    assert response.status_code == 200, response.get_data(as_text=True)
    doc = response.get_json()
    assert [it["index"] for it in doc["items"]] == list(range(len(items)))
    assert [it["status"] for it in doc["items"]] == ["ok", "error", "ok", "ok", "error", "ok", "ok"]
    assert [it["cached"] for it in doc["items"]] == [False, False, True] + [False] * 4
    assert doc["counts"] == {"total": 7, "succeeded": 5, "failed": 2, "cached": 1}
    assert doc["items"][1]["problem"]["status"] == 422
    assert doc["items"][1]["problem"]["field"] == "items[1].receivers[0].iq"
    assert doc["items"][4]["problem"]["type"] == "urn:heimdall:problem:unknown-station"
    assert doc["items"][4]["problem"]["field"] == "items[4].receivers[1].station"
    for it in doc["items"]:
        if it["status"] == "ok":
            _assert_localization(it["result"])
    assert doc["job_id"] and doc["request_id"] == response.headers["X-Request-ID"]
    assert doc["elapsed_ms"] > 0
    # Batch results are cached too.
    single = client.post("/api/v1/predict", json=items[5]).get_json()
    assert single["cached"] is True
    assert single["position"] == doc["items"][5]["result"]["position"]


def test_batch_stops_at_first_invalid_item(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    items = [request_factory(2100), _bad_iq(request_factory(2101)), {"receivers": []}]

    response = client.post(
        "/api/v1/predict/batch", json={"items": items, "continue_on_error": False}
    )

    problem = _problem(response, 422, "invalid-iq")
    assert problem["field"] == "items[1].receivers[0].iq"


def test_batch_fully_cached_needs_no_worker_round_trip(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    items = [request_factory(2200), request_factory(2201)]
    for item in items:
        assert client.post("/api/v1/predict", json=item).status_code == 200

    doc = client.post("/api/v1/predict/batch", json={"items": items}).get_json()

    assert doc["counts"] == {"total": 2, "succeeded": 2, "failed": 0, "cached": 2}
    assert doc["job_id"] is None


def test_batch_async_and_timeout_return_jobs(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    items = [request_factory(2300), _bad_iq(request_factory(2301)), request_factory(2302)]

    queued = client.post("/api/v1/predict/batch/async", json={"items": items})
    timed_out = client.post("/api/v1/predict/batch?timeout=0", json={"items": items[:1]})

    assert queued.status_code == 202
    assert queued.get_json()["status"] == "queued"
    assert timed_out.status_code == 202
    job = _poll(client, queued.headers["Location"])
    assert job["status"] == "succeeded" and job["kind"] == "batch"
    doc = job["result"]
    assert [it["status"] for it in doc["items"]] == ["ok", "error", "ok"]
    assert doc["counts"]["failed"] == 1
    assert doc["job_id"] == queued.get_json()["job_id"]
    assert _poll(client, timed_out.headers["Location"])["result"]["counts"]["succeeded"] == 1


def test_batch_limits(make_app: Callable[..., Flask], request_factory: MakeRequest) -> None:
    client = make_app(max_batch_items=2).test_client()
    item = request_factory(2400)

    _problem(client.post("/api/v1/predict/batch", json={"items": [item] * 3}), 413)
    _problem(client.post("/api/v1/predict/batch", json={"items": []}), 422, "invalid-input")
    _problem(client.post("/api/v1/predict/batch", json={"items": {}}), 400, "invalid-request")
    _problem(
        client.post("/api/v1/predict/batch", json={"items": [item], "continue_on_error": "no"}),
        400,
    )


# -- client errors -------------------------------------------------------------------------


def _mutations() -> dict[str, tuple[Callable[[dict[str, Any]], Any], int, str, str | None]]:
    def short(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"][0]["iq"] = encode_base64(np.ones(100, np.complex64))
        return b

    def nan(b: dict[str, Any]) -> dict[str, Any]:
        x = np.ones(1024, np.complex64)
        x[7] = np.nan
        b["receivers"][0]["iq"] = encode_base64(x)
        return b

    def odd_bytes(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"][0]["iq"] = base64.b64encode(b"\0" * 8 * 600 + b"\0\0\0").decode()
        return b

    def bad_pair(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"][0]["iq"] = [[0.1, 0.2]] * 600 + [[0.1]]
        return b

    def huge_int(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"][0]["iq"] = [[10**400, 0]] * 600
        return b

    def iq_number(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"][0]["iq"] = 42
        return b

    def duplicate(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"][1]["station"] = b["receivers"][0]["station"]
        return b

    def rate(b: dict[str, Any]) -> dict[str, Any]:
        b["sample_rate_hz"] = 4_000
        return b

    def band(b: dict[str, Any]) -> dict[str, Any]:
        b["frequency_mhz"] = 433.0
        return b

    def few(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"] = b["receivers"][:2]
        return b

    def as_list(b: dict[str, Any]) -> list[Any]:
        return [b]

    def receivers_not_list(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"] = "all of them"
        return b

    def rate_is_text(b: dict[str, Any]) -> dict[str, Any]:
        b["sample_rate_hz"] = "48k"
        return b

    def rate_missing(b: dict[str, Any]) -> dict[str, Any]:
        del b["sample_rate_hz"]
        return b

    def receiver_without_iq(b: dict[str, Any]) -> dict[str, Any]:
        del b["receivers"][0]["iq"]
        return b

    def station_not_text(b: dict[str, Any]) -> dict[str, Any]:
        b["receivers"][0]["station"] = 7
        return b

    return {
        "not-base64": (_bad_iq, 422, "invalid-iq", "receivers[0].iq"),
        "too-short": (short, 422, "invalid-iq", "receivers[0].iq"),
        "nan": (nan, 422, "invalid-iq", "receivers[0].iq"),
        "bytes-not-complex64": (odd_bytes, 422, "invalid-iq", "receivers[0].iq"),
        "bad-pair": (bad_pair, 422, "invalid-iq", "receivers[0].iq[600]"),
        "iq-number": (iq_number, 422, "invalid-iq", "receivers[0].iq"),
        # A number no float holds is refused by the JSON parser itself.
        "huge-integer-sample": (huge_int, 400, "invalid-request", None),
        "unknown-station": (_unknown_station, 422, "unknown-station", "receivers[1].station"),
        "duplicate-station": (duplicate, 422, "duplicate-station", "receivers[1].station"),
        "sample-rate": (rate, 422, "sample-rate-mismatch", "sample_rate_hz"),
        "out-of-band": (band, 422, "frequency-out-of-band", "frequency_mhz"),
        "too-few": (few, 422, "too-few-stations", "receivers"),
        "body-is-list": (as_list, 400, "invalid-request", None),
        "receivers-not-list": (receivers_not_list, 400, "invalid-request", "receivers"),
        "rate-is-text": (rate_is_text, 400, "invalid-request", "sample_rate_hz"),
        "rate-missing": (rate_missing, 400, "invalid-request", "sample_rate_hz"),
        "receiver-without-iq": (receiver_without_iq, 400, "invalid-request", "receivers[0]"),
        "station-not-text": (station_not_text, 400, "invalid-request", "receivers[0].station"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_rejected_requests(
    client: FlaskClient, request_factory: MakeRequest, case: str, app: Flask
) -> None:
    mutate, status, type_slug, field = _mutations()[case]
    body = mutate(request_factory(3000))

    response = client.post("/api/v1/predict", json=body)

    problem = _problem(response, status, type_slug)
    assert problem.get("field") == field
    assert problem["request_id"] == response.headers["X-Request-ID"]


def test_malformed_and_non_json_bodies(client: FlaskClient) -> None:
    _problem(
        client.post("/api/v1/predict", data="{not json", content_type="application/json"),
        400,
        "invalid-request",
    )
    _problem(
        client.post("/api/v1/predict", data="", content_type="application/json"),
        400,
        "invalid-request",
    )
    _problem(
        client.post("/api/v1/predict", data="receivers=1", content_type="text/plain"),
        415,
        "unsupported-media-type",
    )
    _problem(client.post("/api/v1/predict", data=b"\x00\x01"), 415, "unsupported-media-type")
    _problem(client.post("/api/v1/predict?timeout=soon", json={}), 400, "invalid-request")
    deep = "[" * 100_000 + "]" * 100_000
    _problem(
        client.post("/api/v1/predict", data=deep, content_type="application/json"),
        400,
        "invalid-request",
    )


def test_body_over_the_limit_is_413(
    make_app: Callable[..., Flask], request_factory: MakeRequest
) -> None:
    client = make_app(max_request_bytes=10_000).test_client()

    response = client.post("/api/v1/predict", json=request_factory(3100))

    problem = _problem(response, 413, "payload-too-large")
    assert "10000" in problem["detail"]


def test_unknown_route_and_wrong_method(client: FlaskClient) -> None:
    _problem(client.get("/api/v1/nothing-here"), 404, "not-found")
    response = client.get("/api/v1/predict")
    _problem(response, 405, "method-not-allowed")
    assert "POST" in response.headers["Allow"]
    _problem(client.delete("/api/v1/jobs/abc"), 405)


def test_unexpected_exception_is_a_logged_500_problem(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    def explode() -> str:
        raise RuntimeError("secret internals")

    app.add_url_rule("/explode", view_func=explode)

    response = app.test_client().get("/explode")

    problem = _problem(response, 500, "internal-error")
    assert "secret" not in json.dumps(problem)
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


# -- dependencies down ---------------------------------------------------------------------


def test_cache_redis_down_still_serves(
    make_app: Callable[..., Flask], request_factory: MakeRequest
) -> None:
    # Both the state Redis (payloads, job records) and the cache's are gone:
    # payloads travel inline and every lookup is a miss, but answers still come.
    dead = f"redis://127.0.0.1:{_closed_port()}/0"
    app = make_app(redis_url=dead, cache_redis_url=dead)
    client = app.test_client()
    body = request_factory(4000)

    first = client.post("/api/v1/predict", json=body)
    second = client.post("/api/v1/predict", json=body)
    batch = client.post("/api/v1/predict/batch", json={"items": [request_factory(4001)]})

    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["cached"] is False
    _assert_localization(first.get_json())
    assert second.status_code == 200 and second.get_json()["cached"] is False
    assert batch.status_code == 200 and batch.get_json()["counts"]["succeeded"] == 1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert _metric(metrics, "heimdall_cache_errors_total") >= 1
    ready = client.get("/ready")
    assert _problem(ready, 503)["redis"].startswith("error")


def test_broker_down_is_503_not_500(
    make_app: Callable[..., Flask], request_factory: MakeRequest
) -> None:
    dead = f"redis://127.0.0.1:{_closed_port()}"
    client = make_app(broker_url=f"{dead}/0", result_backend=f"{dead}/1").test_client()
    body = request_factory(4100)

    started = time.monotonic()
    sync = client.post("/api/v1/predict", json=body)
    elapsed = time.monotonic() - started
    queued = client.post("/api/v1/predict/async", json=body)
    batch = client.post("/api/v1/predict/batch", json={"items": [body]})
    ready = client.get("/ready")

    _problem(sync, 503, "service-unavailable")
    _problem(queued, 503, "service-unavailable")
    _problem(batch, 503, "service-unavailable")
    assert elapsed < 10, "a dead broker must be reported fast"
    assert _problem(ready, 503)["broker"].startswith("error")


def test_worker_side_problem_keeps_its_status(
    settings: Settings,
    redis_server: Any,
    worker_factory: Callable[..., Any],
    request_factory: MakeRequest,
) -> None:
    # A worker that reads payloads from another Redis db than the API writes
    # them to: it answers "payload expired" (410) for every claim-checked job.
    broker, results = redis_server.url_for(10), redis_server.url_for(11)
    worker_factory(
        "misconfigured@%h",
        {
            "CELERY_BROKER_URL": broker,
            "CELERY_RESULT_BACKEND": results,
            "HEIMDALL_REDIS_URL": redis_server.url_for(12),
        },
        wait=None,
    )
    app = create_app(
        settings.model_copy(
            update={
                "broker_url": broker,
                "result_backend": results,
                "redis_url": redis_server.url_for(13),
            }
        )
    )
    client = app.test_client()
    # That worker's heartbeats (in its own state db) say when it has its model.
    deadline = time.monotonic() + 60
    while not any(
        c["state"] == "loaded"
        for w in live_workers(redis_server.client(12), 20.0)
        for c in w["children"]
    ):
        assert time.monotonic() < deadline, "the misconfigured worker never loaded its model"
        time.sleep(0.3)

    sync = client.post("/api/v1/predict", json=request_factory(4200))
    queued = client.post("/api/v1/predict/async", json=request_factory(4201))

    problem = _problem(sync, 410, "payload-expired")
    assert problem["field"] == "payload_key"
    job = _poll(client, queued.headers["Location"])
    assert job["status"] == "failed"
    assert job["problem"]["status"] == 410
    metrics = client.get("/metrics").get_data(as_text=True)
    assert _metric(metrics, "heimdall_prediction_errors_total", type="payload-expired") == 1


# -- probes, docs, metrics -----------------------------------------------------------------


def test_health_and_ready(client: FlaskClient, celery_worker_proc: Any) -> None:
    assert client.get("/health").get_json() == {"status": "ok"}

    response = client.get("/ready")

    assert response.status_code == 200, response.get_data(as_text=True)
    ready = response.get_json()
    assert ready["status"] == "ready"
    assert ready["redis"] == "ok" and ready["broker"] == "ok"
    hostnames = [w["hostname"] for w in ready["workers"]]
    assert celery_worker_proc.hostname in hostnames
    assert ready["loaded_children"] >= 1
    assert ready["model_versions"] == [ready["model"]["version"]]


def test_ready_does_not_flap(client: FlaskClient, celery_worker_proc: Any) -> None:
    """Readiness probes in a row all see the running worker (they used to lose replies)."""
    statuses = []
    for _ in range(12):
        statuses.append(client.get("/ready").status_code)
        time.sleep(0.5)  # past the one-second memo, so most probes read Redis
    assert statuses == [200] * 12


def test_not_ready_without_a_worker(make_app: Callable[..., Flask], redis_server: Any) -> None:
    # Databases no worker writes its heartbeat to or listens on.
    app = make_app(
        redis_url=redis_server.url_for(13),
        broker_url=redis_server.url_for(14),
        result_backend=redis_server.url_for(15),
    )

    started = time.monotonic()
    response = app.test_client().get("/ready")

    assert time.monotonic() - started < 5
    problem = _problem(response, 503, "service-unavailable")
    assert problem["workers"] == []
    assert problem["loaded_children"] == 0
    assert problem["redis"] == "ok" and problem["broker"] == "ok"
    assert "no worker" in problem["detail"]


def test_openapi_describes_every_route(client: FlaskClient, app: Flask) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    spec = response.get_json()
    assert spec["openapi"].startswith("3.1")
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        assert path in spec["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in spec["paths"][path], (method, path)
    for path in ("/health", "/ready", "/metrics"):
        assert path in spec["paths"]
    _assert_refs_resolve(spec, spec)
    from openapi_spec_validator import validate

    validate(spec)


def _document(response: Any, model: type[schemas.BaseModel]) -> dict[str, Any]:
    """Assert ``response`` carries a ``model`` document (media type and body); return it."""
    assert response.mimetype == model.media_type, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    model.model_validate(body)
    return body


def test_real_responses_are_the_declared_documents(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    # The documents forbid unknown members: a view that adds, drops or renames
    # a field fails here until app/schemas.py (and so the OpenAPI document) says so.
    body = request_factory(3700)
    computed = _document(client.post("/api/v1/predict", json=body), schemas.PredictResult)
    cached = _document(client.post("/api/v1/predict", json=body), schemas.PredictResult)
    batch = _document(
        client.post(
            "/api/v1/predict/batch",
            json={"items": [request_factory(3701), _bad_iq(request_factory(3702)), body]},
        ),
        schemas.BatchDocument,
    )
    accepted = client.post("/api/v1/predict/async", json=request_factory(3703))
    batch_accepted = client.post(
        "/api/v1/predict/batch/async", json={"items": [request_factory(3704)]}
    )
    problem = client.post("/api/v1/predict", json={**body, "sample_rate_hz": 1.0})

    assert (computed["cached"], cached["cached"]) == (False, True)
    assert [item["status"] for item in batch["items"]] == ["ok", "error", "ok"]
    for response in (accepted, batch_accepted):
        job_url = _document(response, schemas.JobAccepted)["status_url"]
        _poll(client, job_url)
        _document(client.get(job_url), schemas.Job)
    assert _document(problem, schemas.Problem)["field"] == "sample_rate_hz"
    _document(client.get("/api/v1/jobs/0b7e4a0c-6c5d-4bb0-9a43-6b1f5d0c7a11"), schemas.Problem)
    _document(client.get("/api/v1/stations"), schemas.Stations)
    _document(client.get("/health"), schemas.Health)
    ready = client.get("/ready")
    _document(ready, schemas.Ready if ready.status_code == 200 else schemas.NotReady)


def _assert_refs_resolve(spec: dict[str, Any], node: Any) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None:
            target: Any = spec
            for part in ref.removeprefix("#/").split("/"):
                assert part in target, f"dangling $ref {ref}"
                target = target[part]
        for value in node.values():
            _assert_refs_resolve(spec, value)
    elif isinstance(node, list):
        for value in node:
            _assert_refs_resolve(spec, value)


def test_docs_page_is_self_contained(client: FlaskClient) -> None:
    response = client.get("/docs")

    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    for path in ("/api/v1/predict", "/api/v1/predict/batch", "/api/v1/jobs/{job_id}", "/ready"):
        assert path in page
    assert "PredictRequest" in page and "Problem" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "no external resources"


def test_metrics_expose_the_custom_counters(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    body = request_factory(5000)
    client.post("/api/v1/predict", json=body)
    client.post("/api/v1/predict", json=body)  # hit
    client.post("/api/v1/predict?timeout=0", json=request_factory(5001))  # 202
    client.post("/api/v1/predict", json=_bad_iq(request_factory(5002)))  # 422

    response = client.get("/metrics")

    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert _metric(text, "heimdall_cache_hits_total") >= 1
    assert _metric(text, "heimdall_cache_misses_total") >= 1
    assert _metric(text, "heimdall_dispatch_timeouts_total", endpoint="predict") >= 1
    assert _metric(text, "heimdall_prediction_errors_total", type="invalid-iq") >= 1
    assert _metric(text, "flask_http_request_duration_seconds_count") >= 4


def test_api_process_never_imports_onnxruntime(
    service_env: dict[str, str], request_factory: MakeRequest, celery_worker_proc: Any
) -> None:
    script = (
        "import json, sys\n"
        "from wsgi import app\n"
        "body = json.loads(sys.stdin.read())\n"
        "r = app.test_client().post('/api/v1/predict', json=body)\n"
        "assert r.status_code == 200, r.get_data(as_text=True)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'tasks')\n"
        "             or m == 'heimdall.runtime')\n"
        "print(json.dumps(bad))\n"
    )
    env = {**service_env, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(request_factory(6000)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.fixture
def restarted_redis(redis_server: Any) -> Iterator[Any]:
    """The session's Redis, started again after the test whatever happened in it."""
    yield redis_server
    redis_server.start()


def test_recovers_after_redis_restart(
    app: Flask, restarted_redis: Any, celery_worker_proc: Any, request_factory: MakeRequest
) -> None:
    client = app.test_client()
    assert client.post("/api/v1/predict", json=request_factory(7000)).status_code == 200

    restarted_redis.stop()
    down = client.post("/api/v1/predict", json=request_factory(7001))
    restarted_redis.start()
    worker_died = celery_worker_proc.pid is None
    if worker_died:
        celery_worker_proc.restart()  # as a supervisor would, so later tests have a worker
    deadline = time.monotonic() + 30
    while True:
        again = client.post("/api/v1/predict", json=request_factory(7002))
        if again.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    if celery_worker_proc.pid is None:
        worker_died = True
        celery_worker_proc.restart()

    _problem(down, 503, "service-unavailable")
    assert again.status_code == 200, again.get_data(as_text=True)
    _assert_localization(again.get_json())
    assert not worker_died, "the worker exited when Redis went away:\n" + celery_worker_proc.log()


def test_environment_is_isolated(service_env: dict[str, str]) -> None:
    # Guard: these tests must never talk to the machine's Redis on 6379.
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "HEIMDALL_REDIS_URL"):
        assert ":6379/" not in os.environ[name]

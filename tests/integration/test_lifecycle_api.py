"""The model lifecycle from the API side, against real Redis, real registries and a real worker.

Routing decisions are checked where they leave the API: the job messages it
publishes. Apps under test send their tasks to a private queue no worker reads
(``probe_app``), and the test reads the messages back from the broker, so what
is asserted is what a worker would receive (``version``/``alias`` per request,
shadow copies with their own payloads). Answers that need a worker use the
session's real worker.

Promotion and rollback run on a registry of their own (a temporary folder with
the shipped model and a variant of it), so the session's champion never moves.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from pydantic import SecretStr

from app import create_app
from app.model_api_docs import (
    OPERATIONS,
    AliasMoveResponse,
    ModelInfoResponse,
    ModelPerformanceResponse,
    ModelVersionsResponse,
    ReloadResponse,
    TrafficResponse,
    TruthResponse,
)
from app.services import services
from heimdall import contract, lifecycle
from heimdall.config import Settings
from heimdall.registry import register_model, resolve_version
from heimdall.traffic import parse_policy, route
from heimdall.variants import register_variant

PROBLEM = "application/problem+json"
TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MakeRequest = Callable[..., dict[str, Any]]


def _problem(response: Any, status: int, type_slug: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = dict(response.get_json())
    assert body["status"] == status
    if type_slug is not None:
        assert body["type"] == f"urn:heimdall:problem:{type_slug}", body
    return body


@pytest.fixture(scope="module")
def settings(service_env: dict[str, str]) -> Settings:
    """The service's settings, with an admin token."""
    return Settings(admin_token=SecretStr(TOKEN))


@pytest.fixture(scope="module")
def own_registry(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, str, str]:
    """Settings of a private registry: the shipped model as champion, a variant as challenger."""
    var_dir = tmp_path_factory.mktemp("lifecycle-var")
    own = settings.model_copy(update={"var_dir": var_dir, "mlflow_tracking_uri": None})
    champion, _ = register_model(own)
    challenger = register_variant(own, var_dir / "variant", "challenger")
    assert champion.version != challenger.version
    return own, champion.version, challenger.version


class ProbeApp:
    """An API whose tasks go to a queue no worker reads; the test reads them back."""

    def __init__(self, app: Flask, broker: redis.Redis, queue: str) -> None:
        self.app = app
        self.client = app.test_client()
        self.broker = broker
        self.queue = queue

    def messages(self) -> list[tuple[str, list[Any]]]:
        """(task name, args) of every message published so far, oldest first (drained)."""
        found = []
        while (raw := self.broker.rpop(self.queue)) is not None:
            message = json.loads(raw)
            body = base64.b64decode(message["body"])
            args, _kwargs, _embed = json.loads(body)
            found.append((message["headers"]["task"], args))
        return found

    def set_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        response = self.client.put("/api/v1/model/traffic", json=policy, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        return dict(response.get_json())


@pytest.fixture(scope="module")
def probe(
    own_registry: tuple[Settings, str, str], redis_server: Any, service_env: dict[str, str]
) -> Iterator[ProbeApp]:
    """The API on the private registry (champion + challenger), tasks to a private queue."""
    own, _, _ = own_registry
    app = create_app(own.model_copy(update={"extra_models": ["challenger", "99"]}))
    queue = "lifecycle-probe"
    services(app).celery.conf.task_routes = {"heimdall.*": {"queue": queue}}
    broker = redis.Redis.from_url(service_env["CELERY_BROKER_URL"])
    probe = ProbeApp(app, broker, queue)
    yield probe
    broker.delete(queue)
    services(app).redis.delete(contract.TRAFFIC_KEY)


@pytest.fixture(autouse=True)
def _default_policy(settings: Settings) -> Iterator[None]:
    """Every test starts and ends with no stored policy (all traffic to the champion)."""
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(contract.TRAFFIC_KEY)
    yield
    client.delete(contract.TRAFFIC_KEY)


def test_every_lifecycle_route_is_declared(settings: Settings) -> None:
    app = create_app(settings)
    routes = {
        (method.lower(), rule.rule.replace("<job_id>", "{job_id}"))
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("model_api.")
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    assert routes == {(op.method, op.path) for op in OPERATIONS}
    admin_views = {(op.method, op.path) for op in OPERATIONS if op.admin}
    assert ("post", "/api/v1/jobs/{job_id}/truth") in admin_views
    assert all(m != "get" for m, _ in admin_views)


# -- admin auth ----------------------------------------------------------------------------


def test_admin_endpoints_are_closed_without_a_configured_token(settings: Settings) -> None:
    client = create_app(settings.model_copy(update={"admin_token": None})).test_client()
    for method, path in [
        ("put", "/api/v1/model/traffic"),
        ("post", "/api/v1/model/reload"),
        ("post", "/api/v1/model/promote"),
        ("post", "/api/v1/model/rollback"),
        ("post", "/api/v1/jobs/abc/truth"),
    ]:
        response = getattr(client, method)(path, json={}, headers=AUTH)
        body = _problem(response, 403, "admin-disabled")
        assert "HEIMDALL_ADMIN_TOKEN" in body["detail"]
    # Read-only endpoints stay open.
    assert client.get("/api/v1/model/traffic").status_code == 200


def test_a_missing_or_wrong_token_is_401_with_a_challenge(settings: Settings) -> None:
    client = create_app(settings).test_client()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.put("/api/v1/model/traffic", json={"weights": {}}, headers=headers)
        _problem(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = client.put("/api/v1/model/traffic", json={"weights": {"champion": 1}}, headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)


# -- traffic policy ------------------------------------------------------------------------


def test_traffic_put_validates_and_get_shows_the_policy(probe: ProbeApp) -> None:
    client = probe.client
    assert client.get("/api/v1/model/traffic").get_json()["weights"] == {"champion": 100}
    for document, field in [
        ({"weights": {"nobody": 1}}, "weights.nobody"),
        ({"weights": {"champion": -1}}, "weights.champion"),
        ({"weights": {"champion": 0}}, "weights"),
        ({"weights": {"champion": 1}, "shadow": ["nobody"]}, "shadow[0]"),
        ({"weights": {"champion": 1}, "updated_by": "me"}, "body"),
        ([1, 2], None),
    ]:
        response = client.put("/api/v1/model/traffic", json=document, headers=AUTH)
        body = _problem(response, 422)
        assert body.get("field") == field, body
    _problem(client.put("/api/v1/model/traffic", data="{", headers=AUTH), 415)
    response = client.put(
        "/api/v1/model/traffic",
        data="{",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    _problem(response, 400, "invalid-request")

    stored = probe.set_policy({"weights": {"champion": 90, "challenger": 10}, "shadow": []})
    assert stored["weights"] == {"champion": 90, "challenger": 10}
    assert stored["updated_by"] and stored["updated_at"]
    shown = client.get("/api/v1/model/traffic").get_json()
    assert shown["weights"] == {"champion": 90, "challenger": 10}
    targets = {t["target"]: t for t in shown["targets"]}
    assert targets["challenger"]["version"]
    assert "error" in targets["99"]  # served by settings, but not registered
    raw = services(probe.app).redis.get(contract.TRAFFIC_KEY)
    assert json.loads(raw)["weights"] == {"champion": 90, "challenger": 10}


# -- routing -------------------------------------------------------------------------------


def test_routing_is_sticky_by_routing_key_and_names_the_version(
    probe: ProbeApp, own_registry: tuple[Settings, str, str], request_factory: MakeRequest
) -> None:
    _, champion, challenger = own_registry
    versions = {"champion": champion, "challenger": challenger}
    document = {"weights": {"champion": 50, "challenger": 50}}
    probe.set_policy(document)
    policy = parse_policy(document, None)
    body = request_factory(5101)
    probe.messages()
    for i in range(40):
        for _ in range(3):
            response = probe.client.post(
                "/api/v1/predict/async", json={**body, "routing_key": f"station-run-{i}"}
            )
            assert response.status_code == 202, response.get_data(as_text=True)
    messages = probe.messages()
    assert len(messages) == 120
    chosen: dict[int, set[str]] = {}
    for n, (task, args) in enumerate(messages):
        assert task == contract.PREDICT_TASK
        job = args[0]
        expected = route(f"station-run-{n // 3}", policy)
        assert job[contract.MSG_ALIAS] == expected
        assert job[contract.MSG_VERSION] == versions[expected]
        chosen.setdefault(n // 3, set()).add(job[contract.MSG_ALIAS])
    assert all(len(targets) == 1 for targets in chosen.values())
    assert {t for targets in chosen.values() for t in targets} == {"champion", "challenger"}


def test_a_fifty_fifty_split_of_1000_requests_sends_400_to_600_to_each(
    probe: ProbeApp, request_factory: MakeRequest
) -> None:
    probe.set_policy({"weights": {"champion": 50, "challenger": 50}})
    body = request_factory(5102)
    probe.messages()
    for i in range(1_000):
        response = probe.client.post(
            "/api/v1/predict/async", json={**body, "routing_key": f"client-{i}"}
        )
        assert response.status_code == 202
    counts = Counter(args[0][contract.MSG_ALIAS] for _, args in probe.messages())
    assert sum(counts.values()) == 1_000
    assert 400 <= counts["champion"] <= 600, counts
    assert 400 <= counts["challenger"] <= 600, counts


def test_without_a_routing_key_the_body_decides_and_batches_route_per_item(
    probe: ProbeApp, request_factory: MakeRequest
) -> None:
    probe.set_policy({"weights": {"champion": 50, "challenger": 50}})
    bodies = [request_factory(5200 + i) for i in range(12)]
    probe.messages()
    for body in bodies * 2:
        assert probe.client.post("/api/v1/predict/async", json=body).status_code == 202
    singles = [args[0][contract.MSG_ALIAS] for _, args in probe.messages()]
    assert singles[:12] == singles[12:]

    items = [{**body, "routing_key": f"item-{i}"} for i, body in enumerate(bodies)]
    response = probe.client.post("/api/v1/predict/batch/async", json={"items": items})
    assert response.status_code == 202, response.get_data(as_text=True)
    policy = parse_policy({"weights": {"champion": 50, "challenger": 50}}, None)
    sent = [job for task, args in probe.messages() for job in _chunk_jobs(task, args)]
    assert len(sent) == 12
    # Each chunk is one version; every item went where its key routes it.
    expected = Counter(route(f"item-{i}", policy) for i in range(12))
    assert Counter(job[contract.MSG_ALIAS] for job in sent) == expected


def _chunk_jobs(task: str, args: list[Any]) -> list[dict[str, Any]]:
    if task != contract.CHUNK_TASK:
        return []
    jobs = list(args[0])
    assert len({job[contract.MSG_VERSION] for job in jobs}) == 1
    return jobs


def test_a_bad_routing_key_is_a_400(probe: ProbeApp, request_factory: MakeRequest) -> None:
    probe.set_policy({"weights": {"champion": 50, "challenger": 50}})
    body = request_factory(5103)
    for key in ("", "x" * 201, 7):
        response = probe.client.post("/api/v1/predict", json={**body, "routing_key": key})
        assert _problem(response, 400, "invalid-request")["field"] == "routing_key"


def test_shadow_targets_get_their_own_copy(
    probe: ProbeApp, own_registry: tuple[Settings, str, str], request_factory: MakeRequest
) -> None:
    _, champion, challenger = own_registry
    probe.set_policy({"weights": {"champion": 1}, "shadow": ["challenger", "99"]})
    probe.messages()
    response = probe.client.post("/api/v1/predict/async", json=request_factory(5104))
    assert response.status_code == 202
    job_id = response.get_json()["job_id"]
    messages = dict(probe.messages())
    primary = messages[contract.PREDICT_TASK][0]
    shadow, primary_id = messages[contract.SHADOW_TASK]
    assert primary[contract.MSG_VERSION] == champion
    assert shadow[contract.MSG_VERSION] == challenger
    assert shadow[contract.MSG_ALIAS] == "challenger"
    assert primary_id == job_id
    assert shadow["payload_key"] and shadow["payload_key"] != primary["payload_key"]
    state = services(probe.app).redis
    assert state.exists(shadow["payload_key"]) and state.exists(primary["payload_key"])
    # "99" is not registered: no copy is sent for it, and the request did not suffer.
    assert len(messages) == 2


def test_an_unregistered_target_is_sent_by_alias_only(
    probe: ProbeApp, request_factory: MakeRequest
) -> None:
    probe.set_policy({"weights": {"99": 1}})
    probe.messages()
    assert probe.client.post("/api/v1/predict/async", json=request_factory(5105)).status_code == 202
    ((_task, args),) = probe.messages()
    assert args[0][contract.MSG_ALIAS] == "99"
    assert contract.MSG_VERSION not in args[0]


# -- answers from the real worker ----------------------------------------------------------


@pytest.fixture(scope="module")
def live(settings: Settings, celery_worker_proc: Any) -> Flask:
    """The API on the session's registry and worker; "99" is served but never registered."""
    return create_app(settings.model_copy(update={"extra_models": ["challenger", "99"]}))


def test_the_champion_answers_a_target_that_is_not_registered(
    live: Flask, request_factory: MakeRequest
) -> None:
    client = live.test_client()
    assert (
        client.put("/api/v1/model/traffic", json={"weights": {"99": 1}}, headers=AUTH).status_code
        == 200
    )
    champion = services(live).model.current().identity.version
    body = request_factory(5301)
    for _ in range(2):
        response = client.post("/api/v1/predict", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
        result = response.get_json()
        assert result["fallback"] is True
        # The API could not resolve it, so it sent the target by name only;
        # the worker, which does not hold it either, says so.
        assert result["fallback_reason"] == "target 99 is not loaded on this worker"
        assert result["model"]["version"] == champion
        assert result["cached"] is False  # a fallback answer is never cached
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'heimdall_model_fallbacks_total{target="99"} 2.0' in metrics


def test_default_policy_answers_carry_the_fallback_fields_and_count_live_figures(
    live: Flask, request_factory: MakeRequest
) -> None:
    client = live.test_client()
    services(live).policy.forget()  # the policy an earlier test stored is gone
    version = services(live).model.current().identity.version
    before = client.get("/api/v1/model/performance").get_json()
    body = request_factory(5302)
    first = client.post("/api/v1/predict", json=body)
    again = client.post("/api/v1/predict", json=body)
    assert first.status_code == again.status_code == 200
    assert first.get_json()["fallback"] is False and first.get_json()["fallback_reason"] is None
    assert again.get_json()["cached"] is True and again.get_json()["fallback"] is False

    def figures(document: dict[str, Any]) -> dict[str, Any]:
        found = [v for v in document["versions"] if v["version"] == version]
        return found[0] if found else {"requests": 0, "cached": 0}

    after = figures(client.get("/api/v1/model/performance").get_json())
    assert after["requests"] - figures(before)["requests"] == 2
    assert after["cached"] - figures(before)["cached"] == 1
    assert after["latency_ms"]["mean"] > 0 and after["latency_ms"]["p95"] is not None
    assert "champion" in after["targets"]


def test_info_and_versions_describe_what_is_served(live: Flask, celery_worker_proc: Any) -> None:
    client = live.test_client()
    services(live).policy.forget()
    info = client.get("/api/v1/model/info").get_json()
    champion = next(s for s in info["served"] if s["champion"])
    assert champion["version"] and champion["run_id"] and champion["created_at"]
    assert champion["offline"]["accuracy"]["median_error_m"] > 0
    assert champion["offline"]["stations"]
    assert "requests" in champion["live"] and "accuracy" in champion["live"]
    assert info["traffic"]["weights"] == {"champion": 100}

    ModelInfoResponse.model_validate(info)
    versions = client.get("/api/v1/model/versions").get_json()
    ModelVersionsResponse.model_validate(versions)
    ModelPerformanceResponse.model_validate(client.get("/api/v1/model/performance").get_json())
    TrafficResponse.model_validate(client.get("/api/v1/model/traffic").get_json())
    entry = next(v for v in versions["versions"] if v["version"] == champion["version"])
    assert "champion" in entry["aliases"]
    assert entry["served_as"] == "champion"
    assert any(h["hostname"] == celery_worker_proc.hostname for h in entry["held_by"])


@pytest.fixture(scope="module")
def split_worker(
    worker_factory: Callable[..., Any], own_registry: tuple[Settings, str, str]
) -> Any:
    """A real worker on the private registry (champion + challenger), on its own queue."""
    own, _, _ = own_registry
    return worker_factory(
        "lc-split@%h",
        env_overrides={"HEIMDALL_VAR_DIR": str(own.var_dir), "HEIMDALL_EXTRA_MODELS": "challenger"},
        queues="lc-split",
    )


def test_split_answers_come_from_the_chosen_version(
    own_registry: tuple[Settings, str, str], split_worker: Any, request_factory: MakeRequest
) -> None:
    """Workers answer each routed request with the version the policy chose."""
    own, champion, challenger = own_registry
    versions = {"champion": champion, "challenger": challenger}
    app = create_app(own.model_copy(update={"extra_models": ["challenger"]}))
    services(app).celery.conf.task_routes = {"heimdall.*": {"queue": "lc-split"}}
    client = app.test_client()
    document = {"weights": {"champion": 50, "challenger": 50}}
    assert client.put("/api/v1/model/traffic", json=document, headers=AUTH).status_code == 200
    policy = parse_policy(document, None)
    body = request_factory(5501)
    answers = []
    for i in range(16):
        response = client.post("/api/v1/predict", json={**body, "routing_key": f"split-{i}"})
        assert response.status_code == 200, response.get_data(as_text=True)
        answers.append((route(f"split-{i}", policy), response.get_json()))
    for expected, answer in answers:
        assert answer["model"]["version"] == versions[expected], answer["model"]
        assert answer["fallback"] is False
    assert {expected for expected, _ in answers} == {"champion", "challenger"}


# -- ground truth --------------------------------------------------------------------------


def _scored(state: redis.Redis, job_id: str, version: str, ttl: int = 600) -> None:
    """The record a worker writes after a successful heimdall.predict (contract.scored_key)."""
    state.hset(
        contract.scored_key(job_id),
        mapping={
            "version": version,
            "alias": "champion",
            "latitude": "45.0",
            "longitude": "8.0",
            "covariance_m2": json.dumps([[1.0e6, 0.0], [0.0, 1.0e6]]),
            "fallback": "0",
            "at": repr(time.time()),
        },
    )
    state.expire(contract.scored_key(job_id), ttl)


def test_truth_scores_the_prediction_and_its_shadows(live: Flask, settings: Settings) -> None:
    client = live.test_client()
    state = services(live).redis
    version, shadow_version = "lc-truth-1", "lc-truth-2"
    for key in (contract.truth_key(settings.model_name, v) for v in (version, shadow_version)):
        state.delete(key)
    # Truth 2 km north of the prediction: sigma 1 km each way -> d^2 = 4, in 95 % not 68 %.
    north = 45.0 + 2_000.0 / 111_132.0
    _scored(state, "job-truth-a", version)
    state.hset(
        contract.shadow_key("job-truth-a"),
        mapping={
            shadow_version: json.dumps(
                {
                    "latitude": north,
                    "longitude": 8.0,
                    "covariance_m2": [[1.0e4, 0.0], [0.0, 1.0e4]],
                    "model": {"name": settings.model_name, "version": shadow_version},
                    "error": None,
                    "inference_time_ms": 3.0,
                }
            ),
            "lc-truth-3": json.dumps({"error": "version 3 is not held", "model": None}),
        },
    )
    response = client.post(
        "/api/v1/jobs/job-truth-a/truth",
        json={"latitude": north, "longitude": 8.0},
        headers=AUTH,
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    TruthResponse.model_validate(response.get_json())
    scores = {s["version"]: s for s in response.get_json()["scores"]}
    primary = scores[version]
    assert primary["role"] == "primary"
    assert primary["error_km"] == pytest.approx(2.0, abs=0.02)
    assert primary["inside_95"] is True and primary["inside_68"] is False
    assert scores[shadow_version]["error_km"] == pytest.approx(0.0, abs=0.001)
    assert scores[shadow_version]["inside_68"] is True
    assert scores["lc-truth-3"]["error_km"] is None and "not held" in scores["lc-truth-3"]["error"]

    # Once per job; unknown or expired jobs have nothing to score.
    again = client.post(
        "/api/v1/jobs/job-truth-a/truth", json={"latitude": 45.0, "longitude": 8.0}, headers=AUTH
    )
    _problem(again, 409, "truth-already-posted")
    missing = client.post(
        "/api/v1/jobs/job-truth-none/truth", json={"latitude": 45, "longitude": 8}, headers=AUTH
    )
    _problem(missing, 404, "job-not-found")
    _scored(state, "job-truth-b", version)
    bad = client.post(
        "/api/v1/jobs/job-truth-b/truth", json={"latitude": 91, "longitude": 8}, headers=AUTH
    )
    assert _problem(bad, 422)["field"] == "latitude"

    # Truth 0.5 km east: inside both ellipses. Live accuracy sums the two.
    east = 8.0 + 500.0 / 78_850.0
    ok = client.post(
        "/api/v1/jobs/job-truth-b/truth", json={"latitude": 45.0, "longitude": east}, headers=AUTH
    )
    assert ok.status_code == 200
    figures = client.get("/api/v1/model/performance").get_json()
    accuracy = next(v for v in figures["versions"] if v["version"] == version)["accuracy"]
    assert accuracy["n"] == 2
    assert accuracy["coverage_68"] == 0.5 and accuracy["coverage_95"] == 1.0
    assert accuracy["median_error_km"] == pytest.approx(1.25, abs=0.02)


def test_truth_of_a_real_prediction(live: Flask, request_factory: MakeRequest) -> None:
    """Truth posted for a computed prediction scores the version that answered."""
    client = live.test_client()
    response = client.post("/api/v1/predict", json=request_factory(5401))
    assert response.status_code == 200
    job_id = response.get_json()["job_id"]
    assert services(live).redis.exists(contract.scored_key(job_id))
    position = response.get_json()["position"]
    posted = client.post(f"/api/v1/jobs/{job_id}/truth", json=position, headers=AUTH)
    assert posted.status_code == 200
    assert posted.get_json()["scores"][0]["error_km"] == pytest.approx(0.0, abs=0.001)


# -- promote and rollback ------------------------------------------------------------------


def test_promote_and_rollback_move_the_aliases(own_registry: tuple[Settings, str, str]) -> None:
    own, champion, challenger = own_registry
    client = create_app(own).test_client()
    _problem(client.post("/api/v1/model/promote", json={"version": "999"}, headers=AUTH), 404)
    _problem(client.post("/api/v1/model/promote", json={"version": "x"}, headers=AUTH), 422)
    _problem(client.post("/api/v1/model/promote", json={}, headers=AUTH), 422)
    rollback = client.post("/api/v1/model/rollback", headers=AUTH)
    _problem(rollback, 409, "nothing-to-roll-back")

    promoted = client.post("/api/v1/model/promote", json={"version": challenger}, headers=AUTH)
    assert promoted.status_code == 200, promoted.get_data(as_text=True)
    AliasMoveResponse.model_validate(promoted.get_json())
    assert promoted.get_json()["champion"]["version"] == challenger
    assert promoted.get_json()["previous_champion"]["version"] == champion
    assert resolve_version(own, "champion").version == challenger
    assert resolve_version(own, lifecycle.PREVIOUS_ALIAS).version == champion
    # The API serves the new champion at once.
    info = client.get("/api/v1/model/traffic").get_json()
    assert next(t for t in info["targets"] if t["champion"])["version"] == challenger

    same = client.post("/api/v1/model/promote", json={"version": challenger}, headers=AUTH)
    assert same.get_json()["changed"] is False

    back = client.post("/api/v1/model/rollback", headers=AUTH)
    assert back.status_code == 200
    assert back.get_json()["champion"]["version"] == champion
    assert resolve_version(own, "champion").version == champion
    assert resolve_version(own, lifecycle.PREVIOUS_ALIAS).version == challenger


# -- reload --------------------------------------------------------------------------------


def test_reload_reports_every_worker(live: Flask, celery_worker_proc: Any) -> None:
    client = live.test_client()
    # Only this test's worker: other tests' workers may share the broker (and
    # one of them has no registry at all, so it would rightly refuse).
    url = f"/api/v1/model/reload?timeout=120&worker={celery_worker_proc.hostname}"
    response = client.post(url, headers=AUTH)
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["ok"] is True
    ReloadResponse.model_validate(body)
    assert [w["hostname"] for w in body["workers"]] == [celery_worker_proc.hostname]
    assert all(line.startswith("ok") for line in body["summary"])
    _problem(client.post("/api/v1/model/reload?timeout=0", headers=AUTH), 400)
    _problem(client.post("/api/v1/model/reload?worker=no%20spaces", headers=AUTH), 400)
    # The pool restarts on the reloaded model: wait until it serves again.
    celery_worker_proc.wait_for(
        lambda s: bool(s.get("children")) and all(c["state"] == "loaded" for c in s["children"]),
        timeout=120,
    )


# -- command line --------------------------------------------------------------------------


def test_cli_sets_shows_and_resets_the_traffic_policy(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from heimdall.cli import main

    state = redis.Redis.from_url(settings.redis_url)
    assert main(["model", "traffic", "champion=90", "challenger=10", "--shadow", "challenger"]) == 0
    stored = json.loads(state.get(contract.TRAFFIC_KEY) or b"{}")
    assert stored["weights"] == {"champion": 90, "challenger": 10}
    assert stored["shadow"] == ["challenger"]
    assert stored["updated_by"].startswith("cli:")
    capsys.readouterr()
    assert main(["model", "traffic"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == {"champion": 90, "challenger": 10}
    assert main(["model", "traffic", "nobody=1"]) == 1
    assert "not a served model" in capsys.readouterr().err
    assert main(["model", "traffic", "champion"]) == 2
    assert main(["model", "traffic", "--reset"]) == 0
    assert state.get(contract.TRAFFIC_KEY) is None


def test_cli_promotes_and_rolls_back(
    own_registry: tuple[Settings, str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from heimdall.cli import main
    from heimdall.config import get_settings

    own, champion, challenger = own_registry
    monkeypatch.setenv("HEIMDALL_VAR_DIR", str(own.var_dir))
    get_settings.cache_clear()
    try:
        assert main(["model", "promote", challenger]) == 0
        assert json.loads(capsys.readouterr().out)["champion"]["version"] == challenger
        assert resolve_version(own, "champion").version == challenger
        assert main(["model", "promote", "999"]) == 1
        assert main(["model", "rollback"]) == 0
        assert resolve_version(own, "champion").version == champion
    finally:
        get_settings.cache_clear()

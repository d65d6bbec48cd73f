"""The model lifecycle through the HTTP API: real gunicorn, a real worker, a registry of its own.

The module runs a service of its own: a gunicorn API (2 processes) and one
prefork worker (2 children) on databases of the session's private Redis that
nobody else uses, and a registry in a temporary folder holding the shipped
model (``champion``), a variant of it (``challenger``) and a variant that loads
but raises on every run. Each test says which versions it wants under which
alias (:meth:`Stack.serve`): the aliases are moved and the worker restarted on
them when it holds anything else, so the tests do not depend on their order.

Nothing waits on a control broadcast from this process (its producer would
publish on the session's broker): the worker is followed through its
heartbeat records in the state Redis, the API through its own endpoints.
Nothing asserts a timing beyond "within the deadline"; what the clients saw is
printed as JSON for the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from heimdall import contract
from heimdall.config import Settings
from heimdall.heartbeats import live_workers
from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME
from heimdall.registry import register_model
from heimdall.simulate.requests import simulated_request
from heimdall.traffic import MEMO_S, parse_policy, route
from heimdall.variants import make_variant, register_variant

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BROKER_DB, RESULTS_DB, STATE_DB, CACHE_DB = 28, 29, 30, 31
TOKEN = "lifecycle-http-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START_TIMEOUT_S = 150.0
SWITCH_TIMEOUT_S = 150.0
HEARTBEAT_TIMEOUT_S = 10.0
PREDICT_TIMEOUT_S = 90
"""Long enough that a request queued across a pool restart is answered, never a 202."""
POLICY_APPLIED_S = 2 * MEMO_S
"""Every API process reads the policy again after MEMO_S: waiting this long after a
change means every request routed later follows it (documented, not a timing check)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(
    what: str, condition: Callable[[], bool], timeout: float, log: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s\n{log()}")
        time.sleep(0.2)


def _body(seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    """A predict body from the scene drawn with ``seed``, and that scene's true position."""
    body = simulated_request(seed, 2048, "base64")
    truth = body.pop("truth")
    return body, {"latitude": truth["latitude"], "longitude": truth["longitude"]}


@dataclass
class Gunicorn:
    """A running ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def url(self, path: str) -> str:
        """Absolute URL of ``path``."""
        return self.base_url + path

    def log(self) -> str:
        """Everything gunicorn (and the app) wrote so far (the last 200 lines)."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-200:])

    def kill(self) -> None:
        """SIGKILL the whole process group, if it is still there."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class Stack:
    """The module's service: its registry, worker, API and state Redis."""

    settings: Settings
    env: dict[str, str]
    worker: Any
    api: Gunicorn
    state: redis.Redis
    http: requests.Session
    versions: dict[str, str]
    """Registered versions by role: shipped, variant, broken."""

    def set_alias(self, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` in the registry (what ``heimdall model promote`` does)."""
        from mlflow import MlflowClient

        uri = self.settings.tracking_uri
        MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
            self.settings.model_name, alias, version
        )

    def held(self) -> list[dict[str, str | None]]:
        """Per live worker child: ``{version: alias}`` of the versions it holds, if loaded."""
        held = []
        for worker in live_workers(self.state, HEARTBEAT_TIMEOUT_S):
            for child in worker["children"]:
                loaded = child.get("state") == "loaded"
                models = (child.get("models") or []) if loaded else []
                held.append({str(m["version"]): m.get("alias") for m in models})
        return held

    def serving(self, expected: dict[str, str]) -> bool:
        """Every live child (at least the worker's two) holds exactly ``expected``."""
        held = self.held()
        return len(held) >= self.worker.concurrency and all(h == expected for h in held)

    def targets(self) -> dict[str, str | None]:
        """The API's ``target -> version`` (one of its processes)."""
        answer = self.http.get(self.api.url("/api/v1/model/traffic"), timeout=30)
        answer.raise_for_status()
        return {t["target"]: t.get("version") for t in answer.json()["targets"]}

    def serve(self, champion: str, challenger: str) -> None:
        """Aliases on these versions, the worker holding them, the API resolving them.

        The worker is restarted (not reloaded) when it holds anything else: a
        restart also loads a version that a reload's smoke check would refuse.
        """
        expected = {champion: "champion", challenger: "challenger"}
        self.set_alias("champion", champion)
        self.set_alias("challenger", challenger)
        if not self.serving(expected):
            self.worker.stop(timeout=60)
            # The stopped children's records would count as live for a while.
            for key in self.state.scan_iter(match=contract.WORKERS_PREFIX + "*"):
                self.state.delete(key)
            self.worker.start(wait=None)
        _wait_until(
            f"the worker holds {expected}",
            lambda: self.serving(expected),
            START_TIMEOUT_S,
            self.worker.log,
        )
        wanted = {"champion": champion, "challenger": challenger}
        # Several answers in a row, so both API processes have followed.
        _wait_until(
            f"the API resolves {wanted}",
            lambda: all(
                {k: v for k, v in self.targets().items() if k in wanted} == wanted for _ in range(6)
            ),
            START_TIMEOUT_S,
            self.api.log,
        )

    def set_policy(self, document: dict[str, Any]) -> None:
        """PUT the traffic policy and wait until every API process routes by it."""
        answer = self.http.put(
            self.api.url("/api/v1/model/traffic"), json=document, headers=AUTH, timeout=30
        )
        assert answer.status_code == 200, answer.text
        time.sleep(POLICY_APPLIED_S)

    def reset_policy(self) -> None:
        """No stored policy: everything to the champion (within MEMO_S)."""
        self.state.delete(contract.TRAFFIC_KEY)
        time.sleep(POLICY_APPLIED_S)

    def predict(self, body: dict[str, Any]) -> requests.Response:
        """POST /api/v1/predict."""
        return self.http.post(self.api.url("/api/v1/predict"), json=body, timeout=PREDICT_TIMEOUT_S)

    def performance(self) -> dict[str, dict[str, Any]]:
        """GET /api/v1/model/performance, by version."""
        answer = self.http.get(self.api.url("/api/v1/model/performance"), timeout=30)
        answer.raise_for_status()
        return {v["version"]: v for v in answer.json()["versions"]}


@pytest.fixture(scope="module")
def stack(
    service_env: dict[str, str],
    redis_server: Any,
    worker_factory: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The registry, the worker (not started yet) and the API, answering /health."""
    for db in (BROKER_DB, RESULTS_DB, STATE_DB, CACHE_DB):
        redis_server.client(db).flushdb()
    var_dir = tmp_path_factory.mktemp("lifecycle-http-var")
    settings = Settings(var_dir=var_dir, mlflow_tracking_uri=None)
    shipped, _ = register_model(settings)
    variant = register_variant(settings, var_dir / "variant", "challenger")
    broken = register_variant(settings, var_dir / "broken", "broken", fail_at_run=True)
    env = {
        **service_env,
        "HEIMDALL_VAR_DIR": str(var_dir),
        "CELERY_BROKER_URL": redis_server.url_for(BROKER_DB),
        "CELERY_RESULT_BACKEND": redis_server.url_for(RESULTS_DB),
        "HEIMDALL_REDIS_URL": redis_server.url_for(STATE_DB),
        "HEIMDALL_CACHE_REDIS_URL": redis_server.url_for(CACHE_DB),
        "HEIMDALL_HEARTBEAT_INTERVAL_S": "2",
        "HEIMDALL_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        "HEIMDALL_EXTRA_MODELS": "challenger",
        "HEIMDALL_PREDICT_TIMEOUT_S": str(PREDICT_TIMEOUT_S),
        # Every answer computed: shadows are sent and truth can be posted for each.
        "HEIMDALL_CACHE_TTL_S": "0",
        "HEIMDALL_ADMIN_TOKEN": TOKEN,
        "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
    }
    worker = worker_factory("lc-http@%h", env_overrides=env, wait=None)
    api = _start_gunicorn(env, tmp_path_factory.mktemp("lifecycle-http-api"))
    state = redis.Redis.from_url(env["HEIMDALL_REDIS_URL"])
    try:
        with requests.Session() as http:
            yield Stack(
                settings=settings,
                env=env,
                worker=worker,
                api=api,
                state=state,
                http=http,
                versions={
                    "shipped": shipped.version,
                    "variant": variant.version,
                    "broken": broken.version,
                },
            )
    finally:
        api.kill()
        worker.stop(timeout=60)
        state.close()


def _start_gunicorn(env: dict[str, str], workdir: Path) -> Gunicorn:
    port = _free_port()
    metrics_dir = workdir / "prometheus"
    metrics_dir.mkdir()
    log_path = workdir / "gunicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env={
                **env,
                "HEIMDALL_API_BIND": f"127.0.0.1:{port}",
                "HEIMDALL_API_WORKERS": "2",
                "HEIMDALL_API_CONTROL_SOCKET": "off",
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Gunicorn(proc, f"http://127.0.0.1:{port}", log_path)

    def answers() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited ({proc.returncode}):\n{server.log()}")
        with contextlib.suppress(requests.RequestException):
            return requests.get(server.url("/health"), timeout=2).status_code == 200
        return False

    try:
        _wait_until("gunicorn answers /health", answers, START_TIMEOUT_S, server.log)
    except BaseException:
        server.kill()
        raise
    return server


@pytest.fixture(autouse=True)
def _no_policy(stack: Stack) -> Iterator[None]:
    """Every test starts and ends with no stored policy (all traffic to the champion)."""
    stack.state.delete(contract.TRAFFIC_KEY)
    yield
    stack.state.delete(contract.TRAFFIC_KEY)


@dataclass
class Answer:
    """One request a client sent and what came back."""

    ended: float
    status: int | str
    """The HTTP status, or the name of the exception."""
    version: str | None = None
    fallback: bool | None = None


@dataclass
class Clients:
    """Keep-alive clients posting distinct predictions in threads until told to stop."""

    url: str
    first_seed: int
    count: int = 4
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.count)
        ]

    def _run(self, index: int) -> None:
        seed = self.first_seed + index
        with requests.Session() as session:
            while not self._stop.is_set():
                body, _ = _body(seed)
                seed += self.count
                try:
                    response = session.post(self.url, json=body, timeout=PREDICT_TIMEOUT_S + 30)
                except requests.RequestException as exc:
                    answer = Answer(time.monotonic(), type(exc).__name__)
                else:
                    answer = Answer(time.monotonic(), response.status_code)
                    if response.status_code == 200:
                        result = response.json()
                        answer.version = result["model"]["version"]
                        answer.fallback = result["fallback"]
                with self._lock:
                    self.answers.append(answer)

    def start(self) -> None:
        """Start every client."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending; wait for the requests in flight."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=PREDICT_TIMEOUT_S + 60)

    def so_far(self) -> list[Answer]:
        """The answers so far, in the order they came back."""
        with self._lock:
            return sorted(self.answers, key=lambda a: a.ended)


def test_reload_to_a_different_model_under_load_answers_every_request(stack: Stack) -> None:
    old, challenger = stack.versions["shipped"], stack.versions["variant"]
    stack.serve(champion=old, challenger=challenger)
    clients = Clients(stack.api.url("/api/v1/predict"), first_seed=700_000)
    new: str | None = None
    reload: dict[str, Any] = {}
    clients.start()
    try:
        _wait_until(
            "the old champion answers",
            lambda: sum(a.version == old for a in clients.so_far()) >= 8,
            START_TIMEOUT_S,
            stack.worker.log,
        )
        # Other weights, registered under the champion alias: a different model.
        new = register_variant(
            stack.settings,
            stack.settings.var_dir / "next-champion",
            "champion",
            shift_m=(-15_000.0, 12_000.0),
        ).version
        response = stack.http.post(
            stack.api.url("/api/v1/model/reload?timeout=150"), headers=AUTH, timeout=200
        )
        reload = response.json()
        assert response.status_code == 200, reload
        reloaded_at = time.monotonic()
        _wait_until(
            "the new champion answers",
            lambda: sum(a.version == new and a.ended > reloaded_at for a in clients.so_far()) >= 8,
            SWITCH_TIMEOUT_S,
            stack.worker.log,
        )
    finally:
        clients.stop()
    answers = clients.so_far()
    versions = [a.version for a in answers]
    report = {
        "sent": len(answers),
        "statuses": sorted({str(a.status) for a in answers}),
        "old": versions.count(old),
        "new": versions.count(new),
        "fallbacks": sum(bool(a.fallback) for a in answers),
        "reload": reload.get("summary"),
    }
    print(json.dumps(report))
    assert [a for a in answers if a.status != 200] == [], report
    assert reload["ok"] is True, reload
    assert new is not None and new not in (old, challenger)
    assert versions[0] == old and versions[-1] == new, report
    assert set(versions) == {old, new}, report


def _value(metrics: str, family: str, labels: dict[str, str]) -> float:
    """The value of the sample of ``family`` with ``labels`` in a /metrics text (0 if none)."""
    for metric in text_string_to_metric_families(metrics):
        for sample in metric.samples:
            if sample.name == family and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_a_challenger_failing_every_request_is_answered_by_the_champion(stack: Stack) -> None:
    champion, broken = stack.versions["shipped"], stack.versions["broken"]
    stack.serve(champion=champion, challenger=broken)
    metrics_url = stack.api.url("/metrics")
    counter = ("heimdall_model_fallbacks_total", {"target": "challenger"})
    fallbacks_before = _value(stack.http.get(metrics_url, timeout=30).text, *counter)
    live_before = stack.performance().get(champion, {}).get("fallbacks", 0)

    stack.set_policy({"weights": {"champion": 0, "challenger": 100}})
    answers = [stack.predict(_body(710_000 + i)[0]) for i in range(12)]

    for response in answers:
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["model"]["version"] == champion, result["model"]
        assert result["fallback"] is True
        assert f"version {broken} (challenger) failed while predicting" in (
            result["fallback_reason"] or ""
        ), result["fallback_reason"]
    # Counted by the API processes: the Prometheus counter at once, the live
    # figures once each process has flushed them (about once a second).
    metrics = stack.http.get(metrics_url, timeout=30).text
    assert _value(metrics, *counter) - fallbacks_before == len(answers)
    assert _value(
        metrics,
        "heimdall_model_requests_total",
        {"model_version": champion, "result": "fallback"},
    ) >= len(answers)
    _wait_until(
        "the fallbacks show in /api/v1/model/performance",
        lambda: stack.performance()[champion]["fallbacks"] - live_before == len(answers),
        60,
        stack.api.log,
    )

    # Batch items routed to it are answered by the champion alike.
    items = [{**_body(711_000 + i)[0], "routing_key": f"fallback-{i}"} for i in range(6)]
    batch = stack.http.post(
        stack.api.url("/api/v1/predict/batch"), json={"items": items}, timeout=200
    )
    assert batch.status_code == 200, batch.text
    for item in batch.json()["items"]:
        assert item["status"] == "ok", item
        assert item["result"]["model"]["version"] == champion, item["result"]["model"]
        assert item["result"]["fallback"] is True, item["result"]


def test_a_failing_shadow_never_reaches_the_client_and_truth_names_its_failure(
    stack: Stack,
) -> None:
    champion, broken = stack.versions["shipped"], stack.versions["broken"]
    stack.serve(champion=champion, challenger=broken)
    stack.set_policy({"weights": {"champion": 100}, "shadow": ["challenger"]})
    body, truth = _body(715_000)

    response = stack.predict(body)

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"]["version"] == champion and result["fallback"] is False
    job_id = result["job_id"]
    _wait_until(
        f"the shadow of {job_id} is recorded",
        lambda: stack.state.hexists(contract.shadow_key(job_id), broken),
        120,
        stack.worker.log,
    )
    scored = stack.http.post(
        stack.api.url(f"/api/v1/jobs/{job_id}/truth"), json=truth, headers=AUTH, timeout=30
    )
    assert scored.status_code == 200, scored.text
    scores = {s["role"]: s for s in scored.json()["scores"]}
    assert scores["primary"]["version"] == champion
    assert scores["primary"]["error_km"] is not None
    assert scores["shadow"]["version"] == broken
    assert scores["shadow"]["error_km"] is None
    assert "Gather" in scores["shadow"]["error"], scores["shadow"]


def test_a_fifty_fifty_split_answers_each_key_with_the_version_it_routes_to(
    stack: Stack,
) -> None:
    champion, challenger = stack.versions["shipped"], stack.versions["variant"]
    stack.serve(champion=champion, challenger=challenger)
    document = {"weights": {"champion": 50, "challenger": 50}}
    stack.set_policy(document)
    policy = parse_policy(document, None)
    versions = {"champion": champion, "challenger": challenger}

    # 200 distinct requests, each with a key of its own, from 4 clients at once;
    # then 10 keys sent again, each with 3 other inputs.
    sends = [(f"split-{i}", 720_000 + i) for i in range(200)]
    sends += [(f"split-{i}", 721_000 + 3 * i + k) for i in range(10) for k in range(3)]
    results: dict[int, tuple[str, int | str, dict[str, Any]]] = {}
    lock = threading.Lock()

    def client(index: int) -> None:
        with requests.Session() as session:
            for n in range(index, len(sends), 4):
                key, seed = sends[n]
                body = {**_body(seed)[0], "routing_key": key}
                response = session.post(
                    stack.api.url("/api/v1/predict"), json=body, timeout=PREDICT_TIMEOUT_S + 30
                )
                answer = response.json() if response.status_code == 200 else {}
                with lock:
                    results[n] = (key, response.status_code, answer)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert len(results) == len(sends)
    by_key: dict[str, set[str]] = {}
    wrong = []
    for key, status, answer in results.values():
        assert status == 200, (key, status)
        version = answer["model"]["version"]
        by_key.setdefault(key, set()).add(version)
        if version != versions[route(key, policy)] or answer["fallback"]:
            wrong.append((key, route(key, policy), answer["model"], answer["fallback_reason"]))
    counts = {target: 0 for target in versions}
    for i in range(200):
        counts[route(f"split-{i}", policy)] += 1
    print(json.dumps({"routed": counts, "wrong": len(wrong)}))
    assert wrong == []
    assert all(len(seen) == 1 for seen in by_key.values())
    assert set().union(*by_key.values()) == {champion, challenger}


def test_batch_items_are_answered_by_the_version_each_one_routes_to(stack: Stack) -> None:
    champion, challenger = stack.versions["shipped"], stack.versions["variant"]
    stack.serve(champion=champion, challenger=challenger)
    document = {"weights": {"champion": 50, "challenger": 50}}
    stack.set_policy(document)
    policy = parse_policy(document, None)
    versions = {"champion": champion, "challenger": challenger}
    items = [{**_body(725_000 + i)[0], "routing_key": f"batch-{i}"} for i in range(24)]

    response = stack.http.post(
        stack.api.url("/api/v1/predict/batch"), json={"items": items}, timeout=200
    )

    assert response.status_code == 200, response.text
    document_items = response.json()["items"]
    assert [item["index"] for item in document_items] == list(range(len(items)))
    answered = set()
    for item in document_items:
        assert item["status"] == "ok", item
        expected = versions[route(f"batch-{item['index']}", policy)]
        assert item["result"]["model"]["version"] == expected, item["result"]["model"]
        assert item["result"]["fallback"] is False
        answered.add(expected)
    assert answered == {champion, challenger}


def test_a_shadow_is_recorded_and_scored_beside_the_champion(stack: Stack) -> None:
    champion, challenger = stack.versions["shipped"], stack.versions["variant"]
    stack.serve(champion=champion, challenger=challenger)
    stack.set_policy({"weights": {"champion": 100}, "shadow": ["challenger"]})
    before = stack.performance()

    posted = []
    for seed in range(730_000, 730_004):
        body, truth = _body(seed)
        response = stack.predict(body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["model"]["version"] == champion and result["fallback"] is False
        job_id = result["job_id"]

        def shadowed(job_id: str = job_id) -> bool:
            return stack.state.hexists(contract.shadow_key(job_id), challenger)

        _wait_until(f"the shadow of {job_id} is recorded", shadowed, 120, stack.worker.log)
        shadow = json.loads(stack.state.hget(contract.shadow_key(job_id), challenger) or b"{}")
        assert shadow["error"] is None, shadow
        assert shadow["model"]["version"] == challenger

        scored = stack.http.post(
            stack.api.url(f"/api/v1/jobs/{job_id}/truth"), json=truth, headers=AUTH, timeout=30
        )
        assert scored.status_code == 200, scored.text
        scores = {s["role"]: s for s in scored.json()["scores"]}
        assert scores["primary"]["version"] == champion
        assert scores["shadow"]["version"] == challenger
        assert scores["primary"]["error_km"] is not None
        assert scores["shadow"]["error_km"] is not None
        posted.append(scores)
    print(json.dumps([{role: s["error_km"] for role, s in scores.items()} for scores in posted]))

    after = stack.performance()
    for version in (champion, challenger):
        n_before = before.get(version, {}).get("accuracy", {}).get("n", 0)
        accuracy = after[version]["accuracy"]
        assert accuracy["n"] - n_before == len(posted), (version, accuracy)
        assert accuracy["median_error_km"] is not None


def test_the_cli_reload_to_a_corrupted_challenger_fails_while_the_api_answers(
    stack: Stack,
) -> None:
    champion, challenger = stack.versions["shipped"], stack.versions["variant"]
    stack.serve(champion=champion, challenger=challenger)
    settings = stack.settings
    # A new challenger whose copy on this disk is cut in half: its card no
    # longer matches it, so the reload's check refuses it.
    source = make_variant(settings.var_dir / "corrupt", shift_m=(5_000.0, 5_000.0))
    corrupt, _ = register_model(settings, source, alias="challenger")
    local = settings.var_dir.resolve() / "models" / settings.model_name / corrupt.version
    local.mkdir(parents=True, exist_ok=True)
    onnx_bytes = (source / MODEL_FILENAME).read_bytes()
    (local / MODEL_FILENAME).write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    (local / CARD_FILENAME).write_text((source / CARD_FILENAME).read_text())

    clients = Clients(stack.api.url("/api/v1/predict"), first_seed=740_000, count=2)
    clients.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "heimdall.cli", "model", "reload", "--timeout", "150"],
            cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=200,
        )  # fmt: skip
        after_cli = time.monotonic()
        _wait_until(
            "answers after the refused reload",
            lambda: sum(a.ended > after_cli for a in clients.so_far()) >= 4,
            SWITCH_TIMEOUT_S,
            stack.worker.log,
        )
    finally:
        clients.stop()
        stack.set_alias("challenger", challenger)
    answers = clients.so_far()
    print(json.dumps({"cli": done.returncode, "stdout": done.stdout, "sent": len(answers)}))
    assert done.returncode != 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if stack.worker.hostname in line]
    assert len(lines) == 1 and lines[0].startswith("FAILED"), done.stdout
    assert "challenger" in lines[0], lines[0]
    assert [a for a in answers if a.status != 200] == []
    assert {a.version for a in answers} == {champion}
    # The old set keeps serving: the refused version was never loaded.
    assert f"still serving heimdall-localizer v{champion} (champion)" in lines[0]
    held = {champion: "champion", challenger: "challenger"}
    _wait_until(f"the worker holds {held}", lambda: stack.serving(held), 60, stack.worker.log)
    assert all(corrupt.version not in h for h in stack.held())


def test_promote_then_reload_under_a_split_answers_every_request(stack: Stack) -> None:
    """The operator's last step: the challenger becomes the champion while traffic flows."""
    old, promoted = stack.versions["shipped"], stack.versions["variant"]
    stack.serve(champion=old, challenger=promoted)
    stack.set_policy({"weights": {"champion": 50, "challenger": 50}})
    clients = Clients(stack.api.url("/api/v1/predict"), first_seed=780_000)
    clients.start()
    try:
        _wait_until(
            "both versions answer",
            lambda: {a.version for a in clients.so_far()} == {old, promoted},
            START_TIMEOUT_S,
            stack.worker.log,
        )
        moved = stack.http.post(
            stack.api.url("/api/v1/model/promote"),
            json={"version": promoted},
            headers=AUTH,
            timeout=60,
        )
        assert moved.status_code == 200, moved.text
        assert moved.json()["champion"]["version"] == promoted
        reload = stack.http.post(
            stack.api.url("/api/v1/model/reload?timeout=150"), headers=AUTH, timeout=200
        )
        assert reload.status_code == 200 and reload.json()["ok"] is True, reload.text
        reloaded_at = time.monotonic()
        # Both targets now resolve to the promoted version: every answer is its.
        _wait_until(
            "only the promoted version answers",
            lambda: (
                sum(a.ended > reloaded_at and a.version == promoted for a in clients.so_far()) >= 12
            ),
            SWITCH_TIMEOUT_S,
            stack.worker.log,
        )
    finally:
        clients.stop()
        stack.set_alias("champion", old)
    answers = clients.so_far()
    print(
        json.dumps({"sent": len(answers), "promoted": [a.version for a in answers].count(promoted)})
    )
    assert [a for a in answers if a.status != 200] == []
    assert answers[-1].version == promoted

"""Every request and task is counted across processes; the dashboard asks for real metrics.

A real gunicorn (deploy/gunicorn.conf.py, 2 workers, multiprocess metrics) and
a real prefork worker (2 children, ``HEIMDALL_WORKER_METRICS_PORT`` set) serve
N distinct predictions on their own Redis databases, so no other worker of the
session takes their tasks. Then ``/metrics`` of the API and the worker's
endpoint must both count exactly N, although each figure was written by
several processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    ALT_BROKER_DB,
    ALT_CACHE_DB,
    ALT_PREDICTIONS_DB,
    ALT_RESULTS_DB,
    RedisServer,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
START_TIMEOUT_S = 90.0
COUNT_TIMEOUT_S = 60.0
MAX_REQUESTS = 48

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse(text: str) -> Samples:
    """Exposition text -> {(sample name, labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    """Label sets of the samples called ``name``."""
    return [dict(lab) for (n, lab) in samples if n == name]


@dataclass
class Stack:
    """The isolated API + worker, and what was sent to them."""

    api_url: str
    worker_metrics_url: str
    api_metrics_dir: Path
    worker_metrics_dir: Path
    sent: int = 0


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited ({proc.returncode}):\n{log.read_text()[-5000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-5000:]}")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the worker's own endpoint reports 2 children with a loaded model."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the worker exited ({proc.returncode}):\n{log.read_text()[-5000:]}")
        samples = parse(requests.get(url, timeout=10).text)
        if total(samples, "heimdall_worker_children_ready") == 2:
            return
        time.sleep(0.2)
    pytest.fail(f"the worker's children are not ready in {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def stack(
    service_env: dict[str, str],
    redis_server: RedisServer,
    worker_factory: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """gunicorn (2 workers) + a worker (2 children) on databases no other worker reads."""
    workdir = tmp_path_factory.mktemp("metrics-stack")
    for db in (ALT_BROKER_DB, ALT_RESULTS_DB, ALT_CACHE_DB, ALT_PREDICTIONS_DB):
        redis_server.client(db).flushdb()
    isolated = {
        "CELERY_BROKER_URL": redis_server.url_for(ALT_BROKER_DB),
        "CELERY_RESULT_BACKEND": redis_server.url_for(ALT_RESULTS_DB),
        "HEIMDALL_REDIS_URL": redis_server.url_for(ALT_CACHE_DB),
        # Its own prediction cache: answers cached by earlier tests must not count.
        "HEIMDALL_CACHE_REDIS_URL": redis_server.url_for(ALT_PREDICTIONS_DB),
        "HEIMDALL_PREDICT_TIMEOUT_S": "30",
    }
    worker_port = _free_port()
    worker = worker_factory(
        "metrics-worker@%h",
        env_overrides={
            **isolated,
            "HEIMDALL_WORKER_METRICS_PORT": str(worker_port),
            "HEIMDALL_WORKER_METRICS_BIND": "127.0.0.1",
        },
        wait=None,  # the status broadcast does not reach other databases; see _wait_ready
    )
    api_port = _free_port()
    api_metrics_dir = workdir / "prometheus"
    env = {
        **service_env,
        **isolated,
        "HEIMDALL_API_BIND": f"127.0.0.1:{api_port}",
        "HEIMDALL_API_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(api_metrics_dir),
        "PYTHONPATH": str(ROOT),
    }
    log_path = workdir / "gunicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        api_url = f"http://127.0.0.1:{api_port}"
        _wait_http(api_url + "/health", proc, log_path)
        worker_url = f"http://127.0.0.1:{worker_port}/metrics"
        _wait_http(worker_url, worker.proc, worker.log_path)
        _wait_ready(worker_url, worker.proc, worker.log_path)
        from heimdall.config import Settings
        from tasks.metrics import metrics_dir

        yield Stack(
            api_url=api_url,
            worker_metrics_url=worker_url,
            api_metrics_dir=api_metrics_dir,
            worker_metrics_dir=metrics_dir(
                Settings(var_dir=Path(service_env["HEIMDALL_VAR_DIR"])), worker.hostname
            ),
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        worker.stop()


def _pids_with(directory: Path, prefix: str) -> set[str]:
    return {p.stem.rsplit("_", 1)[-1] for p in directory.glob(f"{prefix}_*.db")}


@pytest.fixture(scope="module")
def traffic(stack: Stack, request_factory: Callable[..., dict[str, Any]]) -> Stack:
    """N distinct predictions (cache misses), sent 4 at a time on fresh connections.

    Rounds of 8 go on until both gunicorn workers have served some (each worker's
    histogram file appears with its first request), at most MAX_REQUESTS.
    """
    seed = 7000

    def send(body: dict[str, Any]) -> int:
        return requests.post(stack.api_url + "/api/v1/predict", json=body, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        while stack.sent < MAX_REQUESTS:
            bodies = [request_factory(seed + i) for i in range(8)]
            seed += 8
            statuses = list(pool.map(send, bodies))
            stack.sent += len(bodies)
            assert statuses == [200] * len(bodies)
            if len(_pids_with(stack.api_metrics_dir, "histogram")) >= 2:
                break
    return stack


def _scrape(url: str) -> Samples:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    return parse(response.text)


def _wait_count(url: str, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name`` adds up to ``expected`` (children count after the API answered)."""
    deadline = time.monotonic() + COUNT_TIMEOUT_S
    samples = _scrape(url)
    while total(samples, name, **labels) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        samples = _scrape(url)
    return samples


def test_api_counts_every_request_across_gunicorn_workers(traffic: Stack) -> None:
    n = traffic.sent
    samples = _scrape(traffic.api_url + "/metrics")

    assert len(_pids_with(traffic.api_metrics_dir, "histogram")) >= 2
    assert (
        total(
            samples,
            "heimdall_predict_duration_seconds_count",
            outcome="computed",
            endpoint="predict",
        )
        == n
    )
    assert (
        total(
            samples,
            "flask_http_request_duration_seconds_count",
            url_rule="/api/v1/predict",
            status="200",
        )
        == n
    )
    assert total(samples, "heimdall_cache_misses_total") == n
    assert total(samples, "heimdall_jobs_submitted_total", kind="predict") == n
    assert total(samples, "heimdall_jobs_finished_total", kind="predict", state="succeeded") == n
    assert total(samples, "heimdall_model_requests_total", result="ok") == n
    assert total(samples, "heimdall_requests_in_flight") == 0


def test_worker_counts_every_task_across_children(traffic: Stack) -> None:
    n = traffic.sent
    samples = _wait_count(
        traffic.worker_metrics_url, "heimdall_worker_tasks_total", n, task="heimdall.predict"
    )

    assert (
        total(samples, "heimdall_worker_tasks_total", task="heimdall.predict", state="SUCCESS") == n
    )
    assert total(samples, "heimdall_worker_tasks_total") == n
    assert total(samples, "heimdall_worker_predictions_total", status="ok") == n
    assert total(samples, "heimdall_worker_queue_wait_seconds_count") == n
    assert total(samples, "heimdall_worker_onnx_batch_items_sum") == n
    assert total(samples, "heimdall_worker_onnx_seconds_count") == n
    assert total(samples, "heimdall_worker_feature_seconds_count") == n
    # Two live children, each with a model and a heartbeat of its own.
    assert total(samples, "heimdall_worker_children_ready") == 2
    beats = series(samples, "heimdall_worker_heartbeat_timestamp_seconds")
    assert len({b["pid"] for b in beats}) == 2
    assert total(samples, "heimdall_worker_model_loads_total", outcome="loaded") == 2
    # Read from Redis at scrape time.
    assert total(samples, "heimdall_redis_up", role="broker") == 1
    assert total(samples, "heimdall_queue_length", queue="celery") == 0
    assert total(samples, "heimdall_redis_memory_used_bytes", role="cache") > 0


def test_a_cached_answer_is_counted_as_cached(
    traffic: Stack, request_factory: Callable[..., Any]
) -> None:
    before = _scrape(traffic.api_url + "/metrics")
    body = request_factory(7000)  # the first request of the traffic: in the cache now
    response = requests.post(traffic.api_url + "/api/v1/predict", json=body, timeout=60)
    after = _scrape(traffic.api_url + "/metrics")

    assert response.json()["cached"] is True
    name = "heimdall_predict_duration_seconds_count"
    assert total(after, name, outcome="cached") == total(before, name, outcome="cached") + 1
    assert (
        total(after, "heimdall_cache_hits_total") == total(before, "heimdall_cache_hits_total") + 1
    )


# -- the dashboard asks for what is exported -------------------------------------------------

_PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "avg", "max",
    "min", "count", "deriv", "time", "absent", "and", "or", "unless", "on", "ignoring",
    "group_left", "group_right", "topk", "bottomk", "clamp_min", "clamp_max", "abs",
    "le", "offset", "bool", "vector", "scalar", "label_replace",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression reads."""
    text = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers are not metric names
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        word = match.group(0)
        following = text[match.end() : match.end() + 1]
        if word in _PROMQL_WORDS or following == "(":
            continue
        names.add(word)
    return names


_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _declared_names() -> set[str]:
    """Families Heimdall declares, including labelled ones not incremented yet (no sample)."""
    from app.metrics import ApiMetrics
    from tasks.metrics import WorkerMetrics

    registry = CollectorRegistry()
    ApiMetrics.create(registry)
    WorkerMetrics.create(registry)
    return {family.name for family in registry.collect()}


def test_metric_names_parser() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, url_rule) "
        "(rate(flask_http_request_duration_seconds_bucket"
        '{job="heimdall-api", url_rule=~"/api/v1/predict.*"}[$__rate_interval]))) / '
        "heimdall:cache_hit_ratio:rate5m"
    )
    assert metric_names(expr) == {
        "flask_http_request_duration_seconds_bucket",
        "heimdall:cache_hit_ratio:rate5m",
    }


def test_every_dashboard_query_names_an_exported_metric(traffic: Stack) -> None:
    api = _scrape(traffic.api_url + "/metrics")
    worker = _scrape(traffic.worker_metrics_url)
    exported = {_base(name) for name, _ in (*api, *worker)} | _declared_names()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "heimdall.rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "heimdall.json").read_text())

    unknown: list[str] = []
    panels = [p for p in dashboard["panels"] if p.get("targets")]
    assert panels
    for panel in panels:
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                if name.startswith("flower_") or name in {"up"}:
                    continue  # Flower's own metrics, and Prometheus's
                if _base(name) not in exported and name not in recorded:
                    unknown.append(f"{panel['title']}: {name}")
    assert not unknown, unknown

"""Prometheus metrics of the API: per-route HTTP metrics plus Heimdall's own.

Under gunicorn every worker process counts on its own, so the exporter runs in
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set and
wiped by deploy/gunicorn.conf.py) and ``/metrics`` on any worker aggregates
them all. Without that variable (tests, ``flask run``) each app gets a private
registry, so several apps can live in one process.

The per-request figures (latency by outcome, in-flight, jobs, batch sizes,
traffic per model version) are taken in request hooks from what the views left
in ``g.log_fields`` (``cached``, ``job_id``, ``items``, ``model_version``) and
from the response status, so the views only say what happened, once, for the
logs and the metrics alike. Every label value is from a closed set (outcome,
endpoint, kind, state) or from the registry's model versions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import signals
from flask import Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from heimdall import contract
from heimdall.lifecycle import PerfEvent

log = logging.getLogger("heimdall.api.metrics")

SENT_AT_HEADER = "heimdall_sent_at"
"""Task message header: epoch seconds when the API published it (the worker's queue wait)."""

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

PREDICT_ENDPOINTS = {
    "api.predict": ("predict", True),
    "api.predict_async": ("predict", False),
    "api.predict_batch": ("batch", True),
    "api.predict_batch_async": ("batch", False),
}
"""Flask endpoint -> (job kind, whether the request waits for the answer)."""

OUTCOMES = ("cached", "computed", "timeout", "error", "fallback")


@dataclass(frozen=True)
class ApiMetrics:
    """Heimdall's own metrics (the HTTP request metrics come from the exporter)."""

    cache_hits: Counter
    cache_misses: Counter
    cache_errors: Counter
    dispatch_timeouts: Counter
    prediction_errors: Counter
    predict_latency: Histogram
    in_flight: Gauge
    jobs_submitted: Counter
    jobs_finished: Counter
    batch_items: Histogram
    model_requests: Counter
    fallbacks: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ApiMetrics:
        """Metrics registered in ``registry``."""
        return cls(
            cache_hits=Counter(
                "heimdall_cache_hits",
                "Prediction cache lookups answered from Redis.",
                registry=registry,
            ),
            cache_misses=Counter(
                "heimdall_cache_misses",
                "Prediction cache lookups that found nothing (including when Redis was down).",
                registry=registry,
            ),
            cache_errors=Counter(
                "heimdall_cache_errors",
                "Redis errors of the prediction cache (each one served as a miss).",
                registry=registry,
            ),
            dispatch_timeouts=Counter(
                "heimdall_dispatch_timeouts",
                "Synchronous requests whose wait for the workers timed out (answered 202).",
                ["endpoint"],
                registry=registry,
            ),
            prediction_errors=Counter(
                "heimdall_prediction_errors",
                "Prediction requests and batch items answered with a problem, by problem type.",
                ["type"],
                registry=registry,
            ),
            predict_latency=Histogram(
                "heimdall_predict_duration_seconds",
                "End-to-end time of synchronous prediction requests in the API, by outcome "
                "(cached, computed, timeout, error, fallback).",
                ["endpoint", "outcome"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            in_flight=Gauge(
                "heimdall_requests_in_flight",
                "HTTP requests being served right now (all API processes).",
                registry=registry,
                multiprocess_mode="livesum",
            ),
            jobs_submitted=Counter(
                "heimdall_jobs_submitted",
                "Jobs handed to the workers, by kind (predict, batch).",
                ["kind"],
                registry=registry,
            ),
            jobs_finished=Counter(
                "heimdall_jobs_finished",
                "Jobs a synchronous request waited for, by kind and how the wait ended "
                "(succeeded, failed, timeout: still running, answered 202).",
                ["kind", "state"],
                registry=registry,
            ),
            batch_items=Histogram(
                "heimdall_batch_items",
                "Items per batch request.",
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            model_requests=Counter(
                "heimdall_model_requests",
                "Prediction requests by the model version that answered (the one the traffic "
                "policy chose when nothing answered) and result (ok, fallback, error).",
                ["model_version", "result"],
                registry=registry,
            ),
            fallbacks=Counter(
                "heimdall_model_fallbacks",
                "Predictions the champion answered because the version the traffic policy "
                "chose could not, by the target chosen.",
                ["target"],
                registry=registry,
            ),
        )


def multiprocess_mode() -> bool:
    """Whether prometheus_client is in multiprocess mode (gunicorn with a metrics dir)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def init_metrics(app: Flask) -> tuple[PrometheusMetrics, ApiMetrics]:
    """Attach the exporter (``/metrics``, per-route latency/count), create and hook ours."""
    common = {
        "group_by": "url_rule",
        "default_labels": {"service": "heimdall-api"},
        "excluded_paths": ["^/metrics$"],
    }
    exporter: PrometheusMetrics
    if multiprocess_mode():
        # Values live in files in the multiproc dir; /metrics reads them all, so the
        # counters only need a registry that is never exported on its own.
        exporter = GunicornInternalPrometheusMetrics(app, **common)
        counters = ApiMetrics.create(CollectorRegistry())
    else:
        registry = CollectorRegistry()
        exporter = PrometheusMetrics(app, registry=registry, **common)
        counters = ApiMetrics.create(registry)
    exporter.info("heimdall_api_info", "Heimdall Inference API", version=_package_version())
    _install_hooks(app, counters)
    return exporter, counters


def request_outcome(status: int, cached: bool, fallback: bool) -> str:
    """The outcome label of one synchronous prediction request."""
    if status >= 400:
        return "error"
    if status == 202:
        return "timeout"
    if fallback:
        return "fallback"
    return "cached" if cached else "computed"


def _install_hooks(app: Flask, metrics: ApiMetrics) -> None:
    @app.before_request
    def _enter() -> None:
        if request.endpoint == "prometheus_metrics":
            return  # a scrape would always see itself
        metrics.in_flight.inc()
        g.metrics_started = time.perf_counter()

    @app.teardown_request
    def _leave(exc: BaseException | None = None) -> None:
        if g.pop("metrics_started", None) is not None:
            metrics.in_flight.dec()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("metrics_started")
        kind_wait = PREDICT_ENDPOINTS.get(request.endpoint or "")
        if started is None or kind_wait is None:
            return response
        kind, waits = kind_wait
        fields: dict[str, Any] = g.get("log_fields") or {}
        status = response.status_code
        job_id = fields.get("job_id")
        items = fields.get("items")
        if kind == "batch" and isinstance(items, int):
            metrics.batch_items.observe(items)
        if job_id:
            metrics.jobs_submitted.labels(kind=kind).inc()
        fallback = bool(g.get("fallback"))
        result = "error" if status >= 400 else "fallback" if fallback else "ok"
        version = str(fields.get("model_version") or "none")
        metrics.model_requests.labels(model_version=version, result=result).inc()
        if fallback:
            metrics.fallbacks.labels(target=str(fields.get("target") or "none")).inc()
        elapsed_s = time.perf_counter() - started
        _count_per_version(kind, waits, status, fields, fallback, elapsed_s)
        if not waits:
            return response
        outcome = request_outcome(status, bool(fields.get("cached")), fallback)
        endpoint = request.endpoint.removeprefix("api.") if request.endpoint else "unknown"
        metrics.predict_latency.labels(endpoint=endpoint, outcome=outcome).observe(elapsed_s)
        if job_id:
            state = {"timeout": "timeout", "error": "failed"}.get(outcome, "succeeded")
            metrics.jobs_finished.labels(kind=kind, state=state).inc()
        return response


def _count_per_version(
    kind: str, waits: bool, status: int, fields: dict[str, Any], fallback: bool, elapsed_s: float
) -> None:
    """Add this request to the live counters of the version(s) that answered it.

    A batch counts each answered item; a sync predict answered 200 also
    counts its latency. The counters are summed in the process and written
    by :class:`LiveCounters` at most once a second, so a cache hit still
    costs one Redis round trip.
    """
    events: list[PerfEvent] | None = g.get("perf_events")
    if events is None:
        version = fields.get("model_version")
        if version is None or kind == "batch":
            return
        events = [
            PerfEvent(
                version=str(version),
                cached=bool(fields.get("cached")),
                error=status >= 400,
                fallback=fallback,
                latency_ms=elapsed_s * 1000.0 if waits and status == 200 else None,
            )
        ]
    from app.services import EXTENSION

    svc = current_app.extensions.get(EXTENSION)
    if svc is not None and events:
        svc.live.add(events)


class LiveCounters:
    """Per-version live counters summed in this process, flushed to Redis every ``interval_s``.

    The flush is one pipeline of HINCRBY / HINCRBYFLOAT into
    ``perf_key(name, version)`` (the state Redis), read by
    ``GET /api/v1/model/performance``. A Redis error keeps the sums for the
    next flush; a process that stops loses at most its last interval.
    """

    def __init__(self, client: redis.Redis, model_name: str, interval_s: float = 1.0) -> None:
        self._client = client
        self._name = model_name
        self._interval_s = interval_s
        self._pending: dict[str, dict[str, float]] = {}
        self._next_flush = time.monotonic() + interval_s
        self._lock = threading.Lock()

    def add(self, events: list[PerfEvent]) -> None:
        """Count ``events``; flush when the interval has passed."""
        with self._lock:
            for event in events:
                sums = self._pending.setdefault(event.version, {})
                for field, amount in event.increments().items():
                    sums[field] = sums.get(field, 0) + amount
            due = time.monotonic() >= self._next_flush
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the pending sums now (errors logged; the sums are kept for the next try)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._next_flush = time.monotonic() + self._interval_s
        if not pending:
            return
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for version, sums in pending.items():
                    key = contract.perf_key(self._name, version)
                    for field, amount in sums.items():
                        if isinstance(amount, int):
                            pipe.hincrby(key, field, amount)
                        else:
                            pipe.hincrbyfloat(key, field, amount)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.debug("live figures not written", extra={"error": f"{type(exc).__name__}: {exc}"})
            with self._lock:
                for version, sums in pending.items():
                    mine = self._pending.setdefault(version, {})
                    for field, amount in sums.items():
                        mine[field] = mine.get(field, 0) + amount


@signals.before_task_publish.connect
def _stamp_sent_at(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Stamp every task the API publishes, so the worker can measure its queue wait."""
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("heimdall-inference")
    except PackageNotFoundError:
        return "unknown"

"""Prometheus metrics of the API: per-route HTTP metrics plus Heimdall's own counters.

Under gunicorn every worker process counts on its own, so the exporter runs in
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set and
wiped by deploy/gunicorn.conf.py) and ``/metrics`` on any worker aggregates
them all. Without that variable (tests, ``flask run``) each app gets a private
registry, so several apps can live in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flask import Flask
from prometheus_client import CollectorRegistry, Counter
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics


@dataclass(frozen=True)
class ApiMetrics:
    """Heimdall's counters (the HTTP request metrics come from the exporter)."""

    cache_hits: Counter
    cache_misses: Counter
    cache_errors: Counter
    dispatch_timeouts: Counter
    prediction_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ApiMetrics:
        """Counters registered in ``registry``."""
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
        )


def multiprocess_mode() -> bool:
    """Whether prometheus_client is in multiprocess mode (gunicorn with a metrics dir)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def init_metrics(app: Flask) -> tuple[PrometheusMetrics, ApiMetrics]:
    """Attach the exporter (``/metrics``, per-route latency/count) and create the counters."""
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
    return exporter, counters


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("heimdall-inference")
    except PackageNotFoundError:
        return "unknown"

"""Prometheus metrics of the worker, counted by the prefork children themselves.

Why prometheus_client's multiprocess mode and not a Celery exporter: the
figures that matter (feature time, ONNX time, items per ONNX run, model loads,
per-version answers) exist only inside the children that hold the onnxruntime
sessions; an event-based exporter (Flower, celery-exporter) only sees task
events, and the maintained ones need a separate process per broker. Flower's
``/metrics`` stays for task events.

How: when ``HEIMDALL_WORKER_METRICS_PORT`` is set, the worker's main process
(``worker_init``, before the pool forks) points ``PROMETHEUS_MULTIPROC_DIR`` at
an emptied folder of its own under ``var/``, switches prometheus_client to
multiprocess values and creates the metrics; every child then writes its own
files there, and the main process serves their sum on
``http://<bind>:<port>/metrics`` (``worker_ready``) together with figures read
from Redis at scrape time (queue length, Redis memory). A child that exits
normally has its live gauges removed (``worker_process_shutdown``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import signals
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from heimdall.config import Settings, get_settings
from heimdall.errors import HeimdallError
from tasks import model

log = logging.getLogger("heimdall.worker.metrics")

SENT_AT_HEADER = "heimdall_sent_at"
"""Same header as app.metrics.SENT_AT_HEADER (the API stamps it when publishing)."""

HEARTBEAT_S = 5.0
"""How often each child refreshes its heartbeat gauge, seconds."""

STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class WorkerMetrics:
    """What the pool children count."""

    tasks: Counter
    task_duration: Histogram
    queue_wait: Histogram
    feature_seconds: Histogram
    onnx_seconds: Histogram
    onnx_items: Histogram
    items: Counter
    model_loads: Counter
    model_loaded: Gauge
    heartbeat: Gauge
    fallbacks: Counter
    shadows: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        """Metrics registered in ``registry`` (never exported itself in multiprocess mode)."""
        return cls(
            tasks=Counter(
                "heimdall_worker_tasks",
                "Tasks run by the pool children, by task name and final state.",
                ["task", "state"],
                registry=registry,
            ),
            task_duration=Histogram(
                "heimdall_worker_task_duration_seconds",
                "Run time of a task in a pool child, by task name.",
                ["task"],
                buckets=WAIT_BUCKETS_S,
                registry=registry,
            ),
            queue_wait=Histogram(
                "heimdall_worker_queue_wait_seconds",
                "Time from the API publishing a task to a child starting it, by task name.",
                ["task"],
                buckets=WAIT_BUCKETS_S,
                registry=registry,
            ),
            feature_seconds=Histogram(
                "heimdall_worker_feature_seconds",
                "Time to compute the features of one ONNX run's requests (STFT, mel, norm).",
                buckets=STAGE_BUCKETS_S,
                registry=registry,
            ),
            onnx_seconds=Histogram(
                "heimdall_worker_onnx_seconds",
                "Time of one onnxruntime run.",
                buckets=STAGE_BUCKETS_S,
                registry=registry,
            ),
            onnx_items=Histogram(
                "heimdall_worker_onnx_batch_items",
                "Requests localized per onnxruntime run.",
                buckets=ITEM_BUCKETS,
                registry=registry,
            ),
            items=Counter(
                "heimdall_worker_predictions",
                "Prediction items answered by the children, by model version and status.",
                ["model_version", "status"],
                registry=registry,
            ),
            model_loads=Counter(
                "heimdall_worker_model_loads",
                "Model loads by pool children (each start or reload), by outcome and version.",
                ["outcome", "model_version"],
                registry=registry,
            ),
            model_loaded=Gauge(
                "heimdall_worker_children_ready",
                "Live pool children holding a loaded model.",
                registry=registry,
                multiprocess_mode="livesum",
            ),
            heartbeat=Gauge(
                "heimdall_worker_heartbeat_timestamp_seconds",
                "Last heartbeat of each live pool child, epoch seconds (label pid).",
                registry=registry,
                multiprocess_mode="liveall",
            ),
            fallbacks=Counter(
                "heimdall_worker_fallbacks",
                "Items the champion answered because the chosen version could not, by reason "
                "(not_loaded, error, card_mismatch).",
                ["reason"],
                registry=registry,
            ),
            shadows=Counter(
                "heimdall_worker_shadow_predictions",
                "Shadow copies of requests computed and recorded, by model version and status.",
                ["model_version", "status"],
                registry=registry,
            ),
        )


@dataclass
class _State:
    metrics: WorkerMetrics | None = None
    directory: Path | None = None
    version: str = "none"


_state = _State()
_started: dict[str, float] = {}
"""task id -> perf_counter at task_prerun, in this child."""


def metrics_dir(settings: Settings, hostname: str) -> Path:
    """The multiprocess folder of the worker named ``hostname``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", hostname) or "worker"
    return (settings.var_dir / "prometheus-worker" / safe).resolve()


def enable(settings: Settings, hostname: str) -> WorkerMetrics:
    """Switch this (main, not yet forked) process to multiprocess metrics; create them.

    The folder is emptied first: files of a previous run would be counted again.
    """
    directory = metrics_dir(settings, hostname)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # prometheus_client chose its value class at import; metrics created from here
    # on write per-process files in the folder above.
    values.ValueClass = values.MultiProcessValue()
    _state.directory = directory
    _state.metrics = WorkerMetrics.create(CollectorRegistry())
    # Creating an unlabelled gauge gives this main process a value file of its own;
    # only the children's count (a main-process heartbeat of 0 would look dead).
    mark_process_dead(os.getpid(), str(directory))
    return _state.metrics


def exposition_registry(directory: Path, settings: Settings, queues: Sequence[str]) -> Any:
    """What the worker endpoint serves: the children's sum plus Redis figures."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    registry.register(RedisCollector(settings, queues))
    return registry


class RedisCollector:
    """Queue length and Redis memory, read at scrape time (1 s timeouts)."""

    def __init__(self, settings: Settings, queues: Sequence[str]) -> None:
        self.queues = list(queues)
        self.servers = {"broker": settings.broker_url, "cache": settings.redis_url}

    def _client(self, url: str) -> redis.Redis:
        return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def collect(self) -> Iterable[Metric]:
        """Yield the gauges (a Redis that does not answer reports up 0 and nothing else)."""
        up = GaugeMetricFamily("heimdall_redis_up", "Redis answered this scrape.", labels=["role"])
        used = GaugeMetricFamily(
            "heimdall_redis_memory_used_bytes", "Redis used_memory.", labels=["role"]
        )
        limit = GaugeMetricFamily(
            "heimdall_redis_memory_max_bytes", "Redis maxmemory (0: no limit).", labels=["role"]
        )
        queue = GaugeMetricFamily(
            "heimdall_queue_length", "Messages waiting in a broker queue.", labels=["queue"]
        )
        for role, url in self.servers.items():
            if not url.startswith(("redis://", "rediss://", "unix://")):
                continue
            client = self._client(url)
            try:
                info = client.info("memory")
                used.add_metric([role], float(info.get("used_memory", 0)))
                limit.add_metric([role], float(info.get("maxmemory", 0)))
                if role == "broker":
                    for name in self.queues:
                        queue.add_metric([name], float(client.llen(name)))
                up.add_metric([role], 1.0)
            except (redis.RedisError, OSError):
                up.add_metric([role], 0.0)
            finally:
                client.close()
        yield from (up, used, limit, queue)


def instrument(localizer: Any, metrics: WorkerMetrics) -> None:
    """Time the feature and ONNX stages of ``localizer`` (an instance, not the class)."""
    features, run = localizer.features, localizer.run

    def timed_features(requests: Sequence[Any]) -> Any:
        with _timer(metrics.feature_seconds):
            return features(requests)

    def timed_run(x: Any, mask: Any) -> Any:
        metrics.onnx_items.observe(len(x))
        with _timer(metrics.onnx_seconds):
            return run(x, mask)

    setattr(localizer, "features", timed_features)  # noqa: B010
    setattr(localizer, "run", timed_run)  # noqa: B010


@contextlib.contextmanager
def _timer(histogram: Histogram) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - started)


def count_fallback(reason: str) -> None:
    """Count one item the champion answered instead of the chosen version."""
    if _state.metrics is not None:
        _state.metrics.fallbacks.labels(reason=reason).inc()


def count_shadow(version: str, status: str) -> None:
    """Count one shadow prediction of ``version`` (``ok`` or ``error``)."""
    if _state.metrics is not None:
        _state.metrics.shadows.labels(model_version=version, status=status).inc()


def _items(retval: Any) -> list[dict[str, Any]]:
    if isinstance(retval, dict) and "status" in retval:
        return [retval]
    if isinstance(retval, list):
        return [r for r in retval if isinstance(r, dict) and "status" in r]
    return []


def _version_of(item: dict[str, Any]) -> str:
    model = (item.get("result") or {}).get("model") or {}
    return str(model.get("version") or _state.version)


# -- signal handlers ------------------------------------------------------------


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    settings = get_settings()
    if settings.worker_metrics_port and _state.metrics is None:
        enable(settings, str(getattr(sender, "hostname", None) or "worker"))


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    from prometheus_client import start_http_server

    settings = get_settings()
    if _state.directory is None:
        return
    app = getattr(sender, "app", None)
    queues = [str(getattr(app.conf, "task_default_queue", "celery"))] if app else ["celery"]
    registry = exposition_registry(_state.directory, settings, queues)
    try:
        start_http_server(
            settings.worker_metrics_port, addr=settings.worker_metrics_bind, registry=registry
        )
    except OSError as exc:
        log.error(
            "worker metrics endpoint not started on port %s: %s", settings.worker_metrics_port, exc
        )
        return
    log.info(
        "worker metrics on http://%s:%d/metrics (children's files in %s)",
        settings.worker_metrics_bind,
        settings.worker_metrics_port,
        _state.directory,
    )


@signals.worker_process_init.connect
def _on_process_init(**kwargs: Any) -> None:
    # Connected after tasks.model's handler (imported above), so this child's
    # model is already loaded, or has failed, here.
    metrics = _state.metrics
    if metrics is None:
        return
    localizer = model.current_localizer()
    if isinstance(localizer, HeimdallError):
        metrics.model_loads.labels(outcome="failed", model_version="none").inc()
        metrics.model_loaded.set(0)
    else:
        _state.version = str(localizer.identity.version)
        metrics.model_loaded.set(1)
    for held in model.held_localizers():
        metrics.model_loads.labels(outcome="loaded", model_version=held.identity.version).inc()
        instrument(held, metrics)
    metrics.heartbeat.set_to_current_time()
    threading.Thread(target=_beat, args=(metrics,), name="heimdall-metrics", daemon=True).start()


def _beat(metrics: WorkerMetrics) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        metrics.heartbeat.set_to_current_time()


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **kwargs: Any) -> None:
    if _state.directory is not None:
        mark_process_dead(pid or os.getpid(), str(_state.directory))


@signals.task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    metrics = _state.metrics
    if metrics is None or not task_id:
        return
    _started[task_id] = time.perf_counter()
    sent_at = getattr(getattr(task, "request", None), SENT_AT_HEADER, None)
    if isinstance(sent_at, int | float):
        wait = max(0.0, time.time() - float(sent_at))
        metrics.queue_wait.labels(task=str(task.name)).observe(wait)


@signals.task_postrun.connect
def _on_postrun(
    task_id: str | None = None,
    task: Any = None,
    retval: Any = None,
    state: str | None = None,
    **kwargs: Any,
) -> None:
    metrics = _state.metrics
    if metrics is None:
        return
    name = str(getattr(task, "name", "unknown"))
    metrics.tasks.labels(task=name, state=str(state or "UNKNOWN")).inc()
    started = _started.pop(task_id, None) if task_id else None
    if started is not None:
        metrics.task_duration.labels(task=name).observe(time.perf_counter() - started)
    if name == "heimdall.collect_batch":
        return  # its items were counted by the chunks
    for item in _items(retval):
        status = "ok" if item.get("status") == "ok" else "error"
        metrics.items.labels(model_version=_version_of(item), status=status).inc()

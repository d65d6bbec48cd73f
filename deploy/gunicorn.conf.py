"""gunicorn settings of the Heimdall API: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

Environment: ``HEIMDALL_API_BIND`` (default 0.0.0.0:8000), ``HEIMDALL_API_WORKERS``
(default 2), ``HEIMDALL_API_THREADS`` (default 64), ``PROMETHEUS_MULTIPROC_DIR``
(default var/prometheus), ``HEIMDALL_API_CONTROL_SOCKET`` (default var/run/gunicorn.ctl,
``off`` disables it), plus the service's own ``HEIMDALL_*`` settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from heimdall.config import get_settings

_settings = get_settings()

# prometheus_client picks its multiprocess value class when it is first
# imported, so the directory must be in the environment before any worker
# imports the app (workers fork from this process and inherit it).
_metrics_dir = Path(
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", str((_settings.var_dir / "prometheus").resolve())
    )
)

bind = os.environ.get("HEIMDALL_API_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("HEIMDALL_API_WORKERS", "2"))
# Sync /predict blocks a thread while it waits for a worker (up to
# predict_timeout_s). A waiting thread costs no CPU, so each process keeps
# enough of them for the 100+ concurrent clients the service is specified
# for: with 8, 84 of 100 connections waited in the listen backlog, and a
# /health probe or a slow client queued behind them.
worker_class = "gthread"
threads = int(os.environ.get("HEIMDALL_API_THREADS", "64"))
# Above the longest wait a view does, so gunicorn never kills a healthy wait.
timeout = int(_settings.predict_timeout_s) + 30
graceful_timeout = int(_settings.predict_timeout_s) + 10
keepalive = 5

# gunicorn >= 25.1 opens a control socket (for gunicornc) at one per-user default
# path ($XDG_RUNTIME_DIR or ~/.gunicorn): every gunicorn of that user on the host
# would fight over it. Each instance gets its own under its var/ instead.
_control_socket = os.environ.get(
    "HEIMDALL_API_CONTROL_SOCKET", str((_settings.var_dir / "run" / "gunicorn.ctl").resolve())
)
if _control_socket.lower() in {"", "off", "none", "false", "0"}:
    control_socket_disable = True
else:
    control_socket = _control_socket
    control_socket_mode = 0o600
if Path("/dev/shm").is_dir():
    # Heartbeat files on tmpfs: a slow disk must not get workers killed.
    worker_tmp_dir = "/dev/shm"

accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
access_log_format = (
    'remote=%(h)s method=%(m)s path="%(U)s" query="%(q)s" status=%(s)s bytes=%(B)s '
    'duration_ms=%(M)s request_id=%({x-request-id}o)s agent="%(a)s"'
)


def on_starting(server: Any) -> None:
    """Start with an empty metrics directory: old workers' files would be counted again."""
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """Mark a dead worker's live gauges as gone (its counters still add up)."""
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


def post_worker_init(worker: Any) -> None:
    """Resolve the served model before the first request reaches this worker.

    The first resolution imports MLflow and reads the registry (2-3 s); doing it
    here keeps that off the first client's latency. A registry that is not
    reachable yet is not fatal: the views retry and answer 503 meanwhile.
    """
    from app.services import services
    from heimdall.errors import HeimdallError

    try:
        services(worker.wsgi).model.current()
    except HeimdallError as exc:
        worker.log.warning("model not resolved at start (will retry per request): %s", exc)

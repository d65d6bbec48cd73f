"""Liveness (``/health``) and readiness (``/ready``) probes.

``/health`` says only that the process answers HTTP. ``/ready`` says the
service can answer a prediction now: the state Redis and the broker answer,
the API resolves a model, and at least one worker process has a model loaded
and a fresh heartbeat. It reads the heartbeat records the pool children
rewrite every few seconds (``heimdall:workers:*``, see tasks/model.py): no
broadcast on the probe path, so a probe costs a few Redis round trips whatever
the workers are doing, and its answer is kept for a second so a storm of
probes costs no more than one.

While the server that runs the app is draining (SIGTERM to gunicorn, see
deploy/gunicorn.conf.py) ``/ready`` answers 503 at once, without asking
Redis, so a load balancer takes the instance out before it stops accepting;
``/health`` stays 200 so nothing restarts it meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify

from app.errors import problem_response
from app.services import Services, services
from heimdall.errors import HeimdallError
from heimdall.heartbeats import live_workers

log = logging.getLogger("heimdall.api.health")

bp = Blueprint("health", __name__)

READY_MEMO_S = 1.0
"""How long one readiness verdict is reused, seconds."""

DRAINING_EXTENSION = "heimdall.draining"
"""Key in ``app.extensions`` of a callable answering whether the server is draining.

The server that runs the app sets it (deploy/gunicorn.conf.py); an app without
it never drains (``flask run``, the tests' in-process client)."""

DRAINING_PROBLEM: dict[str, Any] = {
    "type": "urn:heimdall:problem:draining",
    "title": "Draining",
    "status": 503,
    "detail": "this instance is shutting down: it still answers requests, but send new ones "
    "elsewhere",
    "draining": True,
}
"""The readiness answer while the server drains."""

_memo_lock = threading.Lock()
_memo: dict[int, tuple[float, int, dict[str, Any]]] = {}
"""id(services) -> (monotonic time, status, body) of the last verdict."""


@bp.get("/health")
def health() -> Response:
    """200 while the process is alive; checks no dependency."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    """200 when Redis, the broker, the model and a live loaded worker are there; 503 otherwise.

    503 ``draining`` once the server is shutting down, whatever the rest says.
    """
    if draining():
        return problem_response(DRAINING_PROBLEM)
    svc = services()
    now = time.monotonic()
    with _memo_lock:
        memo = _memo.get(id(svc))
    if memo is None or now - memo[0] > READY_MEMO_S:
        status, body = readiness(svc)
        with _memo_lock:
            _memo[id(svc)] = (time.monotonic(), status, body)
    else:
        _, status, body = memo
    if status != 200:
        return problem_response(body)
    return jsonify(body)


def draining() -> bool:
    """Whether the server running this app is draining (see :data:`DRAINING_EXTENSION`)."""
    is_draining = current_app.extensions.get(DRAINING_EXTENSION)
    return bool(is_draining is not None and is_draining())


def readiness(svc: Services) -> tuple[int, dict[str, Any]]:
    """The readiness verdict: (200, body) or (503, problem document)."""
    checks: dict[str, Any] = {}
    problems: list[str] = []
    workers: list[dict[str, Any]] = []
    try:
        svc.probe_redis.ping()
        checks["redis"] = "ok"
        workers = live_workers(svc.probe_redis, svc.settings.heartbeat_timeout_s)
    except (redis.RedisError, OSError) as exc:
        checks["redis"] = f"error: {type(exc).__name__}: {exc}"
        problems.append("the state Redis (jobs, payloads, heartbeats) does not answer")

    if svc.broker_redis is not None:
        try:
            svc.broker_redis.ping()
            checks["broker"] = "ok"
        except (redis.RedisError, OSError) as exc:
            checks["broker"] = f"error: {type(exc).__name__}: {exc}"
            problems.append("the task broker does not answer")

    try:
        checks["model"] = svc.model.current().identity.to_dict()
    except HeimdallError as exc:
        checks["model"] = None
        problems.append(exc.detail)

    loaded = [c for w in workers for c in w["children"] if c.get("state") == "loaded"]
    versions = sorted(
        {str(c["model"]["version"]) for c in loaded if isinstance(c.get("model"), dict)}
    )
    if not loaded and checks.get("redis") == "ok":
        problems.append(
            "no worker process has a model loaded"
            if workers
            else f"no worker heartbeat in the last {svc.settings.heartbeat_timeout_s:g} s"
        )
    body = {
        **checks,
        "workers": workers,
        "loaded_children": len(loaded),
        "model_versions": versions,
    }
    if problems:
        log.warning("not ready", extra={"reasons": "; ".join(problems)})
        return 503, {
            "type": "urn:heimdall:problem:service-unavailable",
            "title": "Service unavailable",
            "status": 503,
            "detail": "; ".join(problems),
            **body,
        }
    return 200, {"status": "ready", **body}

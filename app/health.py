"""Liveness (``/health``) and readiness (``/ready``) probes.

``/health`` says only that the process answers HTTP. ``/ready`` says the
service can answer a prediction now: Redis answers, the API resolves a model,
and at least one worker child reports a loaded model to the
``heimdall_model_status`` broadcast.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from flask import Blueprint, Response, jsonify
from kombu.exceptions import KombuError

from app.errors import problem_response
from app.services import services
from heimdall.errors import HeimdallError

log = logging.getLogger("heimdall.api.health")

bp = Blueprint("health", __name__)

MODEL_STATUS_COMMAND = "heimdall_model_status"
WORKERS_KEY_PREFIX = "heimdall:workers:"
ANNOUNCE_FRESH_S = 30.0
"""Children refresh their record every 10 s; older than this, they are gone."""


@bp.get("/health")
def health() -> Response:
    """200 while the process is alive; checks no dependency."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    """200 when Redis, the model and a loaded worker child are there; 503 problem otherwise."""
    svc = services()
    checks: dict[str, Any] = {}
    problems: list[str] = []

    try:
        svc.redis.ping()
        checks["redis"] = "ok"
    except (redis.RedisError, OSError) as exc:
        checks["redis"] = f"error: {type(exc).__name__}: {exc}"
        problems.append("Redis (cache, payloads) does not answer")

    try:
        checks["model"] = svc.model.current().identity.to_dict()
    except HeimdallError as exc:
        checks["model"] = None
        problems.append(exc.detail)

    workers: list[dict[str, Any]] = []
    replies: list[dict[str, Any]] = []
    try:
        # A direct PING fails in milliseconds; a broadcast to a dead broker retries for seconds.
        if svc.broker_redis is not None:
            svc.broker_redis.ping()
        # Waiting out the whole timeout for replies (no `limit`) makes kombu's
        # Redis pidbox lose the reply to the next broadcast about one time in
        # three, so /ready flapped. The workers' children announce themselves
        # in Redis: expect that many hosts, and return as soon as they answered.
        expected = _announced_workers(svc.redis)
        replies = svc.celery.control.broadcast(
            MODEL_STATUS_COMMAND,
            reply=True,
            timeout=svc.settings.ready_timeout_s,
            limit=len(expected) or None,
        )
        checks["broker"] = "ok"
    except (KombuError, redis.RedisError, OSError) as exc:
        checks["broker"] = f"error: {type(exc).__name__}: {exc}"
        problems.append("the task broker does not answer")
    for reply in replies or []:
        for hostname, status in reply.items():
            workers.append(_worker_entry(hostname, status))

    loaded = [c for w in workers for c in w["children"] if c.get("state") == "loaded"]
    versions = sorted(
        {str(c["model"]["version"]) for c in loaded if isinstance(c.get("model"), dict)}
    )
    if not loaded and checks.get("broker") == "ok":
        problems.append(
            "no worker child has a model loaded"
            if workers
            else "no worker answered the model-status broadcast"
        )
    body = {
        **checks,
        "workers": workers,
        "loaded_children": len(loaded),
        "model_versions": versions,
    }
    if problems:
        log.warning("not ready", extra={"reasons": "; ".join(problems)})
        return problem_response(
            {
                "type": "urn:heimdall:problem:service-unavailable",
                "title": "Service unavailable",
                "status": 503,
                "detail": "; ".join(problems),
                **body,
            }
        )
    return jsonify({"status": "ready", **body})


def _announced_workers(client: redis.Redis) -> set[str]:
    """Hostnames of workers whose pool children announced themselves recently.

    Each child writes ``heimdall:workers:{hostname}`` field ``{pid}`` with the
    time ``at`` every few seconds (see tasks/model.py) and removes it on exit;
    a record older than ANNOUNCE_FRESH_S is a worker that died without saying so.
    """
    now = time.time()
    hosts = set()
    try:
        for key in client.scan_iter(match=WORKERS_KEY_PREFIX + "*", count=100):
            name = key.decode() if isinstance(key, bytes) else str(key)
            for raw in client.hvals(name):
                try:
                    at = float(json.loads(raw).get("at", 0.0))
                except (ValueError, TypeError, AttributeError):
                    continue
                if now - at < ANNOUNCE_FRESH_S:
                    hosts.add(name.removeprefix(WORKERS_KEY_PREFIX))
                    break
    except (redis.RedisError, OSError):
        return set()
    return hosts


def _worker_entry(hostname: str, status: Any) -> dict[str, Any]:
    """One worker's reply, normalized (a worker without the command replies with an error)."""
    if not isinstance(status, dict):
        return {"hostname": hostname, "model": None, "error": repr(status), "children": []}
    children = [c for c in status.get("children") or [] if isinstance(c, dict)]
    return {
        "hostname": status.get("hostname", hostname),
        "model": status.get("model"),
        "error": status.get("error"),
        "children": children,
    }

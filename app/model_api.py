"""The model lifecycle endpoints (``/api/v1/model/...``, ground truth of a job).

Read-only views (info, versions, performance, the traffic policy) are open;
every state-changing one (traffic, reload, promote, rollback, truth) needs the
admin bearer token (:mod:`app.auth`). The steps live in the domain core
(:mod:`heimdall.traffic`, :mod:`heimdall.lifecycle`); the views read the
request, call them, and render the answer.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any

import redis
from flask import Blueprint, Response, g, jsonify, request

from app.api import json_body
from app.auth import admin
from app.dispatch import is_redis_outage
from app.services import Services, services
from heimdall import contract, lifecycle
from heimdall.cli import reload_outcome
from heimdall.errors import (
    HeimdallError,
    InvalidInput,
    InvalidRequest,
    JobNotFound,
    ModelUnavailable,
    ServiceUnavailable,
)
from heimdall.heartbeats import live_workers
from heimdall.traffic import parse_policy, write_policy

log = logging.getLogger("heimdall.api.model")

bp = Blueprint("model_api", __name__, url_prefix="/api/v1")

_JOB_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")

RELOAD_TIMEOUT_S = 60.0
"""Default wait for the workers' reload replies (each loads and smoke-tests first), seconds."""
MAX_RELOAD_TIMEOUT_S = 300.0
"""Longest ``?timeout=`` a reload call may ask for, seconds."""


class ReloadFailed(HeimdallError):
    """At least one worker refused or failed the reload; the ones that did keep their model."""

    status = 502
    type = "reload-failed"
    title = "Reload failed"


class TruthAlreadyPosted(HeimdallError):
    """Ground truth was already recorded for this job."""

    status = 409
    type = "truth-already-posted"
    title = "Truth already posted"


def _json(body: Any, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


def _redis_down(exc: Exception, what: str) -> ServiceUnavailable:
    log.warning("state store unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
    return ServiceUnavailable(f"the state Redis does not answer; cannot {what}")


def _served(svc: Services) -> list[dict[str, Any]]:
    """Each served target with its resolved version (or why it does not resolve)."""
    served = []
    for target in svc.model.targets:
        view = svc.model.served(target)
        entry: dict[str, Any] = {"target": target, "champion": target == svc.model.champion_target}
        try:
            model = view.current() if view is not None else None
        except ModelUnavailable as exc:
            model, entry["error"] = None, exc.detail
        if model is not None:
            entry.update(model.identity.to_dict())
            entry["serving_since"] = view.since if view is not None else None
        else:
            entry.setdefault("error", "not served")
        served.append(entry)
    return served


# -- traffic -------------------------------------------------------------------------------


@bp.get("/model/traffic")
def get_traffic() -> Response:
    """The traffic policy in force and the targets it may name."""
    svc = services()
    svc.policy.forget()
    policy = svc.policy.current()
    return _json({**policy.to_dict(), "targets": _served(svc)})


@bp.put("/model/traffic")
@admin
def put_traffic() -> Response:
    """Replace the traffic policy: ``{"weights": {target: int}, "shadow": [target]}``."""
    svc = services()
    body = json_body()
    if isinstance(body, dict) and ({"updated_at", "updated_by"} & body.keys()):
        raise InvalidInput("'updated_at' and 'updated_by' are set by the service", field="body")
    policy = parse_policy(
        body, svc.model.targets, updated_at=round(time.time(), 3), updated_by=g.request_id
    )
    try:
        write_policy(svc.redis, policy)
    except (redis.RedisError, OSError) as exc:
        raise _redis_down(exc, "store the traffic policy") from exc
    svc.policy.forget()
    log.info("traffic policy changed", extra={"policy": json.dumps(policy.to_dict())})
    return _json({**policy.to_dict(), "targets": _served(svc)})


# -- reload, promote, rollback -------------------------------------------------------------


def _reload_timeout() -> float:
    raw = request.args.get("timeout")
    if raw is None:
        return RELOAD_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= MAX_RELOAD_TIMEOUT_S:
        raise InvalidRequest(
            f"timeout must be a number of seconds in (0, {MAX_RELOAD_TIMEOUT_S:g}], got {raw!r}",
            field="timeout",
        )
    return value


_WORKER_NAME = re.compile(r"^[A-Za-z0-9@._:-]{1,200}$")


def _reload_destination() -> list[str]:
    """The workers named by ``?worker=`` (repeatable); empty: every live worker."""
    names = request.args.getlist("worker")
    for name in names:
        if not _WORKER_NAME.match(name):
            raise InvalidRequest(
                f"worker must be a worker's node name such as heimdall@host, got {name!r}",
                field="worker",
            )
    return names


def broadcast_reload(
    svc: Services, timeout_s: float, destination: list[str] | None = None
) -> dict[str, Any]:
    """Ask the live workers (or only ``destination``) to reload; the replies and the verdict.

    Returns ``{"ok", "workers": [{hostname, ...reply}], "summary": [line, ...]}``,
    as the CLI gives them. Raises ServiceUnavailable (503) when no worker is
    running or the broker is down.
    """
    try:
        expected = len(live_workers(svc.redis, svc.settings.heartbeat_timeout_s))
    except (redis.RedisError, OSError) as exc:
        raise _redis_down(exc, "count the running workers") from exc
    if not expected:
        raise ServiceUnavailable("no worker is running (no fresh heartbeat): nothing to reload")
    try:
        replies = svc.celery.control.broadcast(
            contract.RELOAD_COMMAND,
            arguments={},
            reply=True,
            timeout=timeout_s,
            destination=destination or None,
            limit=len(destination) if destination else expected,
        )
    except Exception as exc:
        if not is_redis_outage(exc):
            raise
        raise ServiceUnavailable("the task broker does not answer; no reload was sent") from exc
    status, lines = reload_outcome(replies or [])
    workers = [
        {"hostname": hostname, **(reply if isinstance(reply, dict) else {"reply": repr(reply)})}
        for entry in replies or []
        for hostname, reply in entry.items()
    ]
    return {"ok": status == 0, "workers": workers, "summary": lines}


@bp.post("/model/reload")
@admin
def reload_model() -> Response:
    """Make the workers (all, or those named by ``?worker=``) reload their versions.

    200 when every worker replied ok; 502 with each worker's error when any
    refused (those keep serving what they had); 503 when no worker answered.
    """
    svc = services()
    outcome = broadcast_reload(svc, _reload_timeout(), _reload_destination())
    svc.model.forget()
    if outcome["ok"]:
        return _json(outcome)
    if not outcome["workers"]:
        raise ServiceUnavailable(
            "no worker replied to the reload in time; see the workers' logs",
            workers=[],
            summary=outcome["summary"],
        )
    raise ReloadFailed(
        "; ".join(line for line in outcome["summary"] if line.startswith("FAILED")),
        workers=outcome["workers"],
        summary=outcome["summary"],
    )


@bp.post("/model/promote")
@admin
def promote() -> Response:
    """Point the champion alias at ``{"version": "7"}`` (the previous one is kept for rollback).

    Workers follow on the next reload (``POST /api/v1/model/reload``).
    """
    svc = services()
    body = json_body()
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str):
        raise InvalidInput('send {"version": "<registry version>"}', field="version")
    move = lifecycle.promote(svc.settings, version)
    svc.model.forget()
    log.info("champion promoted", extra=move.to_dict())
    return _json({**move.to_dict(), "next": "POST /api/v1/model/reload"})


@bp.post("/model/rollback")
@admin
def rollback() -> Response:
    """Point the champion alias back at ``previous-champion``; workers follow on reload."""
    svc = services()
    move = lifecycle.rollback(svc.settings)
    svc.model.forget()
    log.info("champion rolled back", extra=move.to_dict())
    return _json({**move.to_dict(), "next": "POST /api/v1/model/reload"})


# -- ground truth --------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@bp.post("/jobs/<job_id>/truth")
@admin
def post_truth(job_id: str) -> Response:
    """Score a computed prediction (and its shadows) against the transmitter's real position."""
    if not _JOB_ID.match(job_id):
        raise JobNotFound(f"no job {job_id!r}", field="job_id")
    svc = services()
    truth = lifecycle.check_position(json_body())
    key = contract.scored_key(job_id)
    try:
        stored = {_text(k): _text(v) for k, v in svc.redis.hgetall(key).items()}
        if not stored:
            raise JobNotFound(
                f"no scored prediction for job {job_id!r}: unknown id, older than "
                f"{svc.settings.truth_window_s} s, not computed (answered from the cache) "
                "or not successful",
                field="job_id",
            )
        if not svc.redis.hsetnx(key, "truth_at", repr(time.time())):
            raise TruthAlreadyPosted(f"ground truth was already posted for job {job_id!r}")
        shadows = {
            _text(k): _text(v) for k, v in svc.redis.hgetall(contract.shadow_key(job_id)).items()
        }
    except (redis.RedisError, OSError) as exc:
        raise _redis_down(exc, "read the prediction") from exc

    at = round(time.time(), 3)
    scores = [_score_primary(stored, truth)]
    scores += [_score_shadow(version, raw, truth) for version, raw in sorted(shadows.items())]
    name = svc.settings.model_name
    try:
        with svc.redis.pipeline(transaction=False) as pipe:
            for entry in scores:
                if entry.get("error_km") is None:
                    continue
                list_key = contract.truth_key(name, entry["version"])
                pipe.lpush(list_key, lifecycle.truth_entry(job_id, entry["role"], entry, at))
                pipe.ltrim(list_key, 0, lifecycle.TRUTH_KEEP - 1)
            pipe.execute()
    except (redis.RedisError, OSError) as exc:
        raise _redis_down(exc, "store the scores") from exc
    body = {
        "job_id": job_id,
        "truth": {"latitude": truth[0], "longitude": truth[1]},
        "scores": scores,
    }
    return _json(body)


def _score_primary(stored: dict[str, str], truth: tuple[float, float]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "role": "primary",
        "version": stored.get("version", "unknown"),
        "alias": stored.get("alias") or None,
        "fallback": stored.get("fallback") == "1",
    }
    try:
        scored = lifecycle.score(
            float(stored["latitude"]),
            float(stored["longitude"]),
            json.loads(stored["covariance_m2"]),
            truth,
            json.loads(stored.get("ellipse_k") or "{}"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        return {**entry, "error_km": None, "error": f"stored prediction unreadable: {exc}"}
    return {**entry, **scored}


def _score_shadow(version: str, raw: str, truth: tuple[float, float]) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": "shadow", "version": version}
    try:
        shadow = json.loads(raw)
        model = shadow.get("model") or {}
        entry["alias"] = model.get("alias") if isinstance(model, dict) else None
        if shadow.get("error"):
            return {**entry, "error_km": None, "error": str(shadow["error"])}
        scored = lifecycle.score(
            float(shadow["latitude"]),
            float(shadow["longitude"]),
            shadow["covariance_m2"],
            truth,
            shadow.get("ellipse_k"),
        )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return {**entry, "error_km": None, "error": f"shadow result unreadable: {exc}"}
    return {**entry, **scored}


# -- read-only views -----------------------------------------------------------------------


def _live(svc: Services, version: str) -> dict[str, Any]:
    """Live request figures and accuracy of one version (empty figures when Redis is down)."""
    name = svc.settings.model_name
    try:
        with svc.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(contract.perf_key(name, version))
            pipe.lrange(contract.truth_key(name, version), 0, -1)
            counters, truths = pipe.execute()
    except (redis.RedisError, OSError) as exc:
        return {"error": f"state Redis unavailable: {type(exc).__name__}"}
    return {**lifecycle.summarize(counters), "accuracy": lifecycle.accuracy(truths)}


def _registry_versions(svc: Services) -> tuple[list[dict[str, Any]], str | None]:
    try:
        return lifecycle.registered_versions(svc.settings), None
    except Exception as exc:
        log.warning("registry unreachable", extra={"error": repr(exc)})
        return [], f"the model registry at {svc.settings.tracking_uri} cannot be reached"


def _holders(svc: Services) -> dict[str, list[dict[str, Any]]]:
    """Version -> the worker processes holding it (from their heartbeat records)."""
    try:
        workers = live_workers(svc.redis, svc.settings.heartbeat_timeout_s)
    except (redis.RedisError, OSError):
        return {}
    held: dict[str, list[dict[str, Any]]] = {}
    for worker in workers:
        for child in worker["children"]:
            # Records of workers that hold several versions list them all under
            # "models"; older ones name only their champion under "model".
            models = child.get("models") or ([child["model"]] if child.get("model") else [])
            for identity in models:
                if not isinstance(identity, dict) or not identity.get("version"):
                    continue
                held.setdefault(str(identity["version"]), []).append(
                    {
                        "hostname": worker["hostname"],
                        "pid": child["pid"],
                        "alias": identity.get("alias"),
                        "state": child.get("state"),
                    }
                )
    return held


@bp.get("/model/info")
def model_info() -> Response:
    """The served versions: identity, registry run and dates, card figures, live figures."""
    svc = services()
    svc.live.flush()
    registered, registry_error = _registry_versions(svc)
    by_version = {v["version"]: v for v in registered}
    served = []
    for entry in _served(svc):
        if "version" in entry:
            view = svc.model.served(entry["target"])
            model = view.current() if view is not None else None
            record = by_version.get(entry["version"], {})
            card = model.card if model is not None else None
            entry.update(
                {
                    "run_id": record.get("run_id"),
                    "created_at": record.get("created_at"),
                    "last_reloaded_at": entry.pop("serving_since", None),
                    "offline": {
                        "accuracy": card.accuracy if card else {},
                        "training": card.training if card else {},
                        "stations": list(card.slots) if card else [],
                        "sample_rate_hz": card.features.sample_rate_hz if card else None,
                        "band_mhz": list(card.band_mhz) if card else None,
                    },
                    "live": _live(svc, entry["version"]),
                }
            )
        served.append(entry)
    body = {
        "name": svc.settings.model_name,
        "champion": svc.model.champion_target,
        "served": served,
        "traffic": svc.policy.current().to_dict(),
        "registry_error": registry_error,
    }
    return _json(body)


@bp.get("/model/versions")
def model_versions() -> Response:
    """Registered versions with their aliases, the workers holding each, and the policy."""
    svc = services()
    registered, registry_error = _registry_versions(svc)
    held = _holders(svc)
    served = {e["version"]: e["target"] for e in _served(svc) if "version" in e}
    versions = [
        {**v, "served_as": served.get(v["version"]), "held_by": held.get(v["version"], [])}
        for v in registered
    ]
    body = {
        "name": svc.settings.model_name,
        "versions": versions,
        "traffic": svc.policy.current().to_dict(),
        "registry_error": registry_error,
    }
    return _json(body)


@bp.get("/model/performance")
def model_performance() -> Response:
    """Live figures per version: requests, mean / P95 latency, cache hit rate, errors,
    fallbacks, and accuracy against posted ground truth."""
    svc = services()
    svc.live.flush()  # this process's latest requests count too
    name = svc.settings.model_name
    targets: dict[str, list[str]] = {}
    for entry in _served(svc):
        if "version" in entry:
            targets.setdefault(entry["version"], []).append(entry["target"])
    versions = set(targets)
    try:
        for prefix in (contract.perf_key(name, ""), contract.truth_key(name, "")):
            for key in svc.redis.scan_iter(match=prefix + "*", count=100):
                versions.add(_text(key).removeprefix(prefix))
    except (redis.RedisError, OSError) as exc:
        raise _redis_down(exc, "read the live figures") from exc
    ordered = sorted(versions, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    body = {
        "name": name,
        "versions": [
            {"version": v, "targets": targets.get(v, []), **_live(svc, v)} for v in ordered
        ],
    }
    return _json(body)

"""Version 1 of the prediction API (``/api/v1``): predict, async jobs, batches.

Views validate and hash the request against the served model's card, answer
from the cache when they can, and otherwise dispatch to the workers and wait
(up to ``predict_timeout_s``, or less with ``?timeout=``). A wait that runs out
answers 202 with a job URL; the work goes on and the job can be polled.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from flask import Blueprint, Response, g, jsonify, request, url_for

from app.body import read_body
from app.dispatch import Finished, JobRecord, job_status
from app.errors import RemoteProblem, WorkerFailure, problem_type_slug
from app.model import Choice
from app.services import Services, services
from heimdall import batch
from heimdall.contract import MSG_ALIAS, MSG_VERSION, RESULT_FALLBACK, RESULT_FALLBACK_REASON
from heimdall.errors import (
    HeimdallError,
    InvalidInput,
    InvalidRequest,
    JobNotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from heimdall.iq import DecodedRequest, decode_request
from heimdall.lifecycle import PerfEvent
from heimdall.registry import ResolvedModel
from heimdall.stations import load_network
from heimdall.traffic import MAX_ROUTING_KEY_CHARS, TrafficPolicy

log = logging.getLogger("heimdall.api")

bp = Blueprint("api", __name__, url_prefix="/api/v1")

_JOB_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")

Item = dict[str, Any]


# -- request helpers -----------------------------------------------------------------------


def json_body() -> Any:
    """The request body parsed as JSON (415 if not JSON, 413 if too large, 400 if malformed)."""
    raw = raw_body()
    with parse_slot(raw):
        return parse_json(raw)


PARSE_SLOTS = 1
"""Costly bodies parsed and decoded at once per API process (see :func:`parse_slot`)."""
COSTLY_BODY_VALUES = 20_000
"""JSON values (counted by their commas) from which a body takes a parse slot:
10 000 [I, Q] pairs, a few ms of parsing and decoding."""
_parse_slots = threading.BoundedSemaphore(PARSE_SLOTS)


@contextmanager
def parse_slot(raw: bytes) -> Iterator[None]:
    """Hold one of the process's parse slots while a costly body is parsed and decoded.

    A 1.2 MB body of [[I, Q]] pairs parses into ~30 000 lists, a quarter of
    all the objects an API process holds (~125 000): enough to set off a full
    collection of the cyclic garbage collector about once per body, which
    cost more than the parse itself, and more again while waiting requests
    kept their parsed bodies. The collector is paused while a slot is held;
    the caller drops the parsed body inside the slot, so its lists (which
    hold no cycles) are freed by reference counting.

    Bounding the parses also keeps dozens of threads from parsing at once
    under the GIL, each finishing late, while threads that only need the GIL
    for a moment (sending a task, reading a result) wait behind them. A
    base64 body holds a few values however long it is and takes no slot: the
    commas count a body's values at memchr speed.
    """
    if raw.count(b",") < COSTLY_BODY_VALUES:
        yield
        return
    with _parse_slots:
        collecting = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if collecting:
                gc.enable()


def raw_body() -> bytes:
    """The request body's bytes (415 if not JSON, 413 if too large, 400 if empty)."""
    mimetype = request.mimetype
    if not (mimetype == "application/json" or mimetype.endswith("+json")):
        raise UnsupportedMediaType(
            f"send the body as application/json, not {mimetype or 'no content type'}"
        )
    raw = read_body(request)  # raises 413 past the request's max_content_length
    limit = request.max_content_length
    # A chunked body (no Content-Length) is cut at the limit by the reader;
    # anything left means it was longer: refuse it, never answer a prefix.
    chunked_at_limit = request.content_length is None and limit is not None and len(raw) >= limit
    if chunked_at_limit and request.environ["wsgi.input"].read(1):
        raise PayloadTooLarge(f"the request body is over the {limit}-byte limit")
    if not raw:
        raise InvalidRequest("the request body is empty; a JSON object is expected")
    return raw


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed as JSON (400 if malformed)."""
    try:
        # orjson: several times faster than the stdlib on the float arrays of
        # [[I, Q]] bodies; it refuses NaN/Infinity tokens and integers beyond
        # 64 bits, which are not JSON numbers a client should send anyway.
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc


def wait_budget(settings_timeout_s: float) -> float:
    """Seconds to wait for the workers: ``predict_timeout_s``, lowered by ``?timeout=``."""
    raw = request.args.get("timeout")
    if raw is None:
        return settings_timeout_s
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(
            f"timeout must be a number of seconds >= 0, got {raw!r}", field="timeout"
        )
    return min(value, settings_timeout_s)


def decode(payload: Any, model: ResolvedModel, min_stations: int) -> DecodedRequest:
    """Validate one predict request against the served model's card."""
    card = model.card
    return decode_request(
        payload,
        stations=card.slots,
        band_mhz=card.band_mhz,
        min_stations=min_stations,
    )


def _in_item(exc: HeimdallError, index: int) -> HeimdallError:
    """The same error with its ``field`` located inside ``items[index]``."""
    where = f"items[{index}]" + (f".{exc.field}" if exc.field else "")
    located = type(exc)(exc.detail, field=where, **exc.extra)
    located.__cause__ = exc
    return located


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _accepted(job_id: str, status: str) -> Response:
    url = url_for("api.get_job", job_id=job_id)
    g.log_fields["job_id"] = job_id
    body = {"job_id": job_id, "status": status, "status_url": url, "request_id": g.request_id}
    return _json(body, 202, {"Location": url})


def _timed_out(svc: Services, job_id: str, endpoint: str) -> Response:
    svc.metrics.dispatch_timeouts.labels(endpoint=endpoint).inc()
    state, finished = svc.dispatcher.peek(job_id)
    return _accepted(job_id, job_status(state, finished))


def _count_problem(svc: Services, problem: Mapping[str, Any]) -> None:
    svc.metrics.prediction_errors.labels(type=problem_type_slug(dict(problem))).inc()


# -- outcomes ------------------------------------------------------------------------------


def predict_outcome(finished: Finished, job_id: str) -> dict[str, Any]:
    """The result dict of a finished ``heimdall.predict``; raises its problem otherwise."""
    value = finished.value
    if finished.state == "SUCCESS" and isinstance(value, dict):
        if value.get("status") == "ok" and isinstance(value.get("result"), dict):
            result: dict[str, Any] = value["result"]
            return result
        if value.get("status") == "error" and isinstance(value.get("problem"), dict):
            raise RemoteProblem(value["problem"])
    log.error(
        "prediction task failed",
        extra={"job_id": job_id, "state": finished.state, "error": repr(value)[:500]},
    )
    raise WorkerFailure(f"the worker failed to run job {job_id}; it has been logged")


def _item(status: str, body: Mapping[str, Any], cached: bool) -> Item:
    key = "result" if status == "ok" else "problem"
    return {"status": status, key: dict(body), "cached": cached}


def batch_document(
    raw: Any, *, job_id: str | None, request_id: str | None, elapsed_ms: float | None
) -> dict[str, Any]:
    """The API's batch document from ``collect_batch``'s (items in order, counts)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("items"), list):
        raise WorkerFailure(f"batch job {job_id} returned no item list; it has been logged")
    document = batch.batch_document(
        raw["items"], job_id=job_id, request_id=request_id, elapsed_ms=elapsed_ms
    )
    return dict(document)


def _cache_batch_results(
    svc: Services, document: dict[str, Any], digests: Mapping[str, str]
) -> None:
    fresh = [
        (digests[str(it["index"])], it["result"])
        for it in document["items"]
        if it["status"] == "ok"
        and not it["cached"]
        and str(it["index"]) in digests
        and not it["result"].get(RESULT_FALLBACK)
    ]
    svc.cache.put_many(fresh)


# -- routing -------------------------------------------------------------------------------


ROUTING_KEY = "routing_key"
"""Optional top-level field of a predict request (and of each batch item): the sticky key."""

_ROUTING_KEY_BYTES = b'"routing_key"'


def routing_key(payload: Any, field: str = ROUTING_KEY) -> str | None:
    """The client's ``routing_key`` (a string of 1-200 characters), None when absent."""
    if not isinstance(payload, Mapping):
        return None
    value = payload.get(ROUTING_KEY)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ROUTING_KEY_CHARS:
        raise InvalidRequest(
            f"'routing_key' must be a string of 1 to {MAX_ROUTING_KEY_CHARS} characters",
            field=field,
        )
    return value


def _champion_only(svc: Services, policy: TrafficPolicy) -> Choice | None:
    """The champion as the choice when the policy sends it everything (the fast path)."""
    if policy.sends_all_to(svc.model.champion_target):
        return Choice(svc.model.champion_target, svc.model.current())
    return None


def _note_choice(choice: Choice) -> None:
    g.log_fields["model_version"] = choice.version
    g.log_fields["target"] = choice.target


def answered(result: Mapping[str, Any], choice: Choice | None = None) -> dict[str, Any]:
    """``result`` with its fallback fields, marked as a fallback when ``choice`` had to be.

    A target the API could not resolve was sent by alias only; when the
    champion answered it, the response says so (older workers do not).
    """
    out = dict(result)
    out.setdefault(RESULT_FALLBACK, False)
    out.setdefault(RESULT_FALLBACK_REASON, None)
    if choice is not None and choice.fallback_reason is not None and not out[RESULT_FALLBACK]:
        model = out.get("model")
        if isinstance(model, dict) and str(model.get("version")) == choice.version:
            out[RESULT_FALLBACK] = True
            out[RESULT_FALLBACK_REASON] = choice.fallback_reason
    return out


def _answering_version(result: Mapping[str, Any], default: str) -> str:
    model = result.get("model")
    return str(model.get("version") or default) if isinstance(model, dict) else default


def _send_shadows(
    svc: Services,
    policy: TrafficPolicy,
    choice: Choice,
    decoded: DecodedRequest,
    digest: str,
    job_id: str,
) -> None:
    """Send a copy of a computed request to each shadow target but the chosen one.

    Fire and forget: a shadow that cannot be resolved or sent is logged, never
    fails the client's request.
    """
    routes = []
    for target in policy.shadow:
        if target == choice.target:
            continue
        model = svc.model.resolve(target)
        if model is None:
            log.info("shadow target not resolvable, skipped", extra={"target": target})
            continue
        routes.append({MSG_VERSION: model.identity.version, MSG_ALIAS: target})
    if not routes:
        return
    try:
        jobs = svc.dispatcher.jobs_for(
            [decoded] * len(routes), [digest] * len(routes), g.request_id, routes
        )
        g.log_fields["shadows"] = svc.dispatcher.submit_shadows(jobs, job_id)
    except Exception as exc:
        log.warning(
            "shadow copies not sent",
            extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"},
        )


# -- single prediction ---------------------------------------------------------------------


@bp.post("/predict")
def predict() -> Response:
    """Localize one transmitter; 200 with the result, or 202 with a job when the wait runs out."""
    svc = services()
    raw = raw_body()
    timeout_s = wait_budget(svc.settings.predict_timeout_s)
    policy = svc.policy.current()
    # A repeated body is answered from its bytes' digest, before any parsing
    # or decoding: a hit costs one hash and one GET. A split policy routes by
    # that digest too, unless the body names its own routing key.
    body_digest = hashlib.sha256(raw).hexdigest()
    payload: Any = None
    choice = _champion_only(svc, policy)
    if choice is None:
        key = None
        if _ROUTING_KEY_BYTES in raw:
            payload = parse_json(raw)
            key = routing_key(payload)
        choice = svc.model.choose(key or body_digest, policy)
    _note_choice(choice)
    model = choice.model
    name, version = model.identity.name, model.identity.version
    cacheable = choice.fallback_reason is None
    hit = svc.cache.get_body(name, version, body_digest) if cacheable else None
    if hit is None:
        with parse_slot(raw):
            if payload is None:
                payload = parse_json(raw)
                routing_key(payload)
            decoded = decode(payload, model, svc.settings.min_stations)
            payload = None  # its lists are freed in the slot (see parse_slot)
        digest = decoded.digest()
        if cacheable:
            hit = svc.cache.get(name, version, digest)
            if hit is not None:
                svc.cache.put_body(body_digest, hit)
    g.log_fields["cached"] = hit is not None
    if hit is not None:
        body = answered(hit)
        g.fallback = bool(body[RESULT_FALLBACK])
        return _json({**body, "cached": True, "request_id": g.request_id, "job_id": None})

    # The same input already in flight (another client, a retry): wait for
    # that job's answer instead of computing it twice.
    inflight = (name, version, digest)
    running = svc.dispatcher.in_flight(*inflight) if cacheable else None
    owner = running is None
    if running is None:
        job = svc.dispatcher.jobs_for([decoded], [digest], g.request_id, [choice.message_fields()])[
            0
        ]
        job_id = svc.dispatcher.submit_predict(
            job, request_id=g.request_id, digest=digest, inflight=inflight if cacheable else None
        )
        if policy.shadow:
            _send_shadows(svc, policy, choice, decoded, digest, job_id)
    else:
        job_id = running
    g.log_fields["job_id"] = job_id
    g.log_fields["coalesced"] = not owner
    finished = svc.dispatcher.wait(job_id, timeout_s)
    if finished is None:
        return _timed_out(svc, job_id, "predict")
    result = answered(predict_outcome(finished, job_id), choice)
    g.fallback = bool(result[RESULT_FALLBACK])
    g.log_fields["model_version"] = _answering_version(result, version)
    if owner:
        # A fallback answer is the champion's, not the chosen version's: never
        # cached, so a later request routed the same way tries its version again.
        if not result[RESULT_FALLBACK]:
            svc.cache.put(digest, result, body_digest=body_digest)
        svc.dispatcher.settle(job_id, inflight=inflight if cacheable else None)
    return _json({**result, "cached": False, "request_id": g.request_id, "job_id": job_id})


@bp.post("/predict/async")
def predict_async() -> Response:
    """Queue one prediction; 202 with the job to poll."""
    svc = services()
    raw = raw_body()
    with parse_slot(raw):
        payload = parse_json(raw)
        key = routing_key(payload)
        policy = svc.policy.current()
        choice = _champion_only(svc, policy) or svc.model.choose(
            key or hashlib.sha256(raw).hexdigest(), policy
        )
        _note_choice(choice)
        decoded = decode(payload, choice.model, svc.settings.min_stations)
        del payload  # its lists are freed in the slot (see parse_slot)
    digest = decoded.digest()
    job = svc.dispatcher.jobs_for([decoded], [digest], g.request_id, [choice.message_fields()])[0]
    job_id = svc.dispatcher.submit_predict(job, request_id=g.request_id, digest=digest)
    if policy.shadow:
        _send_shadows(svc, policy, choice, decoded, digest, job_id)
    return _accepted(job_id, "queued")


# -- batches -------------------------------------------------------------------------------


@bp.post("/predict/batch")
def predict_batch() -> Response:
    """Localize many transmitters: cached items at once, the rest as a chord of chunks."""
    return _batch(wait=True)


@bp.post("/predict/batch/async")
def predict_batch_async() -> Response:
    """Queue a batch; 202 with the job (the chord callback) to poll."""
    return _batch(wait=False)


def _decode_item(
    svc: Services, item: Any, index: int, policy: TrafficPolicy, fast: Choice | None
) -> tuple[Choice, DecodedRequest]:
    """Route one batch item (its routing_key, else its input digest) and validate it."""
    key = routing_key(item, field=f"items[{index}].{ROUTING_KEY}")
    if fast is not None:
        return fast, decode(item, fast.model, svc.settings.min_stations)
    if key is not None:
        choice = svc.model.choose(key, policy)
        return choice, decode(item, choice.model, svc.settings.min_stations)
    # No key of its own: routed by its canonical input, read with the champion's
    # card, then checked again against the chosen version's when it differs.
    champion = svc.model.current()
    decoded = decode(item, champion, svc.settings.min_stations)
    choice = svc.model.choose(decoded.digest(), policy)
    if choice.model.card != champion.card:
        decoded = decode(item, choice.model, svc.settings.min_stations)
    return choice, decoded


def _batch(*, wait: bool) -> Response:
    svc = services()
    settings = svc.settings
    # A batch carries many recordings: its own, larger body limit.
    request.max_content_length = settings.max_batch_bytes
    started = time.time()
    payload = json_body()
    timeout_s = wait_budget(settings.predict_timeout_s) if wait else 0.0
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object with 'items'")
    items = payload.get("items")
    if not isinstance(items, list):
        raise InvalidRequest("'items' must be a list of predict requests", field="items")
    continue_on_error = payload.get("continue_on_error", True)
    if not isinstance(continue_on_error, bool):
        raise InvalidRequest("'continue_on_error' must be true or false", field="continue_on_error")
    if len(items) > settings.max_batch_items:
        raise PayloadTooLarge(
            f"the batch has {len(items)} items; at most {settings.max_batch_items} are accepted",
            field="items",
        )
    if not items:
        raise InvalidInput("'items' is empty; send at least one predict request", field="items")

    policy = svc.policy.current()
    fast = _champion_only(svc, policy)
    g.log_fields["model_version"] = svc.model.current().identity.version
    answered_items: dict[int, Item] = {}
    valid: list[tuple[int, DecodedRequest, str, Choice]] = []
    for index, item in enumerate(items):
        try:
            choice, decoded = _decode_item(svc, item, index, policy, fast)
        except HeimdallError as exc:
            located = exc if exc.field and exc.field.startswith("items[") else _in_item(exc, index)
            if not continue_on_error:
                raise located from exc
            answered_items[index] = _item("error", located.to_problem(), False)
            _count_problem(svc, answered_items[index]["problem"])
            continue
        valid.append((index, decoded, decoded.digest(), choice))

    todo = []
    for (index, decoded, digest, choice), hit in zip(valid, _cached_items(svc, valid), strict=True):
        if hit is not None:
            answered_items[index] = _item("ok", answered(hit), True)
        else:
            todo.append((index, decoded, digest, choice))
    g.log_fields["items"] = len(items)
    # One version per chunk: each chunk is one ONNX run of one model (_chunk_positions).
    todo.sort(key=lambda entry: (entry[3].target, entry[0]))
    reasons = {index: choice for index, _, _, choice in todo if choice.fallback_reason}

    if not todo and wait:
        local = {"items": [{"index": i, **answered_items[i]} for i in sorted(answered_items)]}
        elapsed = (time.time() - started) * 1000.0
        document = batch_document(local, job_id=None, request_id=g.request_id, elapsed_ms=elapsed)
        _note_batch(document)
        return _json(document)

    jobs = svc.dispatcher.jobs_for(
        [decoded for _, decoded, _, _ in todo],
        [digest for _, _, digest, _ in todo],
        g.request_id,
        [choice.message_fields() for _, _, _, choice in todo],
    )
    groups = _chunk_positions(
        [choice.target for _, _, _, choice in todo], settings.batch_chunk_size
    )
    chunks = [[jobs[p] for p in group] for group in groups]
    meta = {
        "total": len(items),
        "chunks": [[todo[p][0] for p in group] for group in groups],
        "answered": {str(i): item for i, item in answered_items.items()},
        "request_id": g.request_id,
        "started_at": started,
    }
    job_id = svc.dispatcher.submit_batch(
        chunks,
        meta,
        request_id=g.request_id,
        digests={index: digest for index, _, digest, _ in todo},
    )
    g.log_fields["job_id"] = job_id
    if not wait:
        return _accepted(job_id, "queued")
    finished = svc.dispatcher.wait(job_id, timeout_s)
    if finished is None:
        return _timed_out(svc, job_id, "predict_batch")
    if finished.state != "SUCCESS":
        log.error(
            "batch callback failed",
            extra={"job_id": job_id, "state": finished.state, "error": repr(finished.value)[:500]},
        )
        raise WorkerFailure(f"the workers failed to run batch job {job_id}; it has been logged")
    elapsed = (time.time() - started) * 1000.0
    document = batch_document(
        finished.value, job_id=job_id, request_id=g.request_id, elapsed_ms=elapsed
    )
    for it in document["items"]:
        if it["status"] == "ok":
            it["result"] = answered(it["result"], reasons.get(it["index"]))
    _cache_batch_results(svc, document, {str(i): d for i, _, d, _ in todo})
    svc.dispatcher.settle(job_id)
    for it in document["items"]:
        if it["status"] == "error" and it["index"] not in answered_items:
            _count_problem(svc, it["problem"])
    _note_batch(document)
    return _json(document)


def _chunk_positions(targets: list[str], size: int) -> list[list[int]]:
    """Positions of (target-sorted) jobs cut into chunks of at most ``size``, one target each."""
    groups: list[list[int]] = []
    for position, target in enumerate(targets):
        if not groups or len(groups[-1]) >= size or targets[groups[-1][0]] != target:
            groups.append([])
        groups[-1].append(position)
    return groups


def _cached_items(
    svc: Services, valid: list[tuple[int, DecodedRequest, str, Choice]]
) -> list[dict[str, Any] | None]:
    """Cached results of the routed items, one lookup per version (none for fallbacks)."""
    found: list[dict[str, Any] | None] = [None] * len(valid)
    by_version: dict[tuple[str, str], list[int]] = {}
    for position, (_, _, _, choice) in enumerate(valid):
        if choice.fallback_reason is None:
            identity = choice.model.identity
            by_version.setdefault((identity.name, identity.version), []).append(position)
    for (name, version), positions in by_version.items():
        hits = svc.cache.get_many(name, version, [valid[p][2] for p in positions])
        for position, hit in zip(positions, hits, strict=True):
            found[position] = hit
    return found


def _note_batch(document: Mapping[str, Any]) -> None:
    """Leave each item's answering version for the per-version live figures."""
    events = []
    for it in document["items"]:
        if it["status"] != "ok":
            continue
        result = it["result"]
        events.append(
            PerfEvent(
                version=_answering_version(result, "none"),
                cached=bool(it.get("cached")),
                fallback=bool(result.get(RESULT_FALLBACK)),
            )
        )
    g.perf_events = events


# -- jobs ----------------------------------------------------------------------------------


@bp.get("/stations")
def stations() -> Response:
    """The served model's receivers in slot order, with the calibration in force.

    What a client needs to build a valid request (see docs/iq-input.md): the
    station ids, the sample rate and band, and each station's dBFS -> dBm
    calibration from the operator's network file.
    """
    svc = services()
    model = svc.model.current()
    network = load_network(svc.settings.stations_file)
    entries = []
    for slot in model.card.stations:
        sid = str(slot["id"])
        current = network.get(sid) if sid in network else None
        entries.append(
            {
                "id": sid,
                "name": current.name if current else str(slot.get("name", sid)),
                "latitude": float(slot["latitude"]),
                "longitude": float(slot["longitude"]),
                "altitude_m": float(slot.get("altitude_m", 0.0)),
                "calibration_db": (
                    current.calibration_db if current else float(slot["calibration_db"])
                ),
            }
        )
    body = {
        "model": model.identity.to_dict(),
        "sample_rate_hz": model.card.features.sample_rate_hz,
        "band_mhz": list(model.card.band_mhz),
        "min_stations": svc.settings.min_stations,
        "stations": entries,
    }
    return _json(body)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """State of a job; its result (or problem) once it is done."""
    if not _JOB_ID.match(job_id):
        raise JobNotFound(f"no job {job_id!r}", field="job_id")
    svc = services()
    record: JobRecord | None
    try:
        record = svc.dispatcher.job_record(job_id)
        store_up = True
    except (redis.RedisError, OSError, ValueError):
        record, store_up = None, False
    if record is None and store_up:
        raise JobNotFound(f"no job {job_id!r} (unknown id, or expired)", field="job_id")

    finished = record.finished() if record is not None else None
    if finished is not None:
        state = finished.state
    else:
        state, finished = svc.dispatcher.peek(job_id)
    if record is None:
        # The job store is down; the result backend still knows finished jobs.
        if finished is None:
            raise ServiceUnavailable(f"the job store does not answer; cannot look up {job_id!r}")
        kind = (
            "batch" if isinstance(finished.value, dict) and "items" in finished.value else "predict"
        )
        record = JobRecord(job_id=job_id, kind=kind, created_at=0.0, request_id=None)

    body: dict[str, Any] = {
        "job_id": job_id,
        "kind": record.kind,
        "status": job_status(state, finished),
        "request_id": record.request_id,
        "created_at": record.created_at or None,
    }
    if finished is not None:
        try:
            body["result"] = _job_result(svc, record, finished)
        except HeimdallError as exc:
            body["status"] = "failed"
            body["problem"] = exc.to_problem()
    return _json(body)


def _job_result(svc: Services, record: JobRecord, finished: Finished) -> dict[str, Any]:
    if record.kind == "batch":
        if finished.state != "SUCCESS":
            raise WorkerFailure(f"batch job {record.job_id} failed in the workers")
        done_at = _epoch(finished.date_done)
        elapsed = None
        if record.created_at and done_at is not None:
            elapsed = (done_at - record.created_at) * 1000.0
        document = batch_document(
            finished.value,
            job_id=record.job_id,
            request_id=record.request_id,
            elapsed_ms=elapsed,
        )
        _cache_batch_results(svc, document, record.digests)
        return document
    result = predict_outcome(finished, record.job_id)
    digest = record.digests.get("0")
    if isinstance(digest, str):
        svc.cache.put(digest, result)
    return result


def _epoch(date_done: Any) -> float | None:
    """Celery's ``date_done`` (datetime or ISO text, UTC) or a record's epoch, as epoch seconds."""
    if isinstance(date_done, int | float):
        return float(date_done)
    if isinstance(date_done, str):
        try:
            date_done = datetime.fromisoformat(date_done)
        except ValueError:
            return None
    if not isinstance(date_done, datetime):
        return None
    if date_done.tzinfo is None:
        date_done = date_done.replace(tzinfo=UTC)
    return date_done.timestamp()

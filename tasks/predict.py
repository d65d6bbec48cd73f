"""The prediction tasks, sent by name by the API (names: heimdall/contract.py).

Policy (declared once per task name in ``celeryconfig.task_policy``, applied by
Celery as ``task_annotations``): JSON in and out; ``acks_late`` because each
is a pure function of its arguments (a redelivered message recomputes the same answer, so running it
twice is harmless and losing it is not); a hard ``time_limit`` from the
settings with a soft limit first, so a stuck run still answers a problem;
results stored, because the API (sync wait, job poll, chord) reads every one
of them. Domain errors come back as problem items, never as exceptions; only
unexpected faults raise.

What the base class adds around every run, so nothing is lost and nothing
piles up in Redis:

* it counts the starts of each task; a redelivered task whose result was
  already stored (its child died between storing and acknowledging) answers
  that result, and one that started more than ``max_task_attempts`` times
  (it killed its child each time) answers a 422 problem instead of being
  requeued forever;
* once the result is stored it deletes the task's claim-check payloads and
  its start counter;
* ``heimdall.predict`` and ``heimdall.collect_batch`` write their outcome into
  the job record, so a job's answer does not live only in the result backend;
  a successful ``heimdall.predict`` also writes the compact record ground
  truth is scored against (:func:`heimdall.contract.scored_key`).

``heimdall.shadow`` computes a copy of a request with the version it names
(never falling back), records the answer under
:func:`heimdall.contract.shadow_key` and returns nothing (no result stored).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Task, states
from celery.exceptions import SoftTimeLimitExceeded

from heimdall import contract
from heimdall.config import get_settings
from heimdall.errors import ServiceUnavailable
from tasks import app, jobs, metrics, model

log = logging.getLogger("heimdall.tasks")

_settings = get_settings()


PAYLOAD_PATIENCE_S = 0.5 * _settings.task_time_limit_s
"""How long a task waits for the state Redis to come back before answering 503, seconds."""


def _fetch_payload(key: str) -> bytes | None:
    # A Redis restart takes seconds: wait it out (within the task's time
    # budget) rather than fail a job that would succeed a moment later.
    deadline = time.monotonic() + PAYLOAD_PATIENCE_S
    while True:
        try:
            blob = model.redis_client().get(key)
        except redis.RedisError as exc:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise ServiceUnavailable(f"cannot read the request payload from Redis: {exc}") from exc
        return blob if isinstance(blob, bytes) else None


class PredictionTask(Task):
    """Base of the prediction tasks: their attempt bound and clean-up.

    Their policy (acks, time limits, serializer, results) is declared once, per
    task name, in ``celeryconfig.task_policy`` and set on each task by Celery
    (``task_annotations``).
    """

    job_kind: str | None = None
    """Kind written into the job record with the outcome; None: the task has no record."""

    def begin(self, n_items: int) -> list[jobs.Item] | Any | None:
        """Count this start; the answer to give instead of running, or None to run.

        Returns the result stored by an earlier run of the same task, or one
        problem item per job when the task has started too often.
        """
        task_id = self.request.id
        if not task_id:
            return None
        key = contract.attempts_key(task_id)
        try:
            client = model.redis_client()
            with client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, _settings.payload_ttl_s)
                attempt = int(pipe.execute()[0])
        except redis.RedisError as exc:
            log.warning("attempt of %s not counted: %s", task_id, exc)
            return None
        if attempt == 1:
            return None
        meta = self.backend.get_task_meta(task_id)
        if meta.get("status") == states.SUCCESS:
            log.warning("task %s redelivered after it succeeded: answering its result", task_id)
            return meta.get("result")
        if attempt > _settings.max_task_attempts:
            log.error("task %s started %d times (it kills its worker): refused", task_id, attempt)
            crashed = jobs.CrashedWorker(
                f"this request made the worker process running it die {attempt - 1} times; "
                "it was not tried again (it has been logged)"
            )
            return [jobs.error_item(crashed) for _ in range(n_items)]
        return None

    def record_outcome(self, outcome: Any) -> None:
        """Write the outcome into the job record (before the result backend has it)."""
        if self.job_kind is None or not self.request.id:
            return
        key = contract.job_key(self.request.id)
        try:
            with model.redis_client().pipeline(transaction=False) as pipe:
                pipe.hset(
                    key,
                    mapping={
                        contract.JOB_KIND: self.job_kind,
                        contract.JOB_OUTCOME: json.dumps(outcome, separators=(",", ":")),
                        contract.JOB_FINISHED_AT: repr(time.time()),
                    },
                )
                # Never lengthen a record the API already shortened (sync answers).
                pipe.expire(key, _settings.result_expires_s, nx=True)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("outcome of %s not written to its job record: %s", self.request.id, exc)

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, *rest: Any) -> None:
        """Once the result is stored: delete the payloads and the start counter."""
        first = args[0] if args else None
        job_list = first if isinstance(first, list) else [first]
        keys = [*jobs.payload_keys(job_list), contract.attempts_key(task_id)]
        with contextlib.suppress(redis.RedisError):
            model.redis_client().delete(*keys)


def _answer(task: PredictionTask, job_list: Sequence[Any]) -> list[jobs.Item]:
    instead = task.begin(len(job_list))
    if instead is not None:
        return list(instead) if isinstance(instead, list) else [instead]
    try:
        items = jobs.predict_jobs(
            job_list,
            model.current_served(),
            jobs.memo_fetcher(_fetch_payload),
            min_stations=get_settings().min_stations,
            on_fallback=metrics.count_fallback,
            interrupts=(SoftTimeLimitExceeded,),
        )
    except SoftTimeLimitExceeded:
        late = ServiceUnavailable(
            f"prediction exceeded its time limit ({task.soft_time_limit:g} s)"
        )
        return [jobs.error_item(late) for _ in job_list]
    if any(_payload_gone(item) for item in items):
        earlier = _stored_success(task)
        if earlier is not None:
            return earlier
    return items


def _payload_gone(item: jobs.Item) -> bool:
    return item["status"] == "error" and item["problem"].get("type", "").endswith(
        jobs.PayloadExpired.type
    )


def _stored_success(task: PredictionTask) -> list[jobs.Item] | None:
    """The result another run of this same task already stored, if it succeeded.

    A message can be delivered twice at once: when the broker connection drops,
    kombu puts the unacknowledged messages back, so a second child may start a
    task the first is still running. The first stores its result, then deletes
    the payload; the second then finds no payload. Its 410 must not replace the
    stored answer.
    """
    if not task.request.id:
        return None
    try:
        meta = task.backend.get_task_meta(task.request.id)
    except Exception as exc:  # the backend is the result store: any failure means "unknown"
        log.warning("cannot read the stored result of %s: %s", task.request.id, exc)
        return None
    if meta.get("status") != states.SUCCESS:
        return None
    log.warning("task %s ran twice at once; answering the first run's result", task.request.id)
    result = meta.get("result")
    return list(result) if isinstance(result, list) else [result]


class _PredictTask(PredictionTask):
    job_kind = "predict"


class _CollectTask(PredictionTask):
    job_kind = "batch"


@app.task(name=contract.PREDICT_TASK, base=_PredictTask, bind=True)
def predict(self: PredictionTask, job: contract.JobMessage) -> jobs.Item:
    """Localize one request: ``{"status": "ok", "result"}`` or ``{"status": "error", ...}``."""
    item = _answer(self, [job])[0]
    self.record_outcome(item)
    if item["status"] == "ok" and self.request.id:
        _record_scored(self.request.id, item["result"])
    return item


def covariance_m2(result: dict[str, Any]) -> list[list[float]]:
    """``[[ee, en], [ne, nn]]`` east/north covariance of a result, m²."""
    u = result["uncertainty"]
    sx, sy, cxy = float(u["sigma_x_m"]), float(u["sigma_y_m"]), float(u["covariance_xy_m2"])
    return [[sx * sx, cxy], [cxy, sy * sy]]


def ellipse_k(result: dict[str, Any]) -> dict[str, float]:
    """``{"0.68": k, "0.95": k}``: the k the result drew each ellipse with."""
    return {
        f"{float(e['confidence']):g}": float(e["scale_k"])
        for e in result["uncertainty"]["ellipses"]
        if "scale_k" in e
    }


def _record_scored(job_id: str, result: dict[str, Any]) -> None:
    """Write what ground truth posted later is scored against (kept ``truth_window_s``)."""
    identity = result.get("model") or {}
    key = contract.scored_key(job_id)
    try:
        with model.redis_client().pipeline(transaction=False) as pipe:
            pipe.hset(
                key,
                mapping={
                    "version": str(identity.get("version")),
                    "alias": str(identity.get("alias")),
                    "latitude": repr(float(result["position"]["latitude"])),
                    "longitude": repr(float(result["position"]["longitude"])),
                    "covariance_m2": json.dumps(covariance_m2(result)),
                    "ellipse_k": json.dumps(ellipse_k(result)),
                    "fallback": "1" if result.get(contract.RESULT_FALLBACK) else "0",
                    "at": repr(time.time()),
                },
            )
            pipe.expire(key, _settings.truth_window_s)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("prediction of %s not recorded for scoring: %s", job_id, exc)


@app.task(name=contract.CHUNK_TASK, base=PredictionTask, bind=True)
def predict_chunk(self: PredictionTask, job_list: list[contract.JobMessage]) -> list[jobs.Item]:
    """Localize several requests in one ONNX run; one answer per job, in order."""
    if not isinstance(job_list, list):
        job_list = [job_list]
    return _answer(self, job_list)


@app.task(name=contract.COLLECT_TASK, base=_CollectTask, bind=True)
def collect_batch(
    self: PredictionTask, chunk_results: list[list[jobs.Item]], meta: contract.BatchMeta
) -> contract.BatchDocument:
    """Chord callback: the batch document, every item back in request order.

    See :func:`tasks.jobs.assemble_batch` for ``meta`` and the document.
    """
    document = jobs.assemble_batch(chunk_results, meta)
    self.record_outcome(document)
    return document


# Nobody reads a shadow's result (it is recorded under shadow_key): its policy
# in celeryconfig.task_policy has ignore_result.
@app.task(name=contract.SHADOW_TASK, base=PredictionTask, bind=True)
def shadow(self: PredictionTask, job: dict[str, Any], primary_job_id: str) -> None:
    """Localize a copy of a request with ``job["version"]`` and record it beside the primary.

    ``HSET shadow_key(primary_job_id) <version> {"latitude", "longitude",
    "covariance_m2", "ellipse_k", "model", "error", "inference_time_ms"}``, kept
    ``truth_window_s``. No fallback: a version this worker does not hold is
    recorded as an error.
    """
    if self.begin(1) is not None:
        return  # started too often (it kills its worker), or already recorded
    if not isinstance(job, dict):
        job = {}
    version = str(job.get(contract.MSG_VERSION))
    localizer = model.current_served().exact(job)
    # The version is chosen already: the job is answered by it or not at all.
    bare = {k: v for k, v in job.items() if k not in (contract.MSG_VERSION, contract.MSG_ALIAS)}
    try:
        (item,) = jobs.predict_jobs(
            [bare],
            localizer,
            jobs.memo_fetcher(_fetch_payload),
            min_stations=get_settings().min_stations,
            interrupts=(SoftTimeLimitExceeded,),
        )
    except SoftTimeLimitExceeded:
        item = jobs.error_item(ServiceUnavailable("shadow prediction exceeded its time limit"))
    except Exception as exc:  # a shadow must never hurt: record the failure, do not raise
        log.exception("shadow prediction of %s with version %s failed", primary_job_id, version)
        item = jobs.error_item(ServiceUnavailable(f"{type(exc).__name__}: {exc}"))
    result = item["result"] if item["status"] == "ok" else None
    problem = item["problem"] if item["status"] == "error" else {}
    record = {
        "latitude": result["position"]["latitude"] if result else None,
        "longitude": result["position"]["longitude"] if result else None,
        "covariance_m2": covariance_m2(result) if result else None,
        "ellipse_k": ellipse_k(result) if result else None,
        "model": result["model"] if result else None,
        "error": None if result else str(problem.get("detail") or "failed"),
        "inference_time_ms": result["inference_time_ms"] if result else None,
    }
    metrics.count_shadow(version, "ok" if result else "error")
    key = contract.shadow_key(primary_job_id)
    try:
        with model.redis_client().pipeline(transaction=False) as pipe:
            pipe.hset(key, version, json.dumps(record, separators=(",", ":")))
            pipe.expire(key, _settings.truth_window_s)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("shadow answer of %s not recorded: %s", primary_job_id, exc)

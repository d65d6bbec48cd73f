"""The prediction tasks, sent by name by the API.

Policy, the same for the three tasks: JSON in and out; ``acks_late`` because
each is a pure function of its arguments (a redelivered message recomputes the
same answer, so running it twice is harmless and losing it is not); a hard
``time_limit`` from the settings with a soft limit first, so a stuck run still
answers a problem; results stored, because the API (sync wait, job poll, chord)
reads every one of them. Domain errors come back as problem items, never as
exceptions; only unexpected faults raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from heimdall.config import get_settings
from heimdall.errors import ServiceUnavailable
from tasks import app, jobs, model

_settings = get_settings()
_POLICY: dict[str, Any] = {
    "acks_late": True,
    "time_limit": _settings.task_time_limit_s,
    "soft_time_limit": max(1.0, 0.8 * _settings.task_time_limit_s),
    "serializer": "json",
    "ignore_result": False,
}


def _fetch_payload(key: str) -> bytes | None:
    try:
        blob = model.redis_client().get(key)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"cannot read the request payload from Redis: {exc}") from exc
    return blob if isinstance(blob, bytes) else None


def _answer(job_list: Sequence[Any]) -> list[jobs.Item]:
    try:
        return jobs.predict_jobs(
            job_list,
            model.current_localizer(),
            jobs.memo_fetcher(_fetch_payload),
            min_stations=get_settings().min_stations,
        )
    except SoftTimeLimitExceeded:
        late = ServiceUnavailable(
            f"prediction exceeded its time limit ({_POLICY['soft_time_limit']:g} s)"
        )
        return [jobs.error_item(late) for _ in job_list]


@app.task(name="heimdall.predict", **_POLICY)
def predict(job: dict[str, Any]) -> jobs.Item:
    """Localize one request: ``{"status": "ok", "result"}`` or ``{"status": "error", ...}``."""
    return _answer([job])[0]


@app.task(name="heimdall.predict_chunk", **_POLICY)
def predict_chunk(job_list: list[dict[str, Any]]) -> list[jobs.Item]:
    """Localize several requests in one ONNX run; one answer per job, in order."""
    if not isinstance(job_list, list):
        job_list = [job_list]
    return _answer(job_list)


@app.task(name="heimdall.collect_batch", **_POLICY)
def collect_batch(chunk_results: list[list[jobs.Item]], meta: dict[str, Any]) -> dict[str, Any]:
    """Chord callback: the batch document, every item back in request order.

    See :func:`tasks.jobs.assemble_batch` for ``meta`` and the document.
    """
    return jobs.assemble_batch(chunk_results, meta)

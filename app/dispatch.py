"""Handing work to the Celery workers: claim-check payloads, tasks by name, waits, job records.

The API never imports the worker code. It stores each decoded request in Redis
under its digest (``heimdall:payload:{sha256}``) and sends only the key, sends
``heimdall.predict`` / a chord of ``heimdall.predict_chunk`` + ``heimdall.collect_batch``
by name, and records every job it dispatched (``heimdall:job:{task_id}``) so
``GET /api/v1/jobs/<id>`` can tell an unknown id from a queued one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, chord, group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import KombuError

from heimdall.config import Settings
from heimdall.errors import ServiceUnavailable
from heimdall.iq import DecodedRequest

log = logging.getLogger("heimdall.api.dispatch")

PREDICT_TASK = "heimdall.predict"
CHUNK_TASK = "heimdall.predict_chunk"
COLLECT_TASK = "heimdall.collect_batch"

_BROKER_ERRORS: tuple[type[BaseException], ...] = (KombuError, redis.RedisError, OSError)
"""What publishing or waiting raises when Redis (broker or result backend) is down."""

_MAYBE_OUTAGE: tuple[type[BaseException], ...] = (*_BROKER_ERRORS, RuntimeError)
"""Caught around Celery calls, then sorted by :func:`is_redis_outage` (others re-raised)."""

_RUNNING_STATES = frozenset({"STARTED", "RETRY"})


def payload_key(digest: str) -> str:
    """``heimdall:payload:{sha256}``: the claim-check key of a decoded request."""
    return f"heimdall:payload:{digest}"


def job_key(job_id: str) -> str:
    """``heimdall:job:{task_id}``: the record of a dispatched job."""
    return f"heimdall:job:{job_id}"


def new_job_id() -> str:
    """A fresh Celery task id."""
    return str(uuid.uuid4())


BACKEND_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0.0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
"""Reconnects to the result backend while a client waits. Celery's default (20 retries,
1 s apart) would hold a request ~20 s when Redis is down; the API answers 503 instead."""


def make_celery(settings: Settings) -> Celery:
    """The API's Celery client: same ``celeryconfig`` as the worker, URLs from ``settings``."""
    celery = Celery("heimdall-api", set_as_current=False)
    celery.config_from_object("celeryconfig")
    transport_options = dict(celery.conf.get("result_backend_transport_options") or {})
    transport_options["retry_policy"] = BACKEND_RETRY_POLICY
    # Celery lets CELERY_BROKER_URL / CELERY_RESULT_BACKEND in the environment win
    # over broker_url / result_backend; the settings this app was given must win
    # (they come from the same variables in production, not always in tests).
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_read_url=settings.broker_url,
        broker_write_url=settings.broker_url,
        result_backend=settings.result_backend,
        result_backend_transport_options=transport_options,
    )
    celery.backend_cls = settings.result_backend
    return celery


def is_redis_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the broker or result backend is unreachable.

    Celery's Redis result consumer gives up reconnecting with a bare
    ``RuntimeError`` chained to the connection error, so the cause counts too.
    """
    if isinstance(exc, _BROKER_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and isinstance(exc.__cause__, _BROKER_ERRORS)


@dataclass(frozen=True)
class Finished:
    """A task that reached a final state within the wait."""

    state: str
    value: Any
    date_done: Any = None


@dataclass
class JobRecord:
    """What the API wrote when it dispatched a job."""

    job_id: str
    kind: str
    created_at: float
    request_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, job_id: str, raw: bytes | str) -> JobRecord:
        """Parse the stored record."""
        data = json.loads(raw)
        return cls(
            job_id=job_id,
            kind=str(data.get("kind", "predict")),
            created_at=float(data.get("created_at", 0.0)),
            request_id=data.get("request_id"),
            extra={k: v for k, v in data.items() if k not in {"kind", "created_at", "request_id"}},
        )


class Dispatcher:
    """Publishes prediction work and waits for it."""

    def __init__(self, settings: Settings, celery: Celery, client: redis.Redis) -> None:
        self.settings = settings
        self.celery = celery
        self.redis = client

    # -- payloads ---------------------------------------------------------------------------

    def jobs_for(
        self, requests: Sequence[DecodedRequest], digests: Sequence[str], request_id: str
    ) -> list[dict[str, Any]]:
        """Job messages for ``requests``: claim-checked in Redis, inline base64 if that fails."""
        blobs = [r.to_bytes() for r in requests]
        stored = False
        if blobs:
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for digest, blob in zip(digests, blobs, strict=True):
                        pipe.set(payload_key(digest), blob, ex=self.settings.result_expires_s)
                    pipe.execute()
                stored = True
            except (redis.RedisError, OSError) as exc:
                log.warning(
                    "payload store unavailable, sending payloads inline",
                    extra={"request_id": request_id, "error": f"{type(exc).__name__}: {exc}"},
                )
        jobs = []
        for digest, blob in zip(digests, blobs, strict=True):
            if stored:
                jobs.append({"payload_key": payload_key(digest), "payload_b64": None})
            else:
                jobs.append({"payload_key": None, "payload_b64": base64.b64encode(blob).decode()})
            jobs[-1]["request_id"] = request_id
        return jobs

    # -- job records ------------------------------------------------------------------------

    def _record(self, job_id: str, kind: str, request_id: str, **extra: Any) -> None:
        record = {"kind": kind, "created_at": time.time(), "request_id": request_id, **extra}
        try:
            self.redis.set(job_key(job_id), json.dumps(record), ex=self.settings.result_expires_s)
        except (redis.RedisError, OSError) as exc:
            # The job still runs and a sync caller still gets its answer; only a
            # later poll has to fall back to the result backend.
            log.warning(
                "job record not written",
                extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"},
            )

    def _forget(self, job_id: str) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self.redis.delete(job_key(job_id))

    def job_record(self, job_id: str) -> JobRecord | None:
        """The record of a dispatched job; None when unknown (raises on Redis errors)."""
        raw = self.redis.get(job_key(job_id))
        if raw is None:
            return None
        return JobRecord.from_json(job_id, raw)

    # -- publishing -------------------------------------------------------------------------

    def submit_predict(self, job: dict[str, Any], *, request_id: str, digest: str) -> str:
        """Send ``heimdall.predict``; returns the job (task) id. 503 when the broker is down."""
        job_id = new_job_id()
        self._record(job_id, "predict", request_id, digest=digest)
        with self._publishing(job_id):
            self.celery.send_task(PREDICT_TASK, args=[job], task_id=job_id)
        return job_id

    def submit_batch(
        self,
        chunks: Sequence[Sequence[dict[str, Any]]],
        meta: dict[str, Any],
        *,
        request_id: str,
        digests: dict[int, str],
    ) -> str:
        """Send chord(group(predict_chunk...), collect_batch(meta)); returns the callback id.

        With no chunk to run (everything cached or invalid) only ``collect_batch``
        is sent, so an async client still gets a job with the assembled document.
        """
        job_id = new_job_id()
        self._record(job_id, "batch", request_id, digests={str(i): d for i, d in digests.items()})
        with self._publishing(job_id):
            if chunks:
                header = group(
                    [self.celery.signature(CHUNK_TASK, args=[list(chunk)]) for chunk in chunks],
                    app=self.celery,
                )
                body = self.celery.signature(COLLECT_TASK, args=[meta])
                chord(header, body, app=self.celery).apply_async(task_id=job_id)
            else:
                self.celery.send_task(COLLECT_TASK, args=[[], meta], task_id=job_id)
        return job_id

    @contextlib.contextmanager
    def _publishing(self, job_id: str) -> Iterator[None]:
        """Publish inside this: a broker outage drops the job record and becomes a 503."""
        try:
            yield
        except _MAYBE_OUTAGE as exc:
            if not is_redis_outage(exc):
                raise
            self._forget(job_id)
            raise _broker_down(exc) from exc

    # -- waiting and state ------------------------------------------------------------------

    def wait(self, job_id: str, timeout_s: float) -> Finished | None:
        """Wait up to ``timeout_s`` for the job; None when it is still queued or running."""
        result = AsyncResult(job_id, app=self.celery)
        try:
            if timeout_s <= 0:
                return self._finished(result)
            result.get(timeout=timeout_s, propagate=False, interval=0.01)
        except CeleryTimeoutError:
            return None
        except _MAYBE_OUTAGE as exc:
            if not is_redis_outage(exc):
                raise
            raise ServiceUnavailable(
                f"the result backend did not answer while waiting for job {job_id}"
            ) from exc
        return self._finished(result)

    def peek(self, job_id: str) -> tuple[str, Finished | None]:
        """The job's Celery state now, and its outcome when final (no waiting)."""
        result = AsyncResult(job_id, app=self.celery)
        try:
            state = result.state
            return state, self._finished(result)
        except _MAYBE_OUTAGE as exc:
            if not is_redis_outage(exc):
                raise
            raise ServiceUnavailable("the result backend does not answer") from exc

    @staticmethod
    def _finished(result: AsyncResult) -> Finished | None:
        state = result.state
        if state not in ("SUCCESS", "FAILURE", "REVOKED"):
            return None
        return Finished(state=state, value=result.result, date_done=result.date_done)


def job_status(state: str, finished: Finished | None) -> str:
    """Celery state (+ outcome) -> queued | running | succeeded | failed."""
    if finished is None:
        return "running" if state in _RUNNING_STATES else "queued"
    if finished.state != "SUCCESS":
        return "failed"
    value = finished.value
    if isinstance(value, dict) and value.get("status") == "error":
        return "failed"
    return "succeeded"


def _broker_down(exc: BaseException) -> ServiceUnavailable:
    log.error("task broker unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
    return ServiceUnavailable(
        "the task broker does not answer; the request was not queued, try again later"
    )

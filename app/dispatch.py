"""Handing work to the Celery workers: claim-check payloads, tasks by name, waits, job records.

The API never imports the worker code. It stores each decoded request in the
state Redis under a key of its own (``heimdall:payload:{sha256}:{nonce}``, deleted
by the worker once the task is done, with a TTL for the orphans) and sends only
the key, sends ``heimdall.predict`` / a chord of ``heimdall.predict_chunk`` +
``heimdall.collect_batch`` by name, and records every job it dispatched
(``heimdall:job:{task_id}``, a hash the worker completes with the outcome) so
``GET /api/v1/jobs/<id>`` can tell an unknown id from a queued one and answer
even when the result backend lost the result. Names and keys: heimdall/contract.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, chord, group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import KombuError

from celeryconfig import make_app
from heimdall import contract
from heimdall.config import Settings
from heimdall.contract import CHUNK_TASK, COLLECT_TASK, PREDICT_TASK, job_key, new_job_id
from heimdall.errors import ServiceUnavailable
from heimdall.iq import DecodedRequest

log = logging.getLogger("heimdall.api.dispatch")

_BROKER_ERRORS: tuple[type[BaseException], ...] = (KombuError, redis.RedisError, OSError)
"""What publishing or waiting raises when Redis (broker or result backend) is down."""

_MAYBE_OUTAGE: tuple[type[BaseException], ...] = (*_BROKER_ERRORS, RuntimeError)
"""Caught around Celery calls, then sorted by :func:`is_redis_outage` (others re-raised)."""

_RUNNING_STATES = frozenset({"STARTED", "RETRY"})


def make_celery(settings: Settings) -> Celery:
    """The API's Celery client: the worker's configuration from ``settings``, client side."""
    return make_app("heimdall-api", settings)


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


class JobRecord(contract.JobRecord):
    """A job's record (:class:`heimdall.contract.JobRecord`), as the API reads its outcome."""

    def finished(self) -> Finished | None:
        """The outcome as a finished task, None while the worker has not recorded one."""
        if self.outcome is None:
            return None
        return Finished(state="SUCCESS", value=self.outcome, date_done=self.finished_at)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Dispatcher:
    """Publishes prediction work and waits for it."""

    def __init__(self, settings: Settings, celery: Celery, client: redis.Redis) -> None:
        self.settings = settings
        self.celery = celery
        self.redis = client

    # -- payloads ---------------------------------------------------------------------------

    def jobs_for(
        self,
        requests: Sequence[DecodedRequest],
        digests: Sequence[str],
        request_id: str,
        routes: Sequence[Mapping[str, str]] | None = None,
    ) -> list[dict[str, Any]]:
        """Job messages for ``requests``: claim-checked in Redis, inline base64 if that fails.

        ``routes`` gives each job the version the traffic policy chose
        (``{MSG_VERSION, MSG_ALIAS}``, see :meth:`app.model.Choice.message_fields`);
        without it the workers answer with their champion.
        """
        blobs = [r.to_bytes() for r in requests]
        keys = [contract.payload_key(digest) for digest in digests]
        stored = False
        if blobs:
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for key, blob in zip(keys, blobs, strict=True):
                        pipe.set(key, blob, ex=self.settings.payload_ttl_s)
                    pipe.execute()
                stored = True
            except (redis.RedisError, OSError) as exc:
                log.warning(
                    "payload store unavailable, sending payloads inline",
                    extra={"request_id": request_id, "error": f"{type(exc).__name__}: {exc}"},
                )
        jobs = []
        for key, blob in zip(keys, blobs, strict=True):
            if stored:
                jobs.append({"payload_key": key, "payload_b64": None})
            else:
                jobs.append({"payload_key": None, "payload_b64": base64.b64encode(blob).decode()})
            jobs[-1][contract.MSG_REQUEST_ID] = request_id
        for job, route in zip(jobs, routes or (), strict=False):
            job.update(route)
        return jobs

    # -- job records ------------------------------------------------------------------------

    def _record(self, job_id: str, kind: str, request_id: str, digests: dict[str, str]) -> bool:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                self._record_into(pipe, job_id, kind, request_id, digests)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # The job still runs and a sync caller still gets its answer; the
            # record is tried again once the publish went through.
            log.warning(
                "job record not written",
                extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"},
            )
            return False
        return True

    def _record_into(
        self, pipe: Any, job_id: str, kind: str, request_id: str, digests: dict[str, str]
    ) -> None:
        pipe.hset(
            job_key(job_id),
            mapping={
                contract.JOB_KIND: kind,
                contract.JOB_CREATED_AT: repr(time.time()),
                contract.JOB_REQUEST_ID: request_id,
                contract.JOB_DIGESTS: json.dumps(digests),
            },
        )
        pipe.expire(job_key(job_id), self.settings.result_expires_s)

    def _forget(self, job_id: str, payload_keys: Sequence[str] = ()) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self.redis.delete(job_key(job_id), *payload_keys)

    def job_record(self, job_id: str) -> JobRecord | None:
        """The record of a dispatched job; None when unknown (raises on Redis errors)."""
        raw = self.redis.hgetall(job_key(job_id))
        if not raw:
            return None
        return JobRecord.from_hash(job_id, raw)

    def settle(self, job_id: str, inflight: tuple[str, str, str] | None = None) -> None:
        """Shorten the life of a job whose answer the client already has (sync 200).

        Its record and result stay pollable for ``answered_job_ttl_s``, not for
        the hour a client holding only a job URL gets: at hundreds of requests a
        second that difference is most of Redis's memory. ``inflight`` (model
        name, version, digest) releases the input's in-flight marker.
        """
        ttl = self.settings.answered_job_ttl_s
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.expire(job_key(job_id), ttl)
                if inflight is not None:
                    pipe.delete(contract.inflight_key(*inflight))
                pipe.execute()
            backend = self.celery.backend
            backend.client.expire(backend.get_key_for_task(job_id), ttl)
        except (redis.RedisError, OSError, AttributeError) as exc:
            log.warning(
                "answered job not shortened (it expires later)",
                extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"},
            )

    # -- publishing -------------------------------------------------------------------------

    def in_flight(self, model_name: str, version: str, digest: str) -> str | None:
        """The id of a job already computing this input (another request's), or None."""
        try:
            current = self.redis.get(contract.inflight_key(model_name, version, digest))
        except (redis.RedisError, OSError):
            return None
        return None if current is None else _text(current)

    def submit_predict(
        self,
        job: dict[str, Any],
        *,
        request_id: str,
        digest: str,
        inflight: tuple[str, str, str] | None = None,
    ) -> str:
        """Send ``heimdall.predict``; returns the job (task) id. 503 when the broker is down.

        With ``inflight`` (model name, version, digest) the published job is
        marked as computing that input, for :meth:`in_flight` (set only once
        the message is out, so no marker ever names a job that was not sent).
        """
        job_id = new_job_id()
        recorded = self._record(job_id, "predict", request_id, {"0": digest})
        with self._publishing(job_id, [job]):
            self.celery.send_task(PREDICT_TASK, args=[job], task_id=job_id)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                if not recorded:
                    # Redis came back while the publish retried: the job URL
                    # handed out must know its job.
                    self._record_into(pipe, job_id, "predict", request_id, {"0": digest})
                if inflight is not None:
                    ttl = int(self.settings.predict_timeout_s + self.settings.visibility_timeout_s)
                    pipe.set(contract.inflight_key(*inflight), job_id, nx=True, ex=ttl)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning(
                "job record or in-flight marker not written",
                extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"},
            )
        return job_id

    def submit_shadows(self, jobs: Sequence[dict[str, Any]], primary_job_id: str) -> int:
        """Send each shadow copy (``heimdall.shadow``); fire and forget, never raises.

        Returns how many were sent. A copy that cannot be sent is logged and
        its payload deleted: the client's answer never depends on a shadow.
        """
        sent = 0
        for job in jobs:
            try:
                self.celery.send_task(
                    contract.SHADOW_TASK, args=[job, primary_job_id], ignore_result=True
                )
                sent += 1
            except Exception as exc:
                log.warning(
                    "shadow copy not sent",
                    extra={
                        "job_id": primary_job_id,
                        "version": job.get(contract.MSG_VERSION),
                        "error": f"{type(exc).__name__}: {exc}",
                    },
                )
                if job.get(contract.MSG_PAYLOAD_KEY):
                    self._forget_payloads([job[contract.MSG_PAYLOAD_KEY]])
        return sent

    def _forget_payloads(self, payload_keys: Sequence[str]) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self.redis.delete(*payload_keys)

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
        by_index = {str(i): d for i, d in digests.items()}
        recorded = self._record(job_id, "batch", request_id, by_index)
        with self._publishing(job_id, [job for chunk in chunks for job in chunk]):
            if chunks:
                header = group(
                    [self.celery.signature(CHUNK_TASK, args=[list(chunk)]) for chunk in chunks],
                    app=self.celery,
                )
                body = self.celery.signature(COLLECT_TASK, args=[meta])
                chord(header, body, app=self.celery).apply_async(task_id=job_id)
            else:
                self.celery.send_task(COLLECT_TASK, args=[[], meta], task_id=job_id)
        if not recorded:
            self._record(job_id, "batch", request_id, by_index)
        return job_id

    @contextlib.contextmanager
    def _publishing(self, job_id: str, jobs: Sequence[dict[str, Any]]) -> Iterator[None]:
        """Publish inside this: a broker outage drops the job's record and payloads, then 503."""
        try:
            yield
        except _MAYBE_OUTAGE as exc:
            if not is_redis_outage(exc):
                raise
            self._forget(job_id, [j["payload_key"] for j in jobs if j.get("payload_key")])
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

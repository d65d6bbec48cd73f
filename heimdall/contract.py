"""The conversation between the API and the workers: names, Redis keys, records.

Both sides import this module (the API never imports the worker code), so a
rename on one side fails at import or in a test, not in production. Nothing
here knows Flask or Celery.

Where each key lives (see docs/reliability.md):

* the **state** Redis (``HEIMDALL_REDIS_URL``: persistent, never evicts) holds
  the job records, the claim-check payloads, the task attempt counters, the
  in-flight markers and the workers' heartbeat records, each with a TTL;
* the **cache** Redis (``HEIMDALL_CACHE_REDIS_URL``: may run under
  ``maxmemory`` with an LRU policy) holds only prediction results, by
  canonical input and by raw body bytes.
"""

from __future__ import annotations

import uuid

PREDICT_TASK = "heimdall.predict"
"""One request: ``(job) -> item``."""
CHUNK_TASK = "heimdall.predict_chunk"
"""Several batch items in one ONNX run: ``([job, ...]) -> [item, ...]``."""
COLLECT_TASK = "heimdall.collect_batch"
"""Chord callback: ``([[item, ...], ...], meta) -> batch document``."""
SHADOW_TASK = "heimdall.shadow"
"""A copy of a request for a shadow version: ``(job, primary_job_id) -> None``.

Computed and recorded under :func:`shadow_key` (and in the worker's metrics),
never returned to a client."""

MODEL_STATUS_COMMAND = "heimdall_model_status"
RELOAD_COMMAND = "heimdall_reload_model"

PAYLOAD_PREFIX = "heimdall:payload:"
JOB_PREFIX = "heimdall:job:"
WORKERS_PREFIX = "heimdall:workers:"
ATTEMPTS_PREFIX = "heimdall:attempts:"
PREDICTION_PREFIX = "heimdall:pred:"
BODY_PREFIX = "heimdall:body:"
INFLIGHT_PREFIX = "heimdall:inflight:"
TRAFFIC_KEY = "heimdall:traffic"
"""The traffic policy (JSON, no TTL) every API process routes by; absent: all to the champion."""
SHADOW_PREFIX = "heimdall:shadow:"
SCORED_PREFIX = "heimdall:scored:"
TRUTH_PREFIX = "heimdall:truth:"
PERF_PREFIX = "heimdall:perf:"

# Fields of a job message (what the API sends a prediction task for one request).
MSG_PAYLOAD_KEY, MSG_PAYLOAD_B64, MSG_REQUEST_ID = "payload_key", "payload_b64", "request_id"
MSG_VERSION, MSG_ALIAS = "version", "alias"
"""The registry version the traffic policy chose for this request, and the alias or
explicit version (``"7"``) it was chosen as. Absent (older API): the worker's champion."""

# Fields a worker adds to every prediction result it computes.
RESULT_FALLBACK, RESULT_FALLBACK_REASON = "fallback", "fallback_reason"
"""``fallback: true`` when the chosen version could not answer and the champion did;
``fallback_reason`` then says why (else null)."""

# Fields of a job record (a Redis hash under job_key). The API writes the
# first group when it dispatches; the worker adds the outcome when it is done,
# so a job's answer does not live only in Celery's result backend.
JOB_KIND, JOB_CREATED_AT, JOB_REQUEST_ID, JOB_DIGESTS = (
    "kind",
    "created_at",
    "request_id",
    "digests",
)
JOB_OUTCOME, JOB_FINISHED_AT = "outcome", "finished_at"


def payload_key(digest: str) -> str:
    """``heimdall:payload:{sha256}:{nonce}``: the claim-check of one dispatched request.

    The nonce makes each dispatch own its payload, so a worker can delete it
    when its task is done without taking it from a concurrent identical request.
    """
    return f"{PAYLOAD_PREFIX}{digest}:{uuid.uuid4().hex[:16]}"


def job_key(job_id: str) -> str:
    """``heimdall:job:{task_id}``: the record (hash) of a dispatched job."""
    return f"{JOB_PREFIX}{job_id}"


def workers_key(hostname: str) -> str:
    """``heimdall:workers:{hostname}``: heartbeat record (hash, field per pid) of a worker."""
    return f"{WORKERS_PREFIX}{hostname}"


def attempts_key(task_id: str) -> str:
    """``heimdall:attempts:{task_id}``: how many times a task has started."""
    return f"{ATTEMPTS_PREFIX}{task_id}"


def prediction_key(model_name: str, version: str, digest: str) -> str:
    """``heimdall:pred:{model_name}:{version}:{sha256}``: a cached prediction result."""
    return f"{PREDICTION_PREFIX}{model_name}:{version}:{digest}"


def body_key(model_name: str, version: str, body_sha256: str) -> str:
    """``heimdall:body:{model_name}:{version}:{sha256}``: a cached result by raw body bytes."""
    return f"{BODY_PREFIX}{model_name}:{version}:{body_sha256}"


def inflight_key(model_name: str, version: str, digest: str) -> str:
    """``heimdall:inflight:{model_name}:{version}:{sha256}``: the job computing this input now."""
    return f"{INFLIGHT_PREFIX}{model_name}:{version}:{digest}"


def shadow_key(job_id: str) -> str:
    """``heimdall:shadow:{job_id}``: hash, field = version, value = that shadow version's result.

    Kept ``truth_window_s``, so ground truth posted later also scores the shadows.
    """
    return f"{SHADOW_PREFIX}{job_id}"


def scored_key(job_id: str) -> str:
    """``heimdall:scored:{job_id}``: the compact prediction ground truth is scored against.

    A hash written by the worker with the outcome of ``heimdall.predict``: fields
    ``version``, ``alias``, ``latitude``, ``longitude``, ``covariance_m2`` (JSON
    ``[[ee, en], [ne, nn]]`` in m² east/north), ``fallback``, ``at``; kept
    ``truth_window_s`` (the job record itself may expire within a minute).
    """
    return f"{SCORED_PREFIX}{job_id}"


def truth_key(model_name: str, version: str) -> str:
    """``heimdall:truth:{model_name}:{version}``: scored predictions (JSON list), newest first."""
    return f"{TRUTH_PREFIX}{model_name}:{version}"


def perf_key(model_name: str, version: str) -> str:
    """``heimdall:perf:{model_name}:{version}``: hash of live counters of one version."""
    return f"{PERF_PREFIX}{model_name}:{version}"


def new_job_id() -> str:
    """A fresh job (Celery task) id."""
    return str(uuid.uuid4())

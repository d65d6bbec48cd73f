"""The conversation between the API and the workers: names, Redis keys, records.

Both sides import this module (the API never imports the worker code), so a
rename on one side fails at import or in a test, not in production. Nothing
here knows Flask or Celery.

The message and record types at the end (TypedDicts: plain dicts on the
wire, checked by mypy at both ends) are described in docs/contract.md.

Where each key lives (see docs/reliability.md):

* the **state** Redis (``HEIMDALL_REDIS_URL``: persistent, never evicts) holds
  the job records, the claim-check payloads, the task attempt counters, the
  in-flight markers and the workers' heartbeat records, each with a TTL;
* the **cache** Redis (``HEIMDALL_CACHE_REDIS_URL``: may run under
  ``maxmemory`` with an LRU policy) holds only prediction results, by
  canonical input and by raw body bytes.
"""

# No ``from __future__ import annotations``: TypedDict reads ``NotRequired``
# from evaluated annotations only (3.11), and the keys must be right at run time.
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, Self, TypedDict

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
    ``[[ee, en], [ne, nn]]`` in m² east/north), ``ellipse_k`` (JSON
    ``{"0.68": k, "0.95": k}``, the answer's ellipses' ``scale_k``),
    ``fallback``, ``at``; kept ``truth_window_s`` (the job record itself may
    expire within a minute).
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


# -- what crosses the boundary ---------------------------------------------------------------
# JSON carries every one of these, so they are TypedDicts: the values on the
# wire stay plain dicts, and mypy checks the code that builds and reads them.
# Field names spelt by a constant above must match (tests/unit/test_contract.py).


class JobMessage(TypedDict):
    """What the API sends a prediction task for one request (each batch item too).

    Exactly one of ``payload_key`` (the claim-check, :func:`payload_key`) and
    ``payload_b64`` (the canonical request blob inline, when the state Redis
    could not store it) is set.
    """

    payload_key: str | None
    payload_b64: str | None
    request_id: str
    version: NotRequired[str]
    """Registry version the traffic policy chose; absent: the worker's champion."""
    alias: NotRequired[str]
    """The alias or explicit version (``"7"``) that version was chosen as."""


class IdentityRecord(TypedDict):
    """A served model as records name it (``ModelIdentity.to_dict()``)."""

    name: str
    version: str
    alias: str | None


class OkItem(TypedDict):
    """A localized request: the worker's answer, or the API's cache hit."""

    status: Literal["ok"]
    result: dict[str, Any]
    """The ``Localization`` document of the OpenAPI description."""
    cached: NotRequired[bool]
    """Set by the API: answered from the prediction cache."""


class ErrorItem(TypedDict):
    """A request that failed with a domain error, as its problem document."""

    status: Literal["error"]
    problem: dict[str, Any]
    """``{type, title, status, detail, ...}`` (``HeimdallError.to_problem()``)."""
    cached: NotRequired[bool]


PredictionItem = OkItem | ErrorItem
"""What ``heimdall.predict`` returns, one element of ``heimdall.predict_chunk``'s list."""


class BatchMeta(TypedDict):
    """What the API sends ``heimdall.collect_batch`` besides the chunks' answers."""

    total: int
    """Number of items in the request."""
    chunks: list[list[int]]
    """For each dispatched chunk, in chord header order, the request index of each item."""
    answered: dict[str, PredictionItem]
    """Items answered before dispatch (cache hits, invalid items), by ``str(index)``."""
    request_id: NotRequired[str]
    started_at: NotRequired[float]
    """Epoch seconds the API received the request."""


class BatchItem(TypedDict):
    """One item of a batch document: its request index and its answer."""

    index: int
    status: Literal["ok", "error"]
    result: NotRequired[dict[str, Any]]
    """When ``status`` is ``ok``."""
    problem: NotRequired[dict[str, Any]]
    """When ``status`` is ``error``."""
    cached: bool


class BatchCounts(TypedDict):
    """Outcome counts of a batch; ``succeeded`` includes the cached items."""

    total: int
    succeeded: int
    failed: int
    cached: int


class BatchDocument(TypedDict):
    """A batch's answer: what ``collect_batch`` returns and what the API serves.

    Built only by :func:`heimdall.batch.batch_document`.
    """

    items: list[BatchItem]
    """In request order."""
    counts: BatchCounts
    elapsed_ms: float | None
    """From the request's arrival to the answer; None until the API serves it."""
    request_id: str | None
    job_id: str | None
    """The ``collect_batch`` task id; None when no worker was involved."""


class HeartbeatRecord(TypedDict):
    """One worker process's heartbeat: JSON under :func:`workers_key`, field ``{pid}``."""

    state: str
    """``starting`` | ``loaded`` | ``failed``."""
    model: IdentityRecord | None
    """The champion this process serves; None when it has no model."""
    error: str | None
    """Why it has no model, or why it serves the last verified one instead of the registry's."""
    source: str | None
    """Where the model came from: ``registry`` | ``local-fallback``."""
    loaded_at: float | None
    """Epoch seconds the model was loaded."""
    at: float
    """Epoch seconds of this write; older than ``heartbeat_timeout_s``: the process is gone."""
    models: NotRequired[list[IdentityRecord]]
    """Every version this process holds (champion first)."""
    errors: NotRequired[dict[str, str]]
    """Served targets (alias or version) that failed to load, and why."""


JobOutcome = PredictionItem | BatchDocument
"""What a job's task returned: ``heimdall.predict``'s item or ``collect_batch``'s document."""


@dataclass
class JobRecord:
    """A job as the API dispatched it (hash under :func:`job_key`), with the worker's outcome.

    The API writes ``kind``, ``created_at``, ``request_id`` and ``digests`` when
    it dispatches; the worker adds ``kind``, ``outcome`` and ``finished_at``
    (fields named by the ``JOB_*`` constants).
    """

    job_id: str
    kind: str
    """``predict`` | ``batch``."""
    created_at: float
    """Epoch seconds of the dispatch (0.0: unknown)."""
    request_id: str | None
    digests: dict[str, str] = field(default_factory=dict)
    """Input digest of each dispatched item by ``str(index)`` (``"0"`` for a single prediction)."""
    outcome: JobOutcome | None = None
    """What the task returned, None while not finished."""
    finished_at: float | None = None
    """Epoch seconds the worker wrote the outcome."""

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[Any, Any]) -> Self:
        """Parse the stored hash (bytes or str fields)."""
        data = {_text(k): _text(v) for k, v in raw.items()}
        outcome = data.get(JOB_OUTCOME)
        finished_at = data.get(JOB_FINISHED_AT)
        return cls(
            job_id=job_id,
            kind=data.get(JOB_KIND, "predict"),
            created_at=float(data.get(JOB_CREATED_AT) or 0.0),
            request_id=data.get(JOB_REQUEST_ID) or None,
            digests=json.loads(data.get(JOB_DIGESTS) or "{}"),
            outcome=json.loads(outcome) if outcome else None,
            finished_at=float(finished_at) if finished_at else None,
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

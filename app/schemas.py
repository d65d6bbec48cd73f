"""The HTTP documents of the API, declared once as pydantic models, and its operations.

``app/openapi.py`` generates the OpenAPI document from the :class:`Operation`
lists of a few modules (this one first) and the JSON Schema of the models they
name. The models describe; they do not validate requests in the views:
:mod:`heimdall.iq` does that (fast, with messages that name the station), and
the limits below are taken from its constants so the two cannot disagree
(tests/unit/test_schemas.py checks both on the same bodies). Response models
forbid unknown fields, so a view that adds or drops a field fails the test that
validates real responses against them (tests/integration/test_api.py).

A model's docstring is its component description; its first paragraph is the
description of a response that carries it. ``media_type`` and
``response_headers`` (class variables) say how a response carries it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictFloat
from pydantic.json_schema import SkipJsonSchema

from heimdall.iq import (
    MAX_ABS_SAMPLE,
    MAX_SAMPLE_RATE_HZ,
    MAX_SAMPLES,
    MIN_DURATION_S,
    MIN_SAMPLE_RATE_HZ,
    MIN_SAMPLES,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"
MAX_ROUTING_KEY_CHARS = 200
"""Longest ``routing_key`` a predict request may carry."""

REQUEST_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
JOB_ID_PATTERN = "^[A-Za-z0-9-]{1,64}$"
_B64 = "[A-Za-z0-9+/]"
BASE64_COMPLEX64_PATTERN = f"^(?:{_B64}{{32}})*(?:{_B64}{{11}}=|{_B64}{{22}}==)?$"
"""base64 of a whole number of complex64 samples (8 bytes each): 3 samples are
32 characters, a remainder of 1 or 2 samples ends in ``=`` or ``==``."""


def base64_length(n_bytes: int) -> int:
    """Characters of the padded base64 of ``n_bytes`` bytes."""
    return 4 * -(-n_bytes // 3)


PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "job_id": {
        "description": "A job id as the API returned it; any other id is answered 404.",
        "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
    },
}
"""Schema and description of each ``{name}`` a path may hold (others: any string)."""


# -- how operations are declared ------------------------------------------------------------

QueryParameter = tuple[str, str, str] | tuple[str, str, str, Mapping[str, Any]]
"""``(name, json-type, description)``, optionally with more JSON Schema keywords."""


@dataclass(frozen=True)
class Operation:
    """One HTTP operation as the OpenAPI document describes it."""

    method: str
    """``get``, ``post``, ``put``."""
    path: str
    """OpenAPI path, e.g. ``/api/v1/jobs/{job_id}``."""
    summary: str
    tag: str
    """``predict``, ``batch``, ``jobs``, ``model``, ``operations``."""
    responses: dict[int, type[BaseModel]]
    """Status -> model of the body."""
    request: type[BaseModel] | None = None
    """Model of the JSON request body."""
    query: tuple[QueryParameter, ...] = ()
    admin: bool = False
    """Needs the admin bearer token (401/403 documented)."""
    description: str = ""
    """Longer text; ``{settings.NAME}`` is replaced by that setting's value."""
    operation_id: str = ""
    """Stable id for client generators (default: derived from method and path)."""


# -- field helpers --------------------------------------------------------------------------

Absent = SkipJsonSchema[None]
"""``X | Absent = absent()``: a member that may be left out but is never ``null``."""


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def absent(description: str | None = None, **kwargs: Any) -> Any:
    """A field that a document may leave out (never sends as ``null``)."""
    return Field(default=None, description=description, json_schema_extra=_no_default, **kwargs)


class Document(BaseModel):
    """Base of the documents the API sends: unknown members are errors unless one allows them."""

    model_config = ConfigDict(extra="forbid")
    media_type: ClassVar[str] = "application/json"
    response_headers: ClassVar[Mapping[str, str]] = {}
    """Header -> description, sent with every response carrying this document."""


# -- problems -------------------------------------------------------------------------------


class Problem(Document):
    """RFC 9457 problem details: what went wrong, and where in the request.

    Problems may carry more members (e.g. station, or the readiness checks).
    """

    model_config = ConfigDict(extra="allow")
    media_type: ClassVar[str] = PROBLEM_MEDIA_TYPE

    type: str = Field(examples=["urn:heimdall:problem:invalid-iq"])
    title: str
    status: int = Field(ge=100, le=599)
    detail: str
    instance: str | Absent = absent("URI of this occurrence, when there is one.")
    field: str | Absent = absent("Where in the request, e.g. receivers[2].iq or items[3].")
    request_id: str | Absent = absent("The request's id (the X-Request-ID header).")


# -- predict request ------------------------------------------------------------------------

# Strict numbers and booleans: heimdall.iq and the views refuse true for 1 or "1" for 1.
Sample = Annotated[StrictFloat, Field(ge=-MAX_ABS_SAMPLE, le=MAX_ABS_SAMPLE)]

IQPairs = Annotated[
    list[tuple[Sample, Sample]],
    Field(
        min_length=MIN_SAMPLES,
        max_length=MAX_SAMPLES,
        description="[I, Q] pairs of numbers.",
    ),
]
IQBase64 = Annotated[
    str,
    Field(
        pattern=BASE64_COMPLEX64_PATTERN,
        min_length=base64_length(8 * MIN_SAMPLES),
        max_length=base64_length(8 * MAX_SAMPLES),
        description="base64 of little-endian complex64 (float32 I, float32 Q).",
        json_schema_extra={"contentEncoding": "base64"},
    ),
]


class Receiver(BaseModel):
    """One station's complex-baseband recording (absolute scale, dBFS).

    Each station may appear once per request.
    """

    station: str = Field(description="Receiver id of the served model's network.")
    iq: IQPairs | IQBase64 = Field(
        description=(
            f"{MIN_SAMPLES} to {MAX_SAMPLES} samples, and at least {MIN_DURATION_S * 1e3:g} ms "
            f"at sample_rate_hz; finite, |I| and |Q| at most {MAX_ABS_SAMPLE:g} (full scale "
            "is 1): [I, Q] pairs, or base64 of little-endian complex64 (float32 I, Q)."
        )
    )


class PredictRequest(BaseModel):
    """One localization request. Unknown top-level members are ignored."""

    receivers: list[Receiver] = Field(description="One recording per station.")
    sample_rate_hz: StrictFloat = Field(
        ge=MIN_SAMPLE_RATE_HZ,
        le=MAX_SAMPLE_RATE_HZ,
        description=(
            f"Rate of the recordings, {MIN_SAMPLE_RATE_HZ:.0f} to {MAX_SAMPLE_RATE_HZ:.0f} Hz; "
            "they are band-limited and resampled to the model's rate."
        ),
    )
    frequency_mhz: StrictFloat | Absent = absent(
        "Carrier, MHz; must lie in the model's band (default: its centre)."
    )
    routing_key: str | Absent = absent(
        "Routes this request to a model version by the traffic split: the same key, the "
        "same version (default: the request body's digest).",
        max_length=MAX_ROUTING_KEY_CHARS,
    )


class BatchRequest(BaseModel):
    """Many localization requests, answered in request order."""

    items: list[Any] = Field(
        min_length=1,
        description=(
            "PredictRequest documents. With continue_on_error (the default) any value is "
            "taken and an invalid one becomes that item's problem; without it, the first "
            "invalid item fails the whole request."
        ),
    )
    continue_on_error: StrictBool = Field(
        default=True,
        description=(
            "true: invalid items become per-item problems; false: the first invalid item "
            "fails the whole request (field names items[i])."
        ),
    )


# -- prediction results ---------------------------------------------------------------------


class Position(Document):
    """WGS84 position."""

    latitude: float = Field(description="Degrees north.")
    longitude: float = Field(description="Degrees east.")


class PositionENU(Document):
    """East/north of the network's centroid, m."""

    east: float
    north: float


class Ellipse(Document):
    """A confidence ellipse of the position: ``scale_k`` times the covariance's axes.

    The errors are heavier-tailed than a Gaussian, so ``scale_k`` is the model's
    calibrated value for this confidence, not the chi-square one (docs/model.md).
    """

    confidence: float = Field(examples=[0.68, 0.95])
    semi_major_m: float = Field(description="scale_k times the major-axis standard deviation, m.")
    semi_minor_m: float = Field(description="scale_k times the minor-axis standard deviation, m.")
    orientation_deg: float = Field(description="Major axis, degrees clockwise from north.")
    scale_k: float = Field(
        description="The ellipse is x^T C^-1 x <= scale_k^2, C the east/north covariance "
        "(sigma_x_m, sigma_y_m, covariance_xy_m2)."
    )


class Uncertainty(Document):
    """The position's 2-D uncertainty, east/north."""

    sigma_x_m: float = Field(description="East standard deviation, m.")
    sigma_y_m: float = Field(description="North standard deviation, m.")
    covariance_xy_m2: float = Field(description="East/north covariance, m².")
    rho: float = Field(description="Correlation coefficient.")
    theta_deg: float
    ellipses: list[Ellipse] = Field(
        description="At 68 % and 95 %, each drawn from the covariance with its calibrated k."
    )


class Quality(Document):
    """How far the fix can be trusted (see docs/model.md)."""

    inside_coverage: bool
    fit_residual_db: float
    detected_stations: list[str]
    n_detected: int
    hull_distance_m: float


class GeoJSONGeometry(Document):
    """A GeoJSON geometry (lon/lat order)."""

    type: Literal["Point", "Polygon"]
    coordinates: list[Any]


class GeoJSONFeature(Document):
    """The estimate (a Point) or one confidence ellipse (a Polygon)."""

    type: Literal["Feature"]
    geometry: GeoJSONGeometry
    properties: dict[str, Any]


class GeoJSON(Document):
    """FeatureCollection: the estimate and one polygon per ellipse, for a map."""

    type: Literal["FeatureCollection"]
    features: list[GeoJSONFeature]


class ModelIdentity(Document):
    """Which registered model version answered."""

    name: str
    version: str
    alias: str | None


class Localization(Document):
    """A worker's answer for one request."""

    position: Position
    position_enu_m: PositionENU
    uncertainty: Uncertainty
    geojson: GeoJSON
    quality: Quality | None
    model: ModelIdentity = Field(description="The version that really answered.")
    inference_time_ms: float
    fallback: bool = Field(
        default=False,
        description="true when the version chosen for the request failed and the champion did.",
    )
    fallback_reason: str | None = Field(default=None, description="Why, when fallback is true.")


class PredictResult(Localization):
    """The localization."""

    cached: bool
    request_id: str
    job_id: str | None = Field(description="null when answered from the cache.")


JobStatus = Literal["queued", "running", "succeeded", "failed"]


class JobAccepted(Document):
    """Queued (or still running when the wait ran out); poll status_url."""

    response_headers: ClassVar[Mapping[str, str]] = {"Location": "The job URL (status_url)."}

    job_id: str
    status: JobStatus
    status_url: str = Field(json_schema_extra={"format": "uri-reference"})
    request_id: str


class BatchItem(Document):
    """One item's outcome: a result, or the problem that item had."""

    index: int = Field(ge=0, description="Position in the request's items.")
    status: Literal["ok", "error"]
    result: Localization | Absent = absent("When status is ok.")
    problem: Problem | Absent = absent("When status is error.")
    cached: bool


class BatchCounts(Document):
    """How many items there were, and how they ended."""

    total: int
    succeeded: int
    failed: int
    cached: int


class BatchDocument(Document):
    """One entry per item, in request order."""

    items: list[BatchItem]
    counts: BatchCounts
    elapsed_ms: float | None
    request_id: str | None
    job_id: str | None = Field(description="null when every item came from the cache.")


class Job(Document):
    """The job: queued | running | succeeded (with result) | failed (with problem)."""

    job_id: str
    kind: Literal["predict", "batch"]
    status: JobStatus
    request_id: str | None
    created_at: float | None = Field(description="Epoch seconds.")
    result: Localization | BatchDocument | Absent = absent(
        "When finished: a Localization (predict) or a BatchDocument (batch)."
    )
    problem: Problem | Absent = absent("When failed.")


# -- the network, probes, other documents ---------------------------------------------------


class Station(Document):
    """One receiver."""

    id: str
    name: str
    latitude: float
    longitude: float
    altitude_m: float
    calibration_db: float = Field(description="received dBm = IQ power in dBFS + this.")


class Stations(Document):
    """The receiver network the served model was trained on: what a valid request needs."""

    model: ModelIdentity
    sample_rate_hz: StrictFloat = Field(description="The model's own rate, Hz.")
    band_mhz: tuple[float, float]
    min_stations: int
    stations: list[Station] = Field(description="In the model's slot order.")


class Health(Document):
    """Alive."""

    status: Literal["ok"]


class WorkerProcess(Document):
    """A worker process with a fresh heartbeat (heartbeat records may carry more)."""

    model_config = ConfigDict(extra="allow")

    pid: int
    state: str | None
    model: ModelIdentity | None
    error: str | None
    source: str | None
    age_s: float


class Worker(Document):
    """A worker host and its live processes."""

    model_config = ConfigDict(extra="allow")

    hostname: str
    children: list[WorkerProcess]


class ReadinessChecks(Document):
    """What the readiness probe checked."""

    model_config = ConfigDict(extra="allow")

    redis: str = Field(description="ok, or the error.")
    broker: str | Absent = absent("ok, or the error (when the broker is not the state Redis).")
    model: ModelIdentity | None = Field(description="The model the API resolves.")
    workers: list[Worker]
    loaded_children: int
    model_versions: list[str]


class Ready(ReadinessChecks):
    """Ready: Redis answers, the model resolves, a worker process has it loaded."""

    status: Literal["ready"]


class NotReady(Problem):
    """Not ready; detail says why and the checks show what was found.

    While the instance drains (SIGTERM) it answers at once with ``draining: true``
    and runs no check, so the checks' members are then absent.
    """

    redis: str | Absent = absent("ok, or the error.")
    broker: str | Absent = absent("ok, or the error (when the broker is not the state Redis).")
    model: ModelIdentity | None = Field(None, description="The model the API resolves.")
    workers: list[Worker] | Absent = absent()
    loaded_children: int | Absent = absent()
    model_versions: list[str] | Absent = absent()
    draining: bool | Absent = absent("true while the instance shuts down: send requests elsewhere.")


class PrometheusText(RootModel[str]):
    """Prometheus text exposition format."""

    media_type: ClassVar[str] = "text/plain"
    response_headers: ClassVar[Mapping[str, str]] = {}


class HTMLPage(RootModel[str]):
    """HTML page."""

    media_type: ClassVar[str] = "text/html"
    response_headers: ClassVar[Mapping[str, str]] = {}


class OpenAPIDocument(RootModel[dict[str, Any]]):
    """OpenAPI 3.1 document."""

    media_type: ClassVar[str] = "application/json"
    response_headers: ClassVar[Mapping[str, str]] = {}


# -- what depends on the served model and the settings --------------------------------------


def apply_served_limits(
    schemas: dict[str, Any],
    *,
    stations: tuple[str, ...],
    band_mhz: tuple[float, float] | None,
    min_stations: int,
    max_batch_items: int,
) -> None:
    """Write into generated component ``schemas`` the limits known only when serving.

    The served model's stations and band, and the settings' minimum number of
    stations and batch size: :mod:`heimdall.iq` and the batch view enforce them.
    """
    receiver = schemas["Receiver"]["properties"]
    receiver["station"]["enum"] = list(stations)
    predict = schemas["PredictRequest"]["properties"]
    predict["receivers"]["minItems"] = min_stations
    predict["receivers"]["maxItems"] = len(stations)
    if band_mhz is not None:
        predict["frequency_mhz"]["minimum"], predict["frequency_mhz"]["maximum"] = band_mhz
    schemas["BatchRequest"]["properties"]["items"]["maxItems"] = max_batch_items


# -- the operations -------------------------------------------------------------------------

_CLIENT_ERRORS: dict[int, type[BaseModel]] = {
    400: Problem,
    413: Problem,
    415: Problem,
    422: Problem,
    500: Problem,
    503: Problem,
}
_TIMEOUT: QueryParameter = (
    "timeout",
    "number",
    "Seconds to wait for the workers before answering 202; can only lower the server's "
    "{settings.predict_timeout_s:g} s.",
    {"minimum": 0},
)

OPERATIONS: list[Operation] = [
    Operation(
        "post",
        "/api/v1/predict",
        "Localize a transmitter",
        "predict",
        {200: PredictResult, 202: JobAccepted, **_CLIENT_ERRORS},
        request=PredictRequest,
        query=(_TIMEOUT,),
        operation_id="predict",
        description=(
            "Validates the recordings against the served model, answers from the cache when "
            "the same input was seen by the same model version, otherwise runs it on a worker "
            "and waits up to {settings.predict_timeout_s:g} s (or `timeout`). When the wait "
            "runs out the answer is 202 and the job goes on."
        ),
    ),
    Operation(
        "post",
        "/api/v1/predict/async",
        "Queue a localization",
        "predict",
        {202: JobAccepted, **_CLIENT_ERRORS},
        request=PredictRequest,
        operation_id="predictAsync",
        description="Validates like /predict, then returns a job at once.",
    ),
    Operation(
        "post",
        "/api/v1/predict/batch",
        "Localize many transmitters",
        "batch",
        {200: BatchDocument, 202: JobAccepted, **_CLIENT_ERRORS},
        request=BatchRequest,
        query=(_TIMEOUT,),
        operation_id="predictBatch",
        description=(
            "At most {settings.max_batch_items} items (413 above, 422 when empty). Cached "
            "items are answered from the cache; the rest run in chunks of "
            "{settings.batch_chunk_size} (one model run per chunk). Items come back in "
            "request order."
        ),
    ),
    Operation(
        "post",
        "/api/v1/predict/batch/async",
        "Queue a batch",
        "batch",
        {202: JobAccepted, **_CLIENT_ERRORS},
        request=BatchRequest,
        operation_id="predictBatchAsync",
        description="Validates like /predict/batch, then returns the batch job at once.",
    ),
    Operation(
        "get",
        "/api/v1/stations",
        "The receiver network",
        "predict",
        {200: Stations, 503: Problem},
        operation_id="getStations",
        description=(
            "The served model's stations in slot order with each one's dBFS -> dBm "
            "calibration in force, the sample rate, the band and the minimum number of "
            "stations: what a client needs to build a valid request."
        ),
    ),
    Operation(
        "get",
        "/api/v1/jobs/{job_id}",
        "Poll a job",
        "jobs",
        {200: Job, 404: Problem, 503: Problem},
        operation_id="getJob",
        description=(
            "queued | running | succeeded (with result) | failed (with problem). Jobs are "
            "kept {settings.result_expires_s} s."
        ),
    ),
    Operation(
        "get",
        "/health",
        "Liveness",
        "operations",
        {200: Health},
        operation_id="health",
        description="200 while the process answers; checks no dependency.",
    ),
    Operation(
        "get",
        "/ready",
        "Readiness",
        "operations",
        {200: Ready, 503: NotReady},
        operation_id="ready",
        description=(
            "200 when Redis answers, the API resolves the model and at least one worker "
            "process has it loaded (lists workers and versions); 503 problem with the same "
            "details otherwise."
        ),
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics",
        "operations",
        {200: PrometheusText},
        operation_id="metrics",
        description=(
            "Per-route request counts and latencies, cache hits/misses/errors "
            "(heimdall_cache_*_total), sync waits that ran out "
            "(heimdall_dispatch_timeouts_total) and problems by type "
            "(heimdall_prediction_errors_total)."
        ),
    ),
    Operation(
        "get",
        "/openapi.json",
        "This document",
        "operations",
        {200: OpenAPIDocument},
        operation_id="openapi",
        description="The OpenAPI 3.1 description of the service.",
    ),
    Operation(
        "get",
        "/docs",
        "API reference page",
        "operations",
        {200: HTMLPage},
        operation_id="docs",
        description="This document rendered as HTML.",
    ),
]

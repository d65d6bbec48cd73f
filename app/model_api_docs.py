"""HTTP documents of the model lifecycle endpoints (app/model_api.py), declared once.

Each request and response body is a pydantic model; :data:`OPERATIONS` lists
the operations for the generated OpenAPI document (app/openapi.py collects
them with those of app/schemas.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import Operation, Problem

# -- shared pieces -------------------------------------------------------------------------


class Identity(BaseModel):
    """A registered model version, as named by a target."""

    name: str
    version: str
    alias: str | None = Field(description="the alias or version number it was resolved by")


class Target(BaseModel):
    """A target traffic may go to (the champion alias or an extra served model)."""

    target: str = Field(description="champion, challenger, or a version number")
    champion: bool
    name: str | None = None
    version: str | None = Field(None, description="registry version it resolves to now")
    alias: str | None = None
    serving_since: float | None = Field(None, description="epoch s this API first served it")
    error: str | None = Field(None, description="why it does not resolve (not registered...)")


class TrafficPolicyDoc(BaseModel):
    """The stored traffic policy."""

    weights: dict[str, int] = Field(
        description="target -> non-negative integer weight (sum > 0); sticky per routing key",
        examples=[{"champion": 90, "challenger": 10}],
    )
    shadow: list[str] = Field(
        default_factory=list,
        description="targets that get a copy of each computed request (never returned)",
    )
    updated_at: float | None = Field(None, description="epoch s of the last change")
    updated_by: str | None = Field(None, description="request id (API) or cli:user@host")


# -- traffic -------------------------------------------------------------------------------


class TrafficRequest(BaseModel):
    """``PUT /api/v1/model/traffic``."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, int] = Field(examples=[{"champion": 50, "challenger": 50}])
    shadow: list[str] = Field(default_factory=list, examples=[["challenger"]])


class TrafficResponse(TrafficPolicyDoc):
    """The policy in force and the targets it may name."""

    targets: list[Target]


# -- reload, promote, rollback -------------------------------------------------------------


class WorkerReload(BaseModel):
    """One worker's reply to the reload broadcast."""

    model_config = ConfigDict(extra="allow")

    hostname: str
    ok: bool | None = None
    model: Identity | None = Field(None, description="the champion in force after the reply")
    error: str | None = None


class ReloadResponse(BaseModel):
    """``POST /api/v1/model/reload``: 200 when every worker reloaded."""

    ok: bool
    workers: list[WorkerReload]
    summary: list[str] = Field(description="one line per worker, as `heimdall model reload`")


class ReloadProblem(Problem):
    """502 (a worker refused: it keeps its model) or 503 (no worker answered)."""

    workers: list[WorkerReload] = Field(default_factory=list)
    summary: list[str] = Field(default_factory=list)


class PromoteRequest(BaseModel):
    """``POST /api/v1/model/promote``."""

    version: str = Field(description="registry version number", examples=["7"])


class AliasMoveResponse(BaseModel):
    """What a promotion or rollback did to the champion alias (workers follow on reload)."""

    champion: Identity
    previous_champion: Identity | None = Field(
        description="the version the alias left, now under alias previous-champion"
    )
    changed: bool
    next: str = Field(description="what to do for the workers to follow")


# -- ground truth --------------------------------------------------------------------------


class TruthRequest(BaseModel):
    """``POST /api/v1/jobs/{job_id}/truth``: where the transmitter really was."""

    latitude: float = Field(ge=-90, le=90, examples=[45.07])
    longitude: float = Field(ge=-180, le=180, examples=[7.69])


class TruthPosition(BaseModel):
    """Where the transmitter really was, degrees."""

    latitude: float
    longitude: float


class Score(BaseModel):
    """One version's prediction for the job, scored against the truth."""

    role: Literal["primary", "shadow"]
    version: str
    alias: str | None = None
    fallback: bool | None = Field(None, description="primary only: the champion stood in")
    error_km: float | None = Field(description="distance to the truth; null if not scored")
    mahalanobis2: float | None = None
    inside_68: bool | None = Field(None, description="truth inside the 68 % ellipse")
    inside_95: bool | None = Field(None, description="truth inside the 95 % ellipse")
    error: str | None = Field(None, description="why this version has no score")


class TruthResponse(BaseModel):
    """The scores recorded for the job (once per job)."""

    job_id: str
    truth: TruthPosition
    scores: list[Score]


# -- read-only views -----------------------------------------------------------------------


class Latency(BaseModel):
    """Latency of answered synchronous predictions, ms."""

    timed: int
    mean: float | None
    p95: float | None = Field(description="upper bound of the histogram bucket holding P95")


class LiveAccuracy(BaseModel):
    """Accuracy against posted ground truth (last 10 000 per version)."""

    n: int
    median_error_km: float | None
    coverage_68: float | None
    coverage_95: float | None


class LiveFigures(BaseModel):
    """Live figures of one version, counted by the API."""

    requests: int
    cached: int
    cache_hit_rate: float | None
    errors: int
    fallbacks: int
    latency_ms: Latency
    accuracy: LiveAccuracy


class Offline(BaseModel):
    """What the model card says of the version."""

    accuracy: dict[str, object]
    training: dict[str, object]
    stations: list[str]
    sample_rate_hz: float | None
    band_mhz: list[float] | None


class ServedVersion(Target):
    """A served target with its registry record, card and live figures."""

    run_id: str | None = None
    created_at: float | None = Field(None, description="epoch s the version was registered")
    last_reloaded_at: float | None = Field(None, description="epoch s this API switched to it")
    offline: Offline | None = None
    live: LiveFigures | None = None


class ModelInfoResponse(BaseModel):
    """``GET /api/v1/model/info``."""

    name: str
    champion: str
    served: list[ServedVersion]
    traffic: TrafficPolicyDoc
    registry_error: str | None


class Holder(BaseModel):
    """A worker process holding a version."""

    hostname: str
    pid: int
    alias: str | None
    state: str | None


class RegisteredVersion(BaseModel):
    """A registered version, its aliases and who holds it."""

    version: str
    aliases: list[str]
    run_id: str | None
    created_at: float | None
    onnx_sha256: str | None
    served_as: str | None = Field(description="the target this API resolves to it, if any")
    held_by: list[Holder]


class ModelVersionsResponse(BaseModel):
    """``GET /api/v1/model/versions``."""

    name: str
    versions: list[RegisteredVersion]
    traffic: TrafficPolicyDoc
    registry_error: str | None


class VersionPerformance(LiveFigures):
    """Live figures of one version and the targets that resolve to it."""

    version: str
    targets: list[str]


class ModelPerformanceResponse(BaseModel):
    """``GET /api/v1/model/performance``."""

    name: str
    versions: list[VersionPerformance]


OPERATIONS: list[Operation] = [
    Operation(
        "get",
        "/api/v1/model/traffic",
        "The traffic policy in force and the targets it may name",
        "model",
        {200: TrafficResponse},
    ),
    Operation(
        "put",
        "/api/v1/model/traffic",
        "Replace the traffic policy (weighted split, shadow targets)",
        "model",
        {200: TrafficResponse, 400: Problem, 415: Problem, 422: Problem, 503: Problem},
        request=TrafficRequest,
        admin=True,
    ),
    Operation(
        "post",
        "/api/v1/model/reload",
        "Make every worker re-resolve, test and reload its versions",
        "model",
        {200: ReloadResponse, 400: Problem, 502: ReloadProblem, 503: ReloadProblem},
        query=(
            ("timeout", "number", "seconds to wait for the replies (default 60, max 300)"),
            (
                "worker",
                "array",
                "reload only this worker (node name, e.g. heimdall@host); repeat for several "
                "(default: every live worker)",
                {"items": {"type": "string", "pattern": "^[A-Za-z0-9@._:-]{1,200}$"}},
            ),
        ),
        admin=True,
    ),
    Operation(
        "post",
        "/api/v1/model/promote",
        "Point the champion alias at a version (workers follow on reload)",
        "model",
        {200: AliasMoveResponse, 404: Problem, 422: Problem},
        request=PromoteRequest,
        admin=True,
    ),
    Operation(
        "post",
        "/api/v1/model/rollback",
        "Point the champion alias back at previous-champion",
        "model",
        {200: AliasMoveResponse, 409: Problem},
        admin=True,
    ),
    Operation(
        "post",
        "/api/v1/jobs/{job_id}/truth",
        "Score a computed prediction and its shadows against ground truth",
        "jobs",
        {200: TruthResponse, 404: Problem, 409: Problem, 422: Problem, 503: Problem},
        request=TruthRequest,
        admin=True,
    ),
    Operation(
        "get",
        "/api/v1/model/info",
        "The served versions: registry record, card figures, live figures",
        "model",
        {200: ModelInfoResponse},
    ),
    Operation(
        "get",
        "/api/v1/model/versions",
        "Registered versions, their aliases, the workers holding each, the policy",
        "model",
        {200: ModelVersionsResponse},
    ),
    Operation(
        "get",
        "/api/v1/model/performance",
        "Live figures per version: requests, latency, cache hits, errors, fallbacks, accuracy",
        "model",
        {200: ModelPerformanceResponse, 503: Problem},
    ),
]
"""The operations of app/model_api.py, for the generated OpenAPI document."""

"""The service's settings: one object, read from the environment once.

Every process (API, worker, CLI) builds a :class:`Settings` at start-up and
passes it down; nothing below reads ``os.environ`` itself. Names carry the
``HEIMDALL_`` prefix, except where a library already owns the name
(``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``, ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the Heimdall service (see ``.env.example``)."""

    model_config = SettingsConfigDict(env_prefix="HEIMDALL_", extra="ignore")

    var_dir: Path = Path("var")
    """Folder for local state: the embedded MLflow registry, downloaded models."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """State Redis: job records, request payloads, worker heartbeats (persistent, never evicts)."""

    cache_redis_url: str | None = None
    """Redis of the prediction cache (may evict); unset: the next database of ``redis_url``."""

    broker_url: str = Field(
        default="",
        validate_default=True,
        validation_alias=AliasChoices("CELERY_BROKER_URL", "HEIMDALL_BROKER_URL"),
    )
    """Celery broker (Redis); unset or empty means ``redis_url``."""

    result_backend: str = Field(
        default="",
        validate_default=True,
        validation_alias=AliasChoices("CELERY_RESULT_BACKEND", "HEIMDALL_RESULT_BACKEND"),
    )
    """Celery result backend (Redis); unset or empty means ``redis_url``."""

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _follow_redis_url(cls, value: str, info: ValidationInfo) -> str:
        # A service moved to another Redis with HEIMDALL_REDIS_URL alone must
        # not leave its queues behind on the old default.
        return value or str(info.data.get("redis_url", ""))

    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "HEIMDALL_MLFLOW_TRACKING_URI"),
    )
    """MLflow tracking/registry URI; unset means the embedded sqlite registry in var/."""

    model_name: str = "heimdall-localizer"
    """Registered model name served by the workers."""

    model_alias: str = "champion"
    """Registry alias resolved to the served version (aliases, not stages)."""

    model_refresh_s: float = Field(default=30.0, ge=0)
    """How long the API trusts its resolved alias -> version before asking the registry."""

    stations_file: Path | None = None
    """Receiver network data file; unset means the packaged reference network."""

    min_stations: int = Field(default=3, ge=1)
    """Fewest receivers a request may carry."""

    predict_timeout_s: float = Field(default=5.0, gt=0)
    """How long sync /predict waits for a worker before answering 202 with a job URL."""

    task_time_limit_s: float = Field(default=20.0, gt=0)
    """Hard time limit of one prediction task, seconds (also sizes the redelivery timeout)."""

    result_expires_s: int = Field(default=3_600, gt=0)
    """How long a job handed to a client (202, async) and its result are kept, seconds."""

    answered_job_ttl_s: int = Field(default=60, gt=0)
    """How long a job already answered in its sync response stays pollable, seconds."""

    payload_ttl_s: int = Field(default=1_800, gt=0)
    """Longest a request payload waits for a worker, seconds (deleted once its task is done)."""

    max_task_attempts: int = Field(default=2, ge=1)
    """Times a task may start; one that killed its worker process this often is failed."""

    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    """How often each worker process refreshes its heartbeat record, seconds."""

    heartbeat_timeout_s: float = Field(default=20.0, gt=0)
    """A worker process whose heartbeat is older than this is gone, seconds."""

    registry_retry_s: float = Field(default=30.0, gt=0)
    """How often a worker serving its local fallback model retries the registry, seconds."""

    cache_ttl_s: int = Field(default=3_600, ge=0)
    """Time-to-live of cached predictions, seconds (0 disables the cache)."""

    max_request_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    """Largest request body accepted, bytes (413 above; 7 stations x 65 536 samples
    as [[I, Q]] pairs is about 13 MB, as base64 about 5 MB)."""

    max_batch_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Largest batch request body accepted, bytes (413 above; 64 items of 7 x 4 096 base64
    samples is about 17 MB)."""

    max_batch_items: int = Field(default=256, ge=1)
    """Most items one batch request may carry (413 above)."""

    batch_chunk_size: int = Field(default=16, ge=1)
    """Batch items per Celery task (one ONNX run each)."""

    redis_socket_timeout_s: float = Field(default=0.25, gt=0)
    """Connect and read timeout of the API's Redis client (cache, payloads, jobs), seconds."""

    onnx_intra_op_threads: int = Field(default=1, ge=1)
    """onnxruntime intra-op threads per worker child (prefork gives the parallelism)."""

    onnx_inter_op_threads: int = Field(default=1, ge=1)
    """onnxruntime inter-op threads per worker child."""

    extra_models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["challenger"])
    """Versions each worker holds besides ``model_alias`` (the champion): aliases or
    version numbers, comma-separated in ``HEIMDALL_EXTRA_MODELS``. One that does not
    resolve is skipped (logged), never fatal; only these can receive traffic."""

    admin_token: SecretStr | None = None
    """Bearer token of the state-changing endpoints (reload, traffic, promote, truth);
    unset: they answer 403."""

    truth_window_s: int = Field(default=21_600, gt=0)
    """How long a computed prediction can still be scored against ground truth, seconds."""

    drain_s: float = Field(default=5.0, ge=0)
    """On SIGTERM the API answers /ready 503 for this long before it stops accepting."""

    log_level: str = "INFO"
    """Log level of the service's own loggers."""

    log_format: Literal["logfmt", "json"] = "logfmt"
    """Log line format of the API and the worker: ``key=value`` pairs or one JSON object."""

    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the worker's Prometheus endpoint (all pool children summed); 0 turns it off."""

    worker_metrics_bind: str = "0.0.0.0"
    """Address the worker's Prometheus endpoint listens on."""

    @field_validator("extra_models", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @property
    def cache_url(self) -> str:
        """The prediction cache: ``cache_redis_url``, else the next database of ``redis_url``."""
        if self.cache_redis_url:
            return self.cache_redis_url
        parts = urlsplit(self.redis_url)
        current = parts.path.strip("/") or "0"
        following = (int(current) + 1) % 16 if current.isdigit() else 1
        return urlunsplit(parts._replace(path=f"/{following}"))

    @property
    def visibility_timeout_s(self) -> int:
        """When the broker hands an unacknowledged task to another worker, seconds.

        A reserved message (prefetch 1) waits at most one running task, then runs
        itself: two time limits plus a margin; any longer only delays the
        redelivery of a crashed worker's work.
        """
        return int(2 * self.task_time_limit_s + 10)

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI in force (embedded sqlite when none is set)."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.var_dir / 'mlflow' / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        """Artifact folder of the embedded registry."""
        return (self.var_dir / "mlflow" / "artifacts").resolve()

    @property
    def model_uri(self) -> str:
        """``models:/name@alias`` of the served model."""
        return f"models:/{self.model_name}@{self.model_alias}"


ENV_FILE = "var/run.env"
"""Written by deploy/ensure-redis.sh: the embedded Redis servers' URLs (with their password)."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read from the environment once.

    Values missing from the environment are taken from ``var/run.env`` when it
    exists, so every process started in the checkout (``make run``, the
    ``heimdall`` command) finds the embedded Redis; ``HEIMDALL_ENV_FILE`` names
    another file, and an empty value turns the file off.
    """
    env_file = os.environ.get("HEIMDALL_ENV_FILE", ENV_FILE)
    return Settings(_env_file=env_file or None)  # type: ignore[call-arg]

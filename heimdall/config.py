"""The service's settings: one object, read from the environment once.

Every process (API, worker, CLI) builds a :class:`Settings` at start-up and
passes it down; nothing below reads ``os.environ`` itself. Names carry the
``HEIMDALL_`` prefix, except where a library already owns the name
(``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``, ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the Heimdall service (see ``.env.example``)."""

    model_config = SettingsConfigDict(env_prefix="HEIMDALL_", extra="ignore")

    var_dir: Path = Path("var")
    """Folder for local state: the embedded MLflow registry, downloaded models."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis for the prediction cache and the request payloads handed to workers."""

    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CELERY_BROKER_URL", "HEIMDALL_BROKER_URL"),
    )
    """Celery broker (Redis)."""

    result_backend: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CELERY_RESULT_BACKEND", "HEIMDALL_RESULT_BACKEND"),
    )
    """Celery result backend (Redis)."""

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

    task_time_limit_s: float = Field(default=30.0, gt=0)
    """Hard time limit of one prediction task, seconds."""

    result_expires_s: int = Field(default=86_400, gt=0)
    """How long finished job results (and payloads) are kept in Redis, seconds."""

    cache_ttl_s: int = Field(default=3_600, ge=0)
    """Time-to-live of cached predictions, seconds (0 disables the cache)."""

    max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Largest request body accepted, bytes (413 above)."""

    max_batch_items: int = Field(default=256, ge=1)
    """Most items one batch request may carry (413 above)."""

    batch_chunk_size: int = Field(default=16, ge=1)
    """Batch items per Celery task (one ONNX run each)."""

    redis_socket_timeout_s: float = Field(default=0.25, gt=0)
    """Connect and read timeout of the API's Redis client (cache, payloads, jobs), seconds."""

    ready_timeout_s: float = Field(default=0.5, gt=0, le=1.0)
    """How long /ready waits for workers to answer the model-status broadcast, seconds."""

    onnx_intra_op_threads: int = Field(default=1, ge=1)
    """onnxruntime intra-op threads per worker child (prefork gives the parallelism)."""

    onnx_inter_op_threads: int = Field(default=1, ge=1)
    """onnxruntime inter-op threads per worker child."""

    log_level: str = "INFO"
    """Log level of the service's own loggers."""

    log_format: Literal["logfmt", "json"] = "logfmt"
    """Log line format of the API and the worker: ``key=value`` pairs or one JSON object."""

    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the worker's Prometheus endpoint (all pool children summed); 0 turns it off."""

    worker_metrics_bind: str = "0.0.0.0"
    """Address the worker's Prometheus endpoint listens on."""

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read from the environment once."""
    return Settings()

"""The MLflow model registry: register the localizer, resolve ``name@alias``.

The embedded default is a sqlite registry with a local artifact folder under
``var/``; any ``MLFLOW_TRACKING_URI`` works instead. Versions are chosen by
alias (``champion``, ``challenger``), never by the deprecated stages.
A resolved model is downloaded once per version into ``var/models/`` and its
card is checked against the ONNX file before anything serves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, cast

from heimdall.config import Settings
from heimdall.errors import ModelCardInvalid, ModelUnavailable
from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME, ModelCard, ModelIdentity

log = logging.getLogger(__name__)

EXPERIMENT = "heimdall-localizer"
SHA_TAG = "onnx_sha256"
FUSION_TAG = "fusion_sha256"
"""Digest of the card's ``fusion`` block: a recalibration changes answers without
touching the ONNX file, so a version is the same only when both digests match."""


@dataclass(frozen=True)
class ResolvedModel:
    """A registered model version available on local disk."""

    identity: ModelIdentity
    onnx_path: Path
    card: ModelCard


def shipped_model_dir() -> Path:
    """Folder of the trained model shipped in the package (model.onnx + card)."""
    return Path(str(resources.files("heimdall").joinpath("models/heimdall-localizer")))


_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def _registry(settings: Settings) -> Iterator[Any]:
    """An MlflowClient on ``settings``' registry, with mlflow's globals pointed there.

    mlflow's fluent API (start_run, log_model) only knows the process-wide
    URIs, and ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``
    into ``os.environ``, which Settings reads. Both are restored on exit so a
    registry call never changes which registry the process is configured for.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    saved_env = {name: os.environ.get(name) for name in _URI_VARIABLES}
    saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
    saved_registry = getattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        # None is accepted at run time (it means "not set"), though not typed so.
        mlflow.set_tracking_uri(cast(str, saved_tracking))
        mlflow.set_registry_uri(cast(str, saved_registry))
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _experiment_id(client: Any, settings: Settings) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if not settings.mlflow_tracking_uri:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        location = settings.artifact_root.as_uri()
    return str(client.create_experiment(EXPERIMENT, artifact_location=location))


def register_model(
    settings: Settings,
    model_dir: Path | None = None,
    *,
    alias: str | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[ModelIdentity, bool]:
    """Log and register the model in ``model_dir``; point ``alias`` at it.

    Registering the same ONNX file twice reuses its version (matched by the
    file's sha256), so the call is idempotent. Returns the identity and
    whether a new version was created. A new version's card records the
    model's answer to the known input (:func:`heimdall.smoke.reference_answer`)
    unless it already does; a reload compares the version with it.
    """
    model_dir = model_dir or shipped_model_dir()
    alias = alias or settings.model_alias
    card = ModelCard.load(model_dir / CARD_FILENAME)
    onnx_path = model_dir / MODEL_FILENAME
    card.check_model(onnx_path)
    with _registry(settings) as client:
        return _register(client, settings, card, onnx_path, model_dir, alias, params)


def _register(
    client: Any,
    settings: Settings,
    card: ModelCard,
    onnx_path: Path,
    model_dir: Path,
    alias: str,
    params: dict[str, Any] | None,
) -> tuple[ModelIdentity, bool]:
    """Log and register with ``client``; see :func:`register_model`."""
    from mlflow.exceptions import MlflowException

    name = settings.model_name

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        versions = []
    fusion = fusion_digest(card)
    for mv in versions:
        if mv.tags.get(SHA_TAG) == card.onnx_sha256 and mv.tags.get(FUSION_TAG) == fusion:
            client.set_registered_model_alias(name, alias, mv.version)
            log.info(
                "model %s version %s already registered; alias %s set", name, mv.version, alias
            )
            return ModelIdentity(name, str(mv.version), alias), False

    with tempfile.TemporaryDirectory(prefix="heimdall-register-") as staging:
        card_path = model_dir / CARD_FILENAME
        if not card.reference:
            # The answer a reload's smoke check compares the version with, recorded
            # in the registered card (the source folder is left as it is).
            from heimdall.smoke import reference_answer

            card = replace(card, reference=reference_answer(onnx_path, card))
            card_path = Path(staging) / CARD_FILENAME
            card_path.write_text(card.dumps())
        return _log_version(client, settings, card, onnx_path, card_path, alias, params)


def fusion_digest(card: ModelCard) -> str:
    """sha256 of the card's ``fusion`` block (canonical JSON)."""
    canonical = json.dumps(card.fusion, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _log_version(
    client: Any,
    settings: Settings,
    card: ModelCard,
    onnx_path: Path,
    card_path: Path,
    alias: str,
    params: dict[str, Any] | None,
) -> tuple[ModelIdentity, bool]:
    """Log a run with the model and its card, register it as a new version, set ``alias``."""
    import mlflow
    import mlflow.onnx
    import onnx

    name = settings.model_name
    accuracy = card.accuracy
    metrics = {
        "accuracy_meters": accuracy.get("median_error_m"),
        "p90_error_m": accuracy.get("p90_error_m"),
        "mean_error_m": accuracy.get("mean_error_m"),
        "coverage_68": accuracy.get("coverage_68"),
        "coverage_95": accuracy.get("coverage_95"),
        "baseline_median_error_m": accuracy.get("baseline_median_error_m"),
        "training_samples": card.training.get("scenes"),
    }
    run_params = {
        "stations": ",".join(card.slots),
        "sample_rate_hz": card.features.sample_rate_hz,
        "n_fft": card.features.n_fft,
        "hop": card.features.hop,
        "n_bands": card.features.n_bands,
        "normalization_mean_db": card.normalization_mean_db,
        "normalization_std_db": card.normalization_std_db,
        "onnx_sha256": card.onnx_sha256,
        **{f"train_{k}": v for k, v in card.training.items() if not isinstance(v, dict)},
        **(params or {}),
    }
    experiment_id = _experiment_id(client, settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{card.onnx_sha256[:8]}"):
        mlflow.log_params({k: str(v)[:500] for k, v in run_params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.log_dict(card.to_dict(), CARD_FILENAME)
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
            extra_files=[str(card_path)],
            registered_model_name=name,
            metadata={"onnx_sha256": card.onnx_sha256},
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, SHA_TAG, card.onnx_sha256)
    client.set_model_version_tag(name, version, FUSION_TAG, fusion_digest(card))
    client.set_registered_model_alias(name, alias, version)
    log.info("registered %s version %s with alias %s", name, version, alias)
    return ModelIdentity(name, version, alias), True


def resolve_version(settings: Settings, alias: str | None = None) -> ModelIdentity:
    """``name@alias`` -> the version it points at (ModelUnavailable when none)."""
    from mlflow.exceptions import MlflowException

    alias = alias or settings.model_alias
    try:
        with _registry(settings) as client:
            mv = client.get_model_version_by_alias(settings.model_name, alias)
    except MlflowException as exc:
        raise ModelUnavailable(
            f"no version of {settings.model_name!r} has alias {alias!r} in the registry "
            f"at {settings.tracking_uri} (run `heimdall model register`)"
        ) from exc
    return ModelIdentity(settings.model_name, str(mv.version), alias)


def resolve_target(settings: Settings, target: str) -> ModelIdentity:
    """A served target -> its version: an alias (``challenger``) or an explicit version (``7``).

    The identity's ``alias`` is the target as named. ModelUnavailable when it
    does not resolve.
    """
    if not target.isdigit():
        return resolve_version(settings, target)
    from mlflow.exceptions import MlflowException

    try:
        with _registry(settings) as client:
            mv = client.get_model_version(settings.model_name, target)
    except MlflowException as exc:
        raise ModelUnavailable(
            f"{settings.model_name!r} has no version {target} in the registry "
            f"at {settings.tracking_uri}"
        ) from exc
    return ModelIdentity(settings.model_name, str(mv.version), target)


def fetch(settings: Settings, identity: ModelIdentity) -> ResolvedModel:
    """Download ``identity``'s version once and check its card against its ONNX file."""
    target = _version_dir(settings, identity.version)
    if not (target / MODEL_FILENAME).is_file():
        _download(settings, identity, target)
    return _local(identity, target)


def resolve(settings: Settings, alias: str | None = None) -> ResolvedModel:
    """Resolve ``name@alias``, download that version once, and check its card.

    The version is remembered as the alias's last verified one on this disk
    (see :func:`last_verified`).
    """
    identity = resolve_version(settings, alias)
    resolved = fetch(settings, identity)
    _remember_verified(settings, identity)
    return resolved


def last_verified(settings: Settings, alias: str | None = None) -> ResolvedModel:
    """The version of ``name@alias`` that this disk last resolved and verified.

    For a worker that cannot reach the registry: the files are checked again
    (card consistent, ONNX digest) before anything serves them. Raises
    :class:`ModelUnavailable` when there is none.
    """
    alias = alias or settings.model_alias
    index = _verified_index(settings)
    try:
        version = str(json.loads(index.read_text())[alias])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelUnavailable(
            f"no locally verified version of {settings.model_name}@{alias} in {index.parent}"
        ) from exc
    identity = ModelIdentity(settings.model_name, version, alias)
    return _local(identity, _version_dir(settings, version))


def _version_dir(settings: Settings, version: str) -> Path:
    return settings.var_dir.resolve() / "models" / settings.model_name / version


def _verified_index(settings: Settings) -> Path:
    return settings.var_dir.resolve() / "models" / settings.model_name / "verified.json"


def _local(identity: ModelIdentity, folder: Path) -> ResolvedModel:
    card = ModelCard.load(folder / CARD_FILENAME)
    card.check_model(folder / MODEL_FILENAME)
    return ResolvedModel(identity, folder / MODEL_FILENAME, card)


def _remember_verified(settings: Settings, identity: ModelIdentity) -> None:
    index = _verified_index(settings)
    try:
        known = json.loads(index.read_text()) if index.is_file() else {}
    except ValueError:
        known = {}
    if known.get(identity.alias) == identity.version:
        return
    known[identity.alias] = identity.version
    staging = index.with_name(f".{index.name}.{os.getpid()}")
    try:
        staging.write_text(json.dumps(known, sort_keys=True))
        os.replace(staging, index)  # atomic: readers never see half a file
    except OSError as exc:
        log.warning("cannot remember the verified version in %s: %s", index, exc)


def _download(settings: Settings, identity: ModelIdentity, target: Path) -> None:
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{identity.version}-", dir=target.parent))
    try:
        with _registry(settings):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{identity.name}/{identity.version}",
                dst_path=str(staging),
                tracking_uri=settings.tracking_uri,
            )
        card = staging / "extra_files" / CARD_FILENAME
        if not card.is_file():
            raise ModelCardInvalid(
                f"{identity.name} version {identity.version} has no {CARD_FILENAME}; "
                "it was not registered by `heimdall model register`"
            )
        shutil.move(str(card), staging / CARD_FILENAME)
        if not (staging / MODEL_FILENAME).is_file():
            raise ModelCardInvalid(f"{identity.name} version {identity.version} has no ONNX file")
        try:
            os.rename(staging, target)
        except OSError:
            # Another process downloaded the same version first; theirs is as good.
            if not (target / MODEL_FILENAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_summary(resolved: ResolvedModel) -> dict[str, Any]:
    """A short JSON-able description of a resolved model (for logs and the CLI)."""
    return {
        **resolved.identity.to_dict(),
        "path": str(resolved.onnx_path),
        "stations": list(resolved.card.slots),
        "sample_rate_hz": resolved.card.features.sample_rate_hz,
        "accuracy": resolved.card.accuracy,
    }


def dumps(obj: Any) -> str:
    """Compact JSON for log lines."""
    return json.dumps(obj, sort_keys=True, default=str)

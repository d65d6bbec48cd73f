"""Model lifecycle in the registry and in live figures: targets, promotion, truth, performance.

* A *target* names a served version the way settings and traffic policies do:
  an alias (``champion``, ``challenger``) or an explicit version number (``"7"``).
  :func:`resolve_target` turns it into a downloaded, checked version.
* :func:`promote` / :func:`rollback` move the champion alias, remembering the
  version it left under :data:`PREVIOUS_ALIAS`; workers follow on reload.
* Ground truth posted for a job is scored against what each version predicted
  (:func:`score`), kept per version (newest first, bounded) and summarized with
  the live request counters into a version's performance (:func:`summarize`).

Transport-free: the API and the CLI call these; nothing here knows HTTP or Celery.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from heimdall import geo, registry
from heimdall.config import Settings
from heimdall.errors import InvalidInput, ModelUnavailable
from heimdall.modelcard import ModelIdentity
from heimdall.registry import ResolvedModel

PREVIOUS_ALIAS = "previous-champion"
"""Alias of the version the last promotion replaced (what a rollback returns to)."""

TRUTH_KEEP = 10_000
"""Scored predictions kept per version (the newest)."""

CHI2_2DOF_68 = 2.2789
"""Squared Mahalanobis radius of the 68 % ellipse (chi-square, 2 degrees of freedom);
used for a prediction recorded without its ellipses' own ``k``."""
CHI2_2DOF_95 = 5.9915
"""Squared Mahalanobis radius of the 95 % ellipse (same use)."""

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000)
"""Upper bounds (ms) of the live latency histogram of each version; one more bucket is open."""

# Fields of the live counters hash (contract.perf_key) of one version.
PERF_REQUESTS, PERF_CACHED, PERF_ERRORS, PERF_FALLBACKS = (
    "requests",
    "cached",
    "errors",
    "fallbacks",
)
PERF_LATENCY_SUM_MS, PERF_LATENCY_COUNT = "latency_sum_ms", "latency_count"


class UnknownVersion(InvalidInput):
    """A version number or alias the registry does not know."""

    status = 404
    type = "unknown-version"
    title = "Unknown model version"


class NothingToRollBack(InvalidInput):
    """No previous champion is recorded."""

    status = 409
    type = "nothing-to-roll-back"
    title = "Nothing to roll back"


# -- targets -------------------------------------------------------------------------------


def is_version_number(target: str) -> bool:
    """Whether ``target`` names a registry version (``"7"``) rather than an alias."""
    return target.isdigit()


def resolve_target(settings: Settings, target: str) -> ResolvedModel:
    """An alias or version number -> that version on local disk with its checked card.

    Raises :class:`ModelUnavailable` when the registry has no such alias or version.
    The returned identity's ``alias`` is ``target`` as named.
    """
    from mlflow.exceptions import MlflowException

    if not is_version_number(target):
        return registry.resolve(settings, target)
    identity = ModelIdentity(settings.model_name, target, target)
    try:
        # The registry's own helpers (one home for its URI handling and layout).
        with registry._registry(settings) as client:
            client.get_model_version(settings.model_name, target)
    except MlflowException as exc:
        raise ModelUnavailable(
            f"{settings.model_name} has no version {target} in the registry at "
            f"{settings.tracking_uri}"
        ) from exc
    folder = registry._version_dir(settings, target)
    if not (folder / registry.MODEL_FILENAME).is_file():
        registry._download(settings, identity, folder)
    return registry._local(identity, folder)


# -- promotion -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasMove:
    """What a promotion or rollback did to the champion alias."""

    champion: ModelIdentity
    previous: ModelIdentity | None
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "champion": self.champion.to_dict(),
            "previous_champion": None if self.previous is None else self.previous.to_dict(),
            "changed": self.changed,
        }


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(settings: Settings, version: str) -> AliasMove:
    """Point the champion alias at ``version``; the version it left becomes ``previous-champion``.

    Promoting the version that already is the champion changes nothing.
    Raises :class:`UnknownVersion` (404) when the registry has no such version.
    """
    from mlflow.exceptions import MlflowException

    name, champion = settings.model_name, settings.model_alias
    version = str(version).strip()
    if not is_version_number(version):
        raise InvalidInput(
            f"'version' must be a registry version number such as \"7\", got {version!r}",
            field="version",
        )
    with registry._registry(settings) as client:
        try:
            client.get_model_version(name, version)
        except MlflowException as exc:
            raise UnknownVersion(
                f"{name} has no version {version} in the registry", field="version"
            ) from exc
        current = _alias_version(client, name, champion)
        if current == version:
            previous = _alias_version(client, name, PREVIOUS_ALIAS)
            return AliasMove(
                ModelIdentity(name, version, champion),
                None if previous is None else ModelIdentity(name, previous, PREVIOUS_ALIAS),
                changed=False,
            )
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
        client.set_registered_model_alias(name, champion, version)
    return AliasMove(
        ModelIdentity(name, version, champion),
        None if current is None else ModelIdentity(name, current, PREVIOUS_ALIAS),
        changed=True,
    )


def rollback(settings: Settings) -> AliasMove:
    """Point the champion back at ``previous-champion`` (which then names the version left).

    So a second rollback undoes the first. Raises :class:`NothingToRollBack`
    (409) when no promotion was recorded.
    """
    name, champion = settings.model_name, settings.model_alias
    with registry._registry(settings) as client:
        previous = _alias_version(client, name, PREVIOUS_ALIAS)
        if previous is None:
            raise NothingToRollBack(
                f"{name} has no {PREVIOUS_ALIAS!r} alias: nothing was promoted to roll back"
            )
        current = _alias_version(client, name, champion)
        client.set_registered_model_alias(name, champion, previous)
        if current is not None and current != previous:
            client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
    return AliasMove(
        ModelIdentity(name, previous, champion),
        None if current is None else ModelIdentity(name, current, PREVIOUS_ALIAS),
        changed=current != previous,
    )


def registered_versions(settings: Settings) -> list[dict[str, Any]]:
    """Every registered version, newest first: version, aliases, run id, created (epoch s)."""
    from mlflow.exceptions import MlflowException

    aliases: dict[str, list[str]] = {}
    with registry._registry(settings) as client:
        try:
            found = client.search_model_versions(f"name='{settings.model_name}'")
            # Search results do not carry aliases; the registered model does.
            for alias, version in client.get_registered_model(settings.model_name).aliases.items():
                aliases.setdefault(str(version), []).append(alias)
        except MlflowException:
            found = []
    versions = [
        {
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "run_id": mv.run_id,
            "created_at": _epoch_ms(mv.creation_timestamp),
            "onnx_sha256": (mv.tags or {}).get(registry.SHA_TAG),
        }
        for mv in found
    ]
    versions.sort(key=lambda v: int(v["version"]), reverse=True)
    return versions


def _epoch_ms(value: Any) -> float | None:
    return float(value) / 1000.0 if isinstance(value, int | float) else None


# -- ground truth --------------------------------------------------------------------------


def check_position(data: Any) -> tuple[float, float]:
    """``{"latitude", "longitude"}`` in degrees, validated (422 otherwise)."""
    if not isinstance(data, Mapping):
        raise InvalidInput("the truth must be a JSON object with 'latitude' and 'longitude'")
    values = []
    for key, bound in (("latitude", 90.0), ("longitude", 180.0)):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"'{key}' must be a number of degrees", field=key)
        if not math.isfinite(float(value)) or abs(float(value)) > bound:
            raise InvalidInput(f"'{key}' must be within +-{bound:g} degrees", field=key)
        values.append(float(value))
    return values[0], values[1]


def score(
    latitude: float,
    longitude: float,
    covariance_m2: Sequence[Sequence[float]],
    truth: tuple[float, float],
    ellipse_k: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """How far a prediction was from the truth, and whether its ellipses held it.

    ``covariance_m2`` is the 2x2 east/north covariance in m^2 around the
    predicted position; ``ellipse_k`` the ``k`` its answer drew each ellipse
    with (``{"0.68": k, "0.95": k}``, the ellipses' ``scale_k``). Returns
    ``error_km`` and ``inside_68`` / ``inside_95`` (squared Mahalanobis
    distance within k², the chi-square 2-dof radius where no ``k`` was given).
    """
    east, north = geo.geodetic_to_enu(truth[0], truth[1], latitude, longitude)
    offset = np.array([float(east), float(north)])
    cov = np.asarray(covariance_m2, dtype=float).reshape(2, 2)
    try:
        d2 = float(offset @ np.linalg.solve(cov, offset))
    except np.linalg.LinAlgError:
        d2 = math.inf
    if not math.isfinite(d2) or d2 < 0:
        d2 = math.inf
    error_m = geo.geodesic_distance_m(latitude, longitude, truth[0], truth[1])
    return {
        "error_km": round(error_m / 1000.0, 4),
        "mahalanobis2": None if math.isinf(d2) else round(d2, 4),
        "inside_68": d2 <= _radius2(ellipse_k, "0.68", CHI2_2DOF_68),
        "inside_95": d2 <= _radius2(ellipse_k, "0.95", CHI2_2DOF_95),
    }


def _radius2(ellipse_k: Mapping[str, float] | None, confidence: str, chi2: float) -> float:
    """Squared Mahalanobis radius of an answer's ``confidence`` ellipse."""
    k = (ellipse_k or {}).get(confidence)
    return chi2 if k is None else float(k) ** 2


def truth_entry(job_id: str, role: str, scored: Mapping[str, Any], at: float) -> str:
    """The JSON line pushed onto a version's truth list for one scored prediction."""
    return json.dumps(
        {
            "job_id": job_id,
            "role": role,
            "error_km": scored["error_km"],
            "inside_68": scored["inside_68"],
            "inside_95": scored["inside_95"],
            "at": at,
        },
        separators=(",", ":"),
    )


def accuracy(entries: Iterable[bytes | str]) -> dict[str, Any]:
    """Live accuracy from a truth list: ``n``, median error (km), 68 % / 95 % coverage."""
    errors: list[float] = []
    in68 = in95 = 0
    for raw in entries:
        try:
            entry = json.loads(raw)
            errors.append(float(entry["error_km"]))
        except (ValueError, KeyError, TypeError):
            continue
        in68 += bool(entry.get("inside_68"))
        in95 += bool(entry.get("inside_95"))
    n = len(errors)
    return {
        "n": n,
        "median_error_km": round(statistics.median(errors), 4) if n else None,
        "coverage_68": round(in68 / n, 4) if n else None,
        "coverage_95": round(in95 / n, 4) if n else None,
    }


# -- live request figures ------------------------------------------------------------------


def latency_field(latency_ms: float) -> str:
    """The histogram field of the bucket holding ``latency_ms``: ``le_<bound>`` or ``le_inf``."""
    for bound in LATENCY_BUCKETS_MS:
        if latency_ms <= bound:
            return f"le_{bound}"
    return "le_inf"


@dataclass
class PerfEvent:
    """One answered request (or batch item) of one version, for its live counters."""

    version: str
    cached: bool = False
    error: bool = False
    fallback: bool = False
    latency_ms: float | None = None

    def increments(self) -> dict[str, float]:
        """Field -> increment in the version's counters hash."""
        fields: dict[str, float] = {PERF_REQUESTS: 1}
        if self.cached:
            fields[PERF_CACHED] = 1
        if self.error:
            fields[PERF_ERRORS] = 1
        if self.fallback:
            fields[PERF_FALLBACKS] = 1
        if self.latency_ms is not None:
            fields[PERF_LATENCY_SUM_MS] = round(self.latency_ms, 3)
            fields[PERF_LATENCY_COUNT] = 1
            fields[latency_field(self.latency_ms)] = 1
        return fields


def summarize(counters: Mapping[Any, Any]) -> dict[str, Any]:
    """A version's counters hash -> requests, cache hit rate, errors, fallbacks, mean / P95 ms.

    P95 is the upper bound of the histogram bucket holding the 95th percentile
    (``null`` when it falls in the open bucket or nothing was timed).
    """
    values = {_text(k): float(_text(v)) for k, v in counters.items()}
    requests = int(values.get(PERF_REQUESTS, 0))
    timed = int(values.get(PERF_LATENCY_COUNT, 0))
    p95: float | None = None
    if timed:
        wanted = math.ceil(0.95 * timed)
        seen = 0
        for bound in LATENCY_BUCKETS_MS:
            seen += int(values.get(f"le_{bound}", 0))
            if seen >= wanted:
                p95 = float(bound)
                break
    return {
        "requests": requests,
        "cached": int(values.get(PERF_CACHED, 0)),
        "cache_hit_rate": round(values.get(PERF_CACHED, 0) / requests, 4) if requests else None,
        "errors": int(values.get(PERF_ERRORS, 0)),
        "fallbacks": int(values.get(PERF_FALLBACKS, 0)),
        "latency_ms": {
            "timed": timed,
            "mean": round(values.get(PERF_LATENCY_SUM_MS, 0.0) / timed, 3) if timed else None,
            "p95": p95,
        },
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def now() -> float:
    """Epoch seconds (one place, for records)."""
    return time.time()

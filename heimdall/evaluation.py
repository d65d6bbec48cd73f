"""Evaluation of the served localizer against truth and the classical baseline, per family.

Each family of :data:`heimdall.simulate.families.EVALUATION` is simulated
afresh (its own seed), run through the serving path (features -> ONNX ->
fusion with the physical likelihood) and through the maximum-likelihood
baseline. Nothing here is fitted: the families are for judging only. The
coverage counts the truths inside the ellipses the service draws: each
confidence's ``k`` from the card (heimdall.runtime.CovarianceModel), not the
chi-square one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from heimdall import baseline
from heimdall.geo import chi2_scale
from heimdall.modelcard import ModelCard, ModelIdentity
from heimdall.simulate.dataset import build_dataset
from heimdall.simulate.families import EVALUATION, NOISY
from heimdall.simulate.scenes import station_enu
from heimdall.stations import Network

EVAL_SEED = 20_261_122
"""Seed of the held-out evaluation sets (training uses other seeds)."""


@dataclass(frozen=True)
class ErrorStats:
    """Distance error statistics, m."""

    median_m: float
    mean_m: float
    p90_m: float

    @classmethod
    def of(cls, errors: np.ndarray) -> ErrorStats:
        """Statistics of an array of errors in metres."""
        return cls(
            median_m=float(np.median(errors)),
            mean_m=float(np.mean(errors)),
            p90_m=float(np.percentile(errors, 90)),
        )


def mahalanobis_sq(residual: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of (N, 2) residuals under (N, 3) sigma_e, sigma_n, rho."""
    sx, sy, rho = uncertainty[:, 0], uncertainty[:, 1], uncertainty[:, 2]
    dx, dy = residual[:, 0] / sx, residual[:, 1] / sy
    return (dx**2 - 2 * rho * dx * dy + dy**2) / (1 - rho**2)


def coverage(d2: np.ndarray, confidence: float, scale_k: float | None = None) -> float:
    """Fraction of points inside the ``confidence`` ellipse drawn at k = ``scale_k``.

    ``d2`` is the squared Mahalanobis distance under the served covariance;
    without ``scale_k`` the ellipse is the Gaussian's (chi-square k).
    """
    k = chi2_scale(confidence) if scale_k is None else scale_k
    return float(np.mean(d2 <= k**2))


def _stats(errors: np.ndarray) -> dict[str, float]:
    s = ErrorStats.of(errors)
    return {
        "median_error_m": round(s.median_m, 1),
        "mean_error_m": round(s.mean_m, 1),
        "p90_error_m": round(s.p90_m, 1),
    }


def _coverage_by_flag(
    d2: np.ndarray, inside: np.ndarray, scale_k: dict[float, float]
) -> dict[str, float | None]:
    """68 %/95 % coverage of the estimates that say ``inside_coverage`` true, and false.

    A client trusts the two kinds differently, so the ellipses must be honest
    for each, not only on average (None when a family has no estimate of a kind).
    """
    out: dict[str, float | None] = {}
    for label, rows in (("inside", inside), ("flagged", ~inside)):
        for confidence in (0.68, 0.95):
            key = f"coverage_{round(confidence * 100)}_{label}"
            covered = coverage(d2[rows], confidence, scale_k[confidence]) if rows.any() else None
            out[key] = None if covered is None else round(covered, 4)
    return out


def evaluate_family(
    localizer: Any, network: Network, name: str, n_scenes: int, seed: int
) -> dict[str, Any]:
    """Served model, its two ingredients, and the ML baseline on one family."""
    sim = EVALUATION[name]
    data = build_dataset(n_scenes, seed, network, sim, localizer.card.features)
    truth = data.target_m
    mean, cov, posts = localizer.estimate(data.x, data.mask)
    locs = localizer.localize(mean, cov, posts, data.mask, data.x)
    net_pos, _ = localizer.run(data.x, data.mask)
    uniform = baseline.posteriors(data.x, data.mask, localizer.stations_enu, localizer.likelihood)
    post_pos = np.array([p.mean_m for p in uniform])
    base_pos = baseline.maximum_likelihood(
        data.x, data.mask, station_enu(network), localizer.likelihood
    )
    model_err = np.linalg.norm(mean - truth, axis=1)
    base_err = np.linalg.norm(base_pos - truth, axis=1)
    sx, sy = np.sqrt(cov[:, 0, 0]), np.sqrt(cov[:, 1, 1])
    d2 = mahalanobis_sq(mean - truth, np.stack([sx, sy, cov[:, 0, 1] / (sx * sy)], axis=-1))
    inside = np.array([loc.quality.inside_coverage for loc in locs])
    k = {c: localizer.covariance_model.ellipse_scale(c) for c in (0.68, 0.95)}
    m, b = np.median(model_err), np.median(base_err)
    return {
        "n_scenes": n_scenes,
        "model": {
            **_stats(model_err),
            "coverage_68": round(coverage(d2, 0.68, k[0.68]), 4),
            "coverage_95": round(coverage(d2, 0.95, k[0.95]), 4),
            "inside_coverage_rate": round(float(inside.mean()), 4),
            **_coverage_by_flag(d2, inside, k),
            "median_sigma_m": round(float(np.median(np.sqrt((sx**2 + sy**2) / 2))), 1),
        },
        "baseline": _stats(base_err),
        "network_only_median_m": round(
            float(np.median(np.linalg.norm(net_pos - truth, axis=1))), 1
        ),
        "posterior_only_median_m": round(
            float(np.median(np.linalg.norm(post_pos - truth, axis=1))), 1
        ),
        "model_to_baseline_median": round(float(m / b), 3),
        "model_to_baseline_p90": round(
            float(np.percentile(model_err, 90) / np.percentile(base_err, 90)), 3
        ),
        "noisy": name in NOISY,
    }


def evaluate(
    onnx_path: Path,
    card: ModelCard,
    network: Network,
    *,
    n_scenes: int = 300,
    seed: int = EVAL_SEED,
    families: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-family report: model and baseline median/P90, their ratio, ellipse coverage."""
    from heimdall.runtime import Localizer

    started = time.perf_counter()
    localizer = Localizer(onnx_path, card, network, ModelIdentity("local", "file", None))
    report: dict[str, Any] = {"n_scenes_per_family": n_scenes, "seed": seed, "families": {}}
    for i, name in enumerate(families or tuple(EVALUATION)):
        report["families"][name] = evaluate_family(localizer, network, name, n_scenes, seed + i)
        if progress is not None:
            progress(name)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report

"""Evaluation of a localizer against truth and against the classical baseline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from heimdall import baseline
from heimdall.features import normalize
from heimdall.geo import CHI2_SCALE
from heimdall.modelcard import ModelCard, ModelIdentity
from heimdall.simulate.dataset import Dataset, build_dataset
from heimdall.simulate.propagation import SimulationParams, noise_floor_dbm
from heimdall.simulate.scenes import placement_box, station_enu
from heimdall.stations import Network

EVAL_SEED = 20_261_122
"""Seed of the held-out evaluation set (training uses other seeds)."""


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


def coverage(d2: np.ndarray, confidence: float) -> float:
    """Fraction of points inside the ellipse of the given confidence."""
    return float(np.mean(d2 <= CHI2_SCALE[confidence] ** 2))


def model_predictions(
    onnx_path: Path, card: ModelCard, network: Network, data: Dataset
) -> tuple[np.ndarray, np.ndarray]:
    """Run the ONNX model on a data set: (N, 2) position m, (N, 3) uncertainty."""
    from heimdall.runtime import Localizer

    localizer = Localizer(onnx_path, card, network, ModelIdentity("local", "file", None))
    x = normalize(data.x_dbm, data.mask, card.normalization_mean_db, card.normalization_std_db)
    positions, uncertainties = [], []
    for start in range(0, len(data), 1024):
        p, u = localizer.run(x[start : start + 1024], data.mask[start : start + 1024])
        positions.append(p)
        uncertainties.append(u)
    return np.concatenate(positions), np.concatenate(uncertainties)


def evaluate(
    onnx_path: Path,
    card: ModelCard,
    network: Network,
    *,
    n_scenes: int = 2_000,
    seed: int = EVAL_SEED,
    sim: SimulationParams | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Model and baseline errors, and ellipse coverage, on a held-out simulated set."""
    sim = sim or SimulationParams()
    started = time.perf_counter()
    data = build_dataset(n_scenes, seed, network, sim, card.features, progress=progress)
    position, uncertainty = model_predictions(onnx_path, card, network, data)
    model_err = np.linalg.norm(position - data.target_m, axis=1)
    d2 = mahalanobis_sq(position - data.target_m, uncertainty)

    base_params = baseline.BaselineParams(
        path_loss_exponent=sim.path_loss_exponent,
        noise_floor_dbm=noise_floor_dbm(card.features.sample_rate_hz, sim),
    )
    base_pos = baseline.localize(
        data.x_dbm, data.mask, station_enu(network), placement_box(network, sim), base_params
    )
    base_err = np.linalg.norm(base_pos - data.target_m, axis=1)

    m, b = ErrorStats.of(model_err), ErrorStats.of(base_err)
    return {
        "n_scenes": n_scenes,
        "seed": seed,
        "model": {
            "median_error_m": round(m.median_m, 1),
            "mean_error_m": round(m.mean_m, 1),
            "p90_error_m": round(m.p90_m, 1),
            "coverage_68": round(coverage(d2, 0.68), 4),
            "coverage_95": round(coverage(d2, 0.95), 4),
        },
        "baseline": {
            "median_error_m": round(b.median_m, 1),
            "mean_error_m": round(b.mean_m, 1),
            "p90_error_m": round(b.p90_m, 1),
        },
        "model_to_baseline_median": round(m.median_m / b.median_m, 3),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }

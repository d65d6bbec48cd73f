"""Classical baseline: RSS nonlinear least squares on the same features.

Each present station's received signal power is estimated from its mel-band
powers (total power minus the known receiver noise floor); stations whose SNR
is below detection are dropped. The transmitter position and its unknown
transmit power are then fitted to the log-distance model

    P_i = P0 - 10 n log10(d_i / d0)

by a coarse grid search (global) refined with bounded least squares. P0 has a
closed form for a given position (the mean residual), so the search is 2-D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

MIN_STATIONS = 3


@dataclass(frozen=True)
class BaselineParams:
    """Assumptions of the classical localizer."""

    path_loss_exponent: float = 3.2
    """Assumed log-distance exponent n."""
    noise_floor_dbm: float = -121.2
    """Known receiver noise power over the sampled band, dBm."""
    detection_snr_db: float = 3.0
    """Stations with estimated SNR below this are ignored, dB."""
    grid_step_m: float = 5_000.0
    """Spacing of the initial grid search, m."""
    min_distance_m: float = 100.0
    """Distances are clipped to at least this, m."""


def signal_power_dbm(x_dbm: np.ndarray, noise_floor_dbm: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-station signal power (dBm) and SNR (dB) from (…, S, n_mels) mel powers in dBm."""
    total_mw = (10.0 ** (x_dbm / 10.0)).sum(axis=-1)
    noise_mw = 10.0 ** (noise_floor_dbm / 10.0)
    signal_mw = np.maximum(total_mw - noise_mw, noise_mw * 1e-3)
    return 10.0 * np.log10(signal_mw), 10.0 * np.log10(signal_mw / noise_mw)


def _cost(pos: np.ndarray, st: np.ndarray, p: np.ndarray, n: float, dmin: float) -> np.ndarray:
    """Residuals after the closed-form P0, for positions (..., 2)."""
    d = np.maximum(np.linalg.norm(pos[..., None, :] - st, axis=-1), dmin)
    model = -10.0 * n * np.log10(d)
    resid = p - model
    return resid - resid.mean(axis=-1, keepdims=True)


def localize(
    x_dbm: np.ndarray,
    mask: np.ndarray,
    stations_enu: np.ndarray,
    box: tuple[float, float, float, float],
    params: BaselineParams | None = None,
) -> np.ndarray:
    """(N, 2) east/north estimates, m, for scenes (N, S, n_mels) with mask (N, S).

    ``stations_enu`` is (S, 2) in metres, ``box`` the search area
    (east_min, east_max, north_min, north_max). Scenes with fewer than three
    detected stations fall back to the power-weighted centroid of what was heard.
    """
    params = params or BaselineParams()
    power, snr = signal_power_dbm(x_dbm, params.noise_floor_dbm)
    e0, e1, n0, n1 = box
    ge, gn = np.meshgrid(
        np.arange(e0, e1 + 1, params.grid_step_m), np.arange(n0, n1 + 1, params.grid_step_m)
    )
    grid = np.stack([ge.ravel(), gn.ravel()], axis=-1)
    out = np.zeros((x_dbm.shape[0], 2))
    for i in range(x_dbm.shape[0]):
        use = (mask[i] > 0) & (snr[i] >= params.detection_snr_db)
        if use.sum() < MIN_STATIONS:
            heard = mask[i] > 0
            w = 10.0 ** (power[i, heard] / 10.0)
            out[i] = (stations_enu[heard] * w[:, None]).sum(0) / w.sum()
            continue
        st, p = stations_enu[use], power[i, use]
        n = params.path_loss_exponent
        costs = (_cost(grid, st, p, n, params.min_distance_m) ** 2).sum(axis=-1)
        start = grid[int(np.argmin(costs))]
        fit = least_squares(
            lambda q, st=st, p=p, n=n: _cost(q, st, p, n, params.min_distance_m),
            start,
            bounds=([e0, n0], [e1, n1]),
            x_scale=10_000.0,
        )
        out[i] = fit.x
    return out

"""Physical likelihood of a transmitter position from per-station received powers.

Each station that detected the signal measured its power ``s_i`` (dBm); the
log-distance model says

    s_i = P0 - 10 n log10(d_i / 1 km) + e_i,     e_i ~ N(0, sigma^2)

with P0 (the power 1 km away: ERP minus the near loss) and the exponent n
unknown. A station that recorded but did not detect the signal says
``s_i < T_i`` (its noise plus the detection threshold): a censored term
``Phi((T_i - mu_i) / sigma)``. Two estimators share this likelihood:

* :func:`maximum_likelihood` -- the classical baseline: the (position, P0, n)
  that maximize it, sigma fixed, a grid search refined by Nelder-Mead;
* :func:`posterior` -- the posterior over position on a grid, P0 integrated
  under a broad Gaussian prior, n and sigma summed over, a uniform prior over
  the placement area. It yields a mean, a covariance that grows when no
  (n, sigma) explains the powers well, and the fit residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_ndtr, logsumexp

MIN_DISTANCE_M = 200.0
"""Distances are clipped to at least this, m."""


@dataclass(frozen=True)
class LikelihoodParams:
    """Assumptions of the physical likelihood (stored in the model card)."""

    exponents: tuple[float, ...] = (2.0, 2.4, 2.8, 3.2, 3.6, 4.0, 4.4, 4.8)
    """Path-loss exponents summed over."""
    sigmas_db: tuple[float, ...] = (1.5, 3.0, 6.0, 10.0)
    """Shadowing standard deviations summed over, dB (a heavy-tailed mixture)."""
    p0_mean_dbm: float = -40.0
    """Prior mean of the power at 1 km, dBm."""
    p0_sd_db: float = 15.0
    """Prior standard deviation of the power at 1 km, dB."""
    detection_snr_db: float = 0.0
    """A non-detection bounds the signal by the noise plus this, dB."""
    margin_km: float = 110.0
    """The search area is the stations' bounding box grown by this, km."""
    grid_step_m: float = 8_000.0
    """Spacing of the coarse grid, m."""
    fine_points: int = 21
    """Points per side of the fine grid around a tight posterior."""
    ml_sigma_db: float = 6.0
    """Shadowing sigma of the maximum-likelihood baseline, dB."""


def search_grid(stations_enu: np.ndarray, params: LikelihoodParams) -> np.ndarray:
    """(G, 2) coarse grid over the stations' bounding box grown by ``margin_km``, m."""
    m = params.margin_km * 1_000.0
    lo, hi = stations_enu.min(axis=0) - m, stations_enu.max(axis=0) + m
    e = np.arange(lo[0], hi[0] + 1.0, params.grid_step_m)
    n = np.arange(lo[1], hi[1] + 1.0, params.grid_step_m)
    ge, gn = np.meshgrid(e, n)
    return np.stack([ge.ravel(), gn.ravel()], axis=-1)


def _log_distance(points: np.ndarray, stations_enu: np.ndarray) -> np.ndarray:
    """(..., P, S) log10 of the point-station distances in km."""
    d = np.linalg.norm(points[..., :, None, :] - stations_enu, axis=-1)
    return np.log10(np.maximum(d, MIN_DISTANCE_M) / 1_000.0)


def log_likelihood(
    logd: np.ndarray,
    signal_dbm: np.ndarray,
    bound_dbm: np.ndarray,
    detected: np.ndarray,
    censored: np.ndarray,
    params: LikelihoodParams,
) -> np.ndarray:
    """(P, n_exponents, n_sigmas) log likelihood of one scene at P points, P0 integrated out.

    ``logd`` is (P, S); the station vectors are (S,); ``detected`` and ``censored``
    are 0/1 weights (a station absent from the request is neither).
    """
    n = np.asarray(params.exponents)[:, None, None]  # (E, 1, 1)
    model = -10.0 * n * logd[None]  # (E, P, S)
    k = detected.sum()
    sig2 = np.asarray(params.sigmas_db)[:, None, None, None] ** 2  # (Z, 1, 1, 1)
    tau2 = params.p0_sd_db**2
    r = (signal_dbm - model) * detected  # (E, P, S)
    if k > 0:
        rbar = r.sum(-1) / k
        ssr = ((r - rbar[..., None]) ** 2 * detected).sum(-1)  # (E, P)
    else:
        rbar = np.zeros(model.shape[:2])
        ssr = np.zeros(model.shape[:2])
    sig2s = sig2[..., 0]  # (Z, 1, 1)
    ll = (
        -0.5 * k * np.log(sig2s)
        - ssr / (2.0 * sig2s)
        - 0.5 * np.log1p(k * tau2 / sig2s)
        - (rbar - params.p0_mean_dbm) ** 2 / (2.0 * (sig2s / max(k, 1e-9) + tau2)) * (k > 0)
    )  # (Z, E, P)
    p0 = (k * rbar / sig2s + params.p0_mean_dbm / tau2) / (k / sig2s + 1.0 / tau2)
    if censored.any():
        cols = censored > 0
        mu = p0[..., None] + model[None][..., cols]  # (Z, E, P, C)
        z = (bound_dbm[cols] - mu) / np.sqrt(sig2)
        ll = ll + log_ndtr(z).sum(-1)
    return np.moveaxis(ll, 0, -1).transpose(1, 0, 2)  # (P, E, Z)


@dataclass(frozen=True)
class Posterior:
    """Posterior summary of one scene."""

    mean_m: np.ndarray
    """(2,) east/north, m."""
    covariance_m2: np.ndarray
    """(2, 2) east/north covariance, m^2."""
    residual_db: float
    """RMS residual of the detected stations' powers at the best fit, dB."""
    exponent: float
    """Posterior mean path-loss exponent."""
    sigma_db: float
    """Posterior mean shadowing sigma, dB."""
    n_detected: int


def _scene_inputs(
    features: np.ndarray, mask: np.ndarray, params: LikelihoodParams
) -> tuple[np.ndarray, ...]:
    signal = features[:, 0]
    noise = features[:, 1]
    det = features[:, 2] * mask
    cen = (1.0 - features[:, 2]) * mask
    return signal, noise + params.detection_snr_db, det, cen


def _summary(points: np.ndarray, ll: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights over points, and the normalized joint weights over (point, n, sigma)."""
    flat = ll - logsumexp(ll)
    joint = np.exp(flat)
    w = joint.sum(axis=(1, 2))
    mean = w @ points
    d = points - mean
    cov = (d * w[:, None]).T @ d
    return mean, cov, joint


def _log_gaussian(points: np.ndarray, prior: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """(P, 1, 1) log density (up to a constant) of a 2-D Gaussian prior at the points."""
    if prior is None:
        return np.zeros((points.shape[0], 1, 1))
    mean, cov = prior
    d = points - mean
    return -0.5 * np.einsum("pi,ij,pj->p", d, np.linalg.inv(cov), d)[:, None, None]


def posterior(
    features: np.ndarray,
    mask: np.ndarray,
    stations_enu: np.ndarray,
    params: LikelihoodParams | None = None,
    grid: np.ndarray | None = None,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> Posterior:
    """Posterior of one scene from (S, 3) station features and (S,) mask.

    ``prior`` (mean m, covariance m^2) replaces the uniform prior over the
    search area by a Gaussian one, e.g. the network's estimate.
    """
    params = params or LikelihoodParams()
    grid = search_grid(stations_enu, params) if grid is None else grid
    signal, bound, det, cen = _scene_inputs(features, mask, params)
    ll = log_likelihood(_log_distance(grid, stations_enu), signal, bound, det, cen, params)
    ll = ll + _log_gaussian(grid, prior)
    mean, cov, joint = _summary(grid, ll)
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    if sd.max() < 3.0 * params.grid_step_m:
        # A tight posterior: re-evaluate on a fine grid around it.
        half = max(4.0 * sd.max(), 1.5 * params.grid_step_m)
        t = np.linspace(-half, half, params.fine_points)
        fe, fn = np.meshgrid(t, t)
        fine = mean + np.stack([fe.ravel(), fn.ravel()], axis=-1)
        ll = log_likelihood(_log_distance(fine, stations_enu), signal, bound, det, cen, params)
        mean, cov, joint = _summary(fine, ll + _log_gaussian(fine, prior))
        cell = (2.0 * half / (params.fine_points - 1)) ** 2 / 12.0
        cov = cov + np.eye(2) * cell
        grid = fine
    else:
        cov = cov + np.eye(2) * params.grid_step_m**2 / 12.0
    ez = joint.sum(axis=0)  # (E, Z)
    exponent = float(ez.sum(1) @ np.asarray(params.exponents))
    sigma = float(ez.sum(0) @ np.asarray(params.sigmas_db))
    residual = _residual(grid[int(np.argmax(joint.sum(axis=(1, 2))))], signal, det, stations_enu)
    return Posterior(mean, cov, residual, exponent, sigma, int(det.sum()))


def _residual(point: np.ndarray, signal: np.ndarray, det: np.ndarray, st: np.ndarray) -> float:
    """RMS residual (dB) of a log-distance fit of P0 and n to the detected powers at ``point``."""
    k = int(det.sum())
    if k < 3:
        return 0.0
    logd = _log_distance(point[None], st)[0][det > 0]
    a = np.stack([np.ones(k), -10.0 * logd], axis=-1)
    coef, *_ = np.linalg.lstsq(a, signal[det > 0], rcond=None)
    r = signal[det > 0] - a @ coef
    return float(np.sqrt(np.sum(r**2) / (k - 2)))


def posteriors(
    features: np.ndarray,
    mask: np.ndarray,
    stations_enu: np.ndarray,
    params: LikelihoodParams | None = None,
) -> list[Posterior]:
    """:func:`posterior` of each scene of (N, S, 3) features and (N, S) mask."""
    params = params or LikelihoodParams()
    grid = search_grid(stations_enu, params)
    return [
        posterior(f, m, stations_enu, params, grid) for f, m in zip(features, mask, strict=True)
    ]


def _ml_cost(
    q: np.ndarray,
    signal: np.ndarray,
    bound: np.ndarray,
    det: np.ndarray,
    cen: np.ndarray,
    st: np.ndarray,
    sigma: float,
) -> float:
    """Negative log likelihood at q = (east km, north km, n) with P0 profiled out."""
    logd = _log_distance(q[:2][None] * 1_000.0, st)[0]
    model = -10.0 * q[2] * logd
    k = det.sum()
    p0 = ((signal - model) * det).sum() / k
    r = (signal - p0 - model) * det
    nll = (r**2).sum() / (2.0 * sigma**2)
    nll -= (log_ndtr((bound - p0 - model) / sigma) * cen).sum()
    return float(nll)


def maximum_likelihood(
    features: np.ndarray,
    mask: np.ndarray,
    stations_enu: np.ndarray,
    params: LikelihoodParams | None = None,
) -> np.ndarray:
    """(N, 2) maximum-likelihood east/north, m: the classical baseline.

    Position, P0 and the exponent maximize the censored likelihood (sigma fixed
    at ``ml_sigma_db``, no priors): the best point of the coarse grid is
    refined by Nelder-Mead, the exponent held to 1.6-6. With fewer than two
    detections the likelihood has no maximum in position; the estimate is then
    the power-weighted centroid of the detecting (or recording) stations.
    """
    params = params or LikelihoodParams()
    grid = search_grid(stations_enu, params)
    logd_grid = _log_distance(grid, stations_enu)
    sigma = params.ml_sigma_db
    flat = LikelihoodParams(
        exponents=params.exponents, sigmas_db=(sigma,), p0_sd_db=1e4, p0_mean_dbm=0.0
    )
    out = np.zeros((features.shape[0], 2))
    for i in range(features.shape[0]):
        signal, bound, det, cen = _scene_inputs(features[i], mask[i], params)
        if det.sum() < 2:
            use = det if det.sum() > 0 else mask[i]
            w = 10.0 ** (signal / 10.0) * use
            out[i] = (stations_enu * w[:, None]).sum(0) / w.sum()
            continue
        ll = log_likelihood(logd_grid, signal, bound, det, cen, flat)[..., 0]  # (P, E)
        p, e = np.unravel_index(int(np.argmax(ll)), ll.shape)
        start = np.array([grid[p, 0] / 1e3, grid[p, 1] / 1e3, params.exponents[e]])
        fit = minimize(
            _ml_cost,
            start,
            args=(signal, bound, det, cen, stations_enu, sigma),
            method="Nelder-Mead",
            bounds=[(None, None), (None, None), (1.6, 6.0)],
            options={"xatol": 0.05, "fatol": 1e-4, "initial_simplex": _simplex(start)},
        )
        out[i] = fit.x[:2] * 1_000.0
    return out


def _simplex(start: np.ndarray) -> np.ndarray:
    steps = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.3]])
    return start + steps

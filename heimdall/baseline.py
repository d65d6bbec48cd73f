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
from scipy.special import log_ndtr

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


def log_distance(points: np.ndarray, stations_enu: np.ndarray) -> np.ndarray:
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
    ll, rbar = _detected_terms(logd, signal_dbm, detected, params)
    if np.any(censored > 0):
        _add_censored_terms(
            ll, _p0_mean(rbar, detected.sum(), params), logd, bound_dbm, censored, params
        )
    return np.moveaxis(ll, 0, -1).transpose(1, 0, 2)  # (P, E, Z)


def _detected_terms(
    logd: np.ndarray, signal_dbm: np.ndarray, detected: np.ndarray, params: LikelihoodParams
) -> tuple[np.ndarray, np.ndarray]:
    """(Z, E, P) log likelihood of the detected powers, and (E, P) their mean residual.

    The residual of station i is ``w_i (s_i + 10 n logd_i) = a_i + n b_i``, so its
    weighted mean and spread over the stations are polynomials in the exponent n
    whose coefficients are computed once per point, not once per (n, point); the
    (Z, E, P) array is then filled with per-sigma coefficients, in place.
    """
    n = np.asarray(params.exponents)[:, None]  # (E, 1)
    sig2 = np.asarray(params.sigmas_db)[:, None, None] ** 2  # (Z, 1, 1)
    tau2 = params.p0_sd_db**2
    k = detected.sum()
    if k > 0:
        a = signal_dbm * detected
        b = 10.0 * logd * detected  # (P, S)
        a_mean = a.sum() / k
        b_mean = b.sum(-1) / k  # (P,)
        da = a - a_mean
        db = b - b_mean[:, None]
        saa = (da * da * detected).sum()
        sab = (db * (da * detected)).sum(-1)  # (P,)
        sbb = (db * db * detected).sum(-1)
        rbar = a_mean + n * b_mean  # (E, P)
        ssr = saa + n * (2.0 * sab + n * sbb)
    else:
        rbar = np.zeros((n.shape[0], logd.shape[0]))
        ssr = rbar
    level = -0.5 * k * np.log(sig2) - 0.5 * np.log1p(k * tau2 / sig2)  # (Z, 1, 1)
    ll = np.multiply(ssr, -1.0 / (2.0 * sig2))  # (Z, E, P)
    if k > 0:
        prior_misfit = (rbar - params.p0_mean_dbm) ** 2
        ll -= prior_misfit * (1.0 / (2.0 * (sig2 / k + tau2)))
    ll += level
    return ll, rbar


def _p0_mean(rbar: np.ndarray, k: float, params: LikelihoodParams) -> np.ndarray:
    """(Z, E, P) posterior mean of P0 given the (E, P) mean residual of ``k`` detections, dBm."""
    sig2 = np.asarray(params.sigmas_db)[:, None, None] ** 2  # (Z, 1, 1)
    tau2 = params.p0_sd_db**2
    precision = k / sig2 + 1.0 / tau2
    p0 = np.multiply(rbar, k / sig2 / precision)
    p0 += params.p0_mean_dbm / tau2 / precision
    return p0


def _add_censored_terms(
    ll: np.ndarray,
    p0: np.ndarray,
    logd: np.ndarray,
    bound_dbm: np.ndarray,
    censored: np.ndarray,
    params: LikelihoodParams,
) -> None:
    """Add log Phi((T_c - mu_c) / sigma) of each censored station to the (Z, E, P) ``ll``.

    One station at a time, in place: the (Z, E, P) arrays stay contiguous, where a
    trailing station axis would make every step (and the sum over it) strided.
    """
    n = np.asarray(params.exponents)[:, None]  # (E, 1)
    sigma = np.asarray(params.sigmas_db)[:, None, None]  # (Z, 1, 1)
    z = np.empty_like(ll)
    for c in np.flatnonzero(censored > 0):
        headroom = bound_dbm[c] + 10.0 * n * logd[:, c]  # (E, P): T_c - model_c
        np.subtract(headroom, p0, out=z)
        z /= sigma
        ll += log_ndtr(z, out=z)


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
    top = ll.max()
    joint = np.exp(ll - top)
    joint /= joint.sum()
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
    grid_logd: np.ndarray | None = None,
) -> Posterior:
    """Posterior of one scene from (S, 3) station features and (S,) mask.

    ``prior`` (mean m, covariance m^2) replaces the uniform prior over the
    search area by a Gaussian one, e.g. the network's estimate. ``grid_logd``
    is ``log_distance(grid, stations_enu)`` when the caller keeps it across scenes.
    """
    params = params or LikelihoodParams()
    grid = search_grid(stations_enu, params) if grid is None else grid
    if grid_logd is None:
        grid_logd = log_distance(grid, stations_enu)
    signal, bound, det, cen = _scene_inputs(features, mask, params)
    ll = log_likelihood(grid_logd, signal, bound, det, cen, params)
    mean, cov, joint = _summary(grid, ll + _log_gaussian(grid, prior))
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    if sd.max() < 3.0 * params.grid_step_m:
        # A tight posterior: re-evaluate on a fine grid around it.
        half = max(4.0 * sd.max(), 1.5 * params.grid_step_m)
        t = np.linspace(-half, half, params.fine_points)
        fe, fn = np.meshgrid(t, t)
        fine = mean + np.stack([fe.ravel(), fn.ravel()], axis=-1)
        ll = log_likelihood(log_distance(fine, stations_enu), signal, bound, det, cen, params)
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
    logd = log_distance(point[None], st)[0][det > 0]
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
    logd = log_distance(grid, stations_enu)
    return [
        posterior(f, m, stations_enu, params, grid, grid_logd=logd)
        for f, m in zip(features, mask, strict=True)
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
    logd = log_distance(q[:2][None] * 1_000.0, st)[0]
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
    logd_grid = log_distance(grid, stations_enu)
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

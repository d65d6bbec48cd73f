"""The fast per-request compute gives the answers of the straightforward one.

Each reference below is the plain implementation the serving code replaced
(scipy's stft and filter design per station, the likelihood over (E, P, S)
arrays with log_ndtr everywhere, logsumexp, per-vertex geodesy), kept here so a
change to the fast path that moves an answer fails a test. The end-to-end test
compares every field of the result documents of 300 simulated requests (all
stations, non-detecting stations, 3-4 stations, several sample rates), single
and batched.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache
from typing import Any

import numpy as np
import pytest
from scipy import signal
from scipy.special import log_ndtr, logsumexp

from heimdall import baseline, geo
from heimdall.features import (
    POWER_FLOOR,
    FeatureParams,
    band_matrix,
    build_features,
    power_spectrogram,
    resample,
    station_features,
)
from heimdall.iq import DecodedRequest, decode_request
from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME, ModelCard, ModelIdentity
from heimdall.registry import shipped_model_dir
from heimdall.runtime import (
    CONFIDENCES,
    CovarianceModel,
    Localizer,
    _covariance,
    localization_result,
)
from heimdall.simulate.requests import simulated_request
from heimdall.stations import load_network

RTOL = 1e-6
P = FeatureParams()


# ---- references: the straightforward implementations -------------------------------------


def ref_resample(iq: np.ndarray, from_hz: float, to_hz: float) -> np.ndarray:
    if from_hz == to_hz:
        return np.asarray(iq, dtype=np.complex64)
    ratio = Fraction(to_hz / from_hz).limit_denominator(1000)
    x = np.asarray(iq, dtype=np.complex64)
    up, down = ratio.numerator, ratio.denominator
    out = np.empty((*x.shape[:-1], -(-x.shape[-1] * up // down)), dtype=np.complex64)
    out.real = signal.resample_poly(x.real, up, down, axis=-1)
    out.imag = signal.resample_poly(x.imag, up, down, axis=-1)
    return out


def ref_power_spectrogram(iq: np.ndarray, params: FeatureParams) -> np.ndarray:
    _, _, z = signal.stft(
        iq,
        fs=params.sample_rate_hz,
        window="hann",
        nperseg=params.n_fft,
        noverlap=params.n_fft - params.hop,
        nfft=params.n_fft,
        return_onesided=False,
        boundary=None,
        padded=False,
        detrend=False,
        scaling="psd",
        axis=-1,
    )
    return (np.abs(z) ** 2) * (params.sample_rate_hz / params.n_fft)


def ref_build_features(
    recordings: dict[str, np.ndarray],
    slots: tuple[str, ...],
    calibration_db: dict[str, float],
    params: FeatureParams,
    sample_rate_hz: float,
) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((len(slots), params.n_features))
    mask = np.zeros(len(slots), dtype=np.float32)
    for i, sid in enumerate(slots):
        iq = recordings.get(sid)
        if iq is None:
            continue
        y = ref_resample(iq, sample_rate_hz, params.sample_rate_hz)
        power = ref_power_spectrogram(y, params).mean(axis=-1)
        bands = 10.0 * np.log10(power @ band_matrix(params).T + POWER_FLOOR)
        x[i] = station_features(bands + calibration_db[sid], params)
        mask[i] = 1.0
    return x, mask


def ref_log_distance(points: np.ndarray, stations_enu: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(points[..., :, None, :] - stations_enu, axis=-1)
    return np.log10(np.maximum(d, baseline.MIN_DISTANCE_M) / 1_000.0)


def ref_log_likelihood(logd, signal_dbm, bound_dbm, detected, censored, params):
    n = np.asarray(params.exponents)[:, None, None]
    model = -10.0 * n * logd[None]
    k = detected.sum()
    sig2 = np.asarray(params.sigmas_db)[:, None, None, None] ** 2
    tau2 = params.p0_sd_db**2
    r = (signal_dbm - model) * detected
    if k > 0:
        rbar = r.sum(-1) / k
        ssr = ((r - rbar[..., None]) ** 2 * detected).sum(-1)
    else:
        rbar = np.zeros(model.shape[:2])
        ssr = np.zeros(model.shape[:2])
    sig2s = sig2[..., 0]
    ll = (
        -0.5 * k * np.log(sig2s)
        - ssr / (2.0 * sig2s)
        - 0.5 * np.log1p(k * tau2 / sig2s)
        - (rbar - params.p0_mean_dbm) ** 2 / (2.0 * (sig2s / max(k, 1e-9) + tau2)) * (k > 0)
    )
    p0 = (k * rbar / sig2s + params.p0_mean_dbm / tau2) / (k / sig2s + 1.0 / tau2)
    if censored.any():
        cols = censored > 0
        mu = p0[..., None] + model[None][..., cols]
        z = (bound_dbm[cols] - mu) / np.sqrt(sig2)
        ll = ll + log_ndtr(z).sum(-1)
    return np.moveaxis(ll, 0, -1).transpose(1, 0, 2)


def ref_summary(points, ll):
    joint = np.exp(ll - logsumexp(ll))
    w = joint.sum(axis=(1, 2))
    mean = w @ points
    d = points - mean
    return mean, (d * w[:, None]).T @ d, joint


def ref_log_gaussian(points, prior):
    if prior is None:
        return np.zeros((points.shape[0], 1, 1))
    mean, cov = prior
    d = points - mean
    return -0.5 * np.einsum("pi,ij,pj->p", d, np.linalg.inv(cov), d)[:, None, None]


def ref_posterior(features, mask, stations_enu, params, prior=None) -> baseline.Posterior:
    grid = baseline.search_grid(stations_enu, params)
    signal_dbm, bound, det, cen = baseline._scene_inputs(features, mask, params)
    ll = ref_log_likelihood(
        ref_log_distance(grid, stations_enu), signal_dbm, bound, det, cen, params
    )
    mean, cov, joint = ref_summary(grid, ll + ref_log_gaussian(grid, prior))
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    if sd.max() < 3.0 * params.grid_step_m:
        half = max(4.0 * sd.max(), 1.5 * params.grid_step_m)
        t = np.linspace(-half, half, params.fine_points)
        fe, fn = np.meshgrid(t, t)
        fine = mean + np.stack([fe.ravel(), fn.ravel()], axis=-1)
        ll = ref_log_likelihood(
            ref_log_distance(fine, stations_enu), signal_dbm, bound, det, cen, params
        )
        mean, cov, joint = ref_summary(fine, ll + ref_log_gaussian(fine, prior))
        cov = cov + np.eye(2) * (2.0 * half / (params.fine_points - 1)) ** 2 / 12.0
        grid = fine
    else:
        cov = cov + np.eye(2) * params.grid_step_m**2 / 12.0
    ez = joint.sum(axis=0)
    exponent = float(ez.sum(1) @ np.asarray(params.exponents))
    sigma = float(ez.sum(0) @ np.asarray(params.sigmas_db))
    best = grid[int(np.argmax(joint.sum(axis=(1, 2))))]
    residual = baseline._residual(best, signal_dbm, det, stations_enu)
    return baseline.Posterior(mean, cov, residual, exponent, sigma, int(det.sum()))


def ref_ellipse_ring(center_e, center_n, ellipse, lat0, lon0, n_points=72):
    """The ring vertex by vertex: plane point, then the geodetic conversion of that one point."""
    th = math.radians(ellipse.orientation_deg)
    ring = []
    for i in range(n_points):
        t = 2.0 * math.pi * i / n_points
        e = (
            center_e
            + ellipse.semi_major_m * math.cos(t) * math.sin(th)
            - ellipse.semi_minor_m * math.sin(t) * math.cos(th)
        )
        n = (
            center_n
            + ellipse.semi_major_m * math.cos(t) * math.cos(th)
            + ellipse.semi_minor_m * math.sin(t) * math.sin(th)
        )
        lat, lon = geo.enu_to_geodetic(e, n, lat0, lon0)
        ring.append([round(lon, 7), round(lat, 7)])
    return [*ring, ring[0]]


# ---- the serving side -------------------------------------------------------------------


@cache
def _localizer() -> Localizer:
    folder = shipped_model_dir()
    card = ModelCard.load(folder / CARD_FILENAME)
    identity = ModelIdentity("heimdall-localizer", "reference", None)
    return Localizer(folder / MODEL_FILENAME, card, load_network(), identity)


@cache
def _requests() -> tuple[DecodedRequest, ...]:
    """300 decoded requests: 200 of the workload's recipe, 100 with 3-4 stations at other rates."""
    card = _localizer().card
    rng = np.random.default_rng(7)
    bodies = []
    for seed in range(200):
        bodies.append(simulated_request(seed, 2048 + 1024 * (seed % 3)))
    for i in range(100):
        stations = rng.choice(card.slots, size=3 + i % 2, replace=False).tolist()
        rate = (48_000.0, 16_000.0, 24_000.0, 96_000.0)[i % 4]
        bodies.append(simulated_request(1_000 + i, 2048, stations=stations, sample_rate_hz=rate))
    decoded = []
    for body in bodies:
        body.pop("truth")
        decoded.append(
            decode_request(body, stations=card.slots, band_mhz=card.band_mhz, min_stations=1)
        )
    return tuple(decoded)


def _reference_documents(requests: tuple[DecodedRequest, ...], batch: int) -> list[dict[str, Any]]:
    """Result documents through the reference features, posterior and ellipse rings.

    The network runs on ``batch`` requests at a time, as the path compared with
    does: onnxruntime may round a row differently in another batch.
    """
    loc = _localizer()
    card = loc.card
    pairs = [
        ref_build_features(
            r.as_mapping(), card.slots, loc.calibration, card.features, r.sample_rate_hz
        )
        for r in requests
    ]
    x, mask = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    runs = [loc.run(x[i : i + batch], mask[i : i + batch]) for i in range(0, len(x), batch)]
    position = np.concatenate([r[0] for r in runs])
    uncertainty = np.concatenate([r[1] for r in runs])
    posts = [
        _cached_ref_posterior(xi, mi, p, _covariance(u) * loc.prior_scale)
        for xi, mi, p, u in zip(x, mask, position, uncertainty, strict=True)
    ]
    means = np.array([p.mean_m for p in posts])
    factor = CovarianceModel.from_fusion(card.fusion).factor(
        geo.hull_distance_m(means, loc.stations_enu), np.array([p.sigma_db for p in posts])
    )
    covs = np.array([p.covariance_m2 for p in posts]) * factor[:, None, None]
    docs = []
    for item in loc.localize(means, covs, posts, mask, x):
        doc = localization_result(item, card, loc.identity, inference_time_ms=0.0)
        model = CovarianceModel.from_fusion(card.fusion)
        for feature, confidence in zip(doc["geojson"]["features"][1:], CONFIDENCES, strict=True):
            ell = geo.ellipse_from_covariance(
                item.covariance, confidence, model.ellipse_scale(confidence)
            )
            origin = (card.origin_latitude, card.origin_longitude)
            ahead = geo.enu_to_geodetic(item.east_m, item.north_m + 1_000.0, *origin)
            de, dn = geo.geodetic_to_enu(*ahead, item.latitude, item.longitude)
            turn = math.degrees(math.atan2(de, dn))
            local = geo.Ellipse(
                confidence, ell.semi_major_m, ell.semi_minor_m, ell.orientation_deg + turn
            )
            feature["geometry"]["coordinates"] = [
                ref_ellipse_ring(0.0, 0.0, local, item.latitude, item.longitude)
            ]
        docs.append(doc)
    return docs


_REF_POSTERIORS: dict[bytes, baseline.Posterior] = {}


def _cached_ref_posterior(x, mask, mean, cov) -> baseline.Posterior:
    """:func:`ref_posterior` of one scene, remembered by its exact inputs (it is slow)."""
    key = b"".join(
        np.ascontiguousarray(a, dtype=np.float64).tobytes() for a in (x, mask, mean, cov)
    )
    if key not in _REF_POSTERIORS:
        loc = _localizer()
        _REF_POSTERIORS[key] = ref_posterior(
            x, mask, loc.stations_enu, loc.likelihood, prior=(mean, cov)
        )
    return _REF_POSTERIORS[key]


def _assert_close(ours: Any, ref: Any, path: str = "") -> None:
    if isinstance(ref, dict):
        assert ours.keys() == ref.keys(), path
        for key in ref:
            _assert_close(ours[key], ref[key], f"{path}/{key}")
    elif isinstance(ref, list):
        assert len(ours) == len(ref), path
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            _assert_close(a, b, f"{path}[{i}]")
    elif isinstance(ref, float):
        assert ours == pytest.approx(ref, rel=RTOL, abs=1e-12), path
    else:
        assert ours == ref, path


# ---- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, np.float64])
@pytest.mark.parametrize("shape", [(4096,), (7, 2048), (2, 3, 777)])
def test_power_spectrogram_is_scipy_stft_bit_for_bit(dtype, shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape) + (1j * rng.normal(size=shape) if dtype != np.float64 else 0.0)
    x = x.astype(dtype)
    ours, ref = power_spectrogram(x, P), ref_power_spectrogram(x, P)
    assert ours.dtype == ref.dtype and np.array_equal(ours, ref)


@pytest.mark.parametrize("rate", [16_000.0, 22_050.0, 24_000.0, 48_000.0, 96_000.0])
def test_resample_is_scipy_resample_poly_bit_for_bit(rate):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(5, 3000)) + 1j * rng.normal(size=(5, 3000))).astype(np.complex64)
    assert np.array_equal(resample(x, rate, P.sample_rate_hz), ref_resample(x, rate, 16_000.0))


def test_features_of_a_request_equal_one_station_at_a_time_bit_for_bit():
    loc = _localizer()
    card = loc.card
    for r in _requests()[::5]:
        args = (r.as_mapping(), card.slots, loc.calibration, card.features, r.sample_rate_hz)
        ours, ref = build_features(*args), ref_build_features(*args)
        assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])


def test_log_likelihood_equals_the_broadcast_formula():
    loc = _localizer()
    params = loc.likelihood
    rng = np.random.default_rng(3)
    logd = ref_log_distance(loc.grid, loc.stations_enu)
    s = len(loc.stations_enu)
    for _ in range(20):
        det = (rng.random(s) < 0.6).astype(float)
        cen = (1.0 - det) * (rng.random(s) < 0.7)
        signal_dbm = rng.uniform(-130.0, -70.0, s)
        bound = rng.uniform(-135.0, -115.0, s)
        ours = baseline.log_likelihood(logd, signal_dbm, bound, det, cen, params)
        ref = ref_log_likelihood(logd, signal_dbm, bound, det, cen, params)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_posterior_equals_the_reference_with_and_without_a_prior():
    loc = _localizer()
    params = loc.likelihood
    rng = np.random.default_rng(4)
    s = len(loc.stations_enu)
    for i in range(30):
        truth = rng.uniform(-80_000.0, 80_000.0, 2)
        d_km = np.linalg.norm(loc.stations_enu - truth, axis=1) / 1_000.0
        power = -40.0 - 10.0 * rng.uniform(2.2, 4.0) * np.log10(d_km) + rng.normal(0, 4, s)
        noise = rng.uniform(-130.0, -118.0, s)
        det = (power >= noise).astype(float)
        x = np.stack([np.where(det > 0, power, noise - 20.0), noise, det], axis=-1)
        mask = (rng.random(s) < 0.85).astype(float)
        prior = None if i % 3 == 0 else (truth + rng.normal(0, 5e3, 2), np.diag([4e7, 9e7]))
        ours = baseline.posterior(x, mask, loc.stations_enu, params, prior=prior)
        ref = ref_posterior(x, mask, loc.stations_enu, params, prior=prior)
        np.testing.assert_allclose(ours.mean_m, ref.mean_m, rtol=RTOL)
        np.testing.assert_allclose(ours.covariance_m2, ref.covariance_m2, rtol=RTOL, atol=1e-3)
        for field in ("residual_db", "exponent", "sigma_db", "n_detected"):
            assert getattr(ours, field) == pytest.approx(getattr(ref, field), rel=RTOL), field


def test_result_documents_of_300_requests_equal_the_reference_single_and_batched():
    loc = _localizer()
    requests = _requests()
    single = [loc.predict_results([r])[0] for r in requests]
    batched = [
        doc
        for i in range(0, len(requests), 40)
        for doc in loc.predict_results(requests[i : i + 40])
    ]
    for ours, batch in ((single, 1), (batched, 40)):
        ref = _reference_documents(requests, batch)
        for i, (doc, expected) in enumerate(zip(ours, ref, strict=True)):
            doc.pop("inference_time_ms")
            expected.pop("inference_time_ms")
            _assert_close(doc, expected, f"batch {batch}, request {i}")

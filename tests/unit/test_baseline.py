"""The physical likelihood: maximum-likelihood baseline and grid posterior."""

import numpy as np

from heimdall.baseline import LikelihoodParams, maximum_likelihood, posterior, posteriors
from heimdall.simulate.scenes import station_enu
from heimdall.stations import load_network

NET = load_network()
ST = station_enu(NET)


def _scene(truth, exponent=3.0, p0=-40.0, noise_dbm=-128.0, rng=None, sigma=0.0):
    d_km = np.linalg.norm(ST - truth, axis=1) / 1000.0
    s = p0 - 10 * exponent * np.log10(d_km)
    if rng is not None:
        s = s + rng.normal(0.0, sigma, s.shape)
    det = (s >= noise_dbm).astype(float)
    x = np.stack([np.where(det > 0, s, noise_dbm - 10), np.full_like(s, noise_dbm), det], -1)
    return x, np.ones(len(ST))


def test_noise_free_scene_is_localized_exactly_by_maximum_likelihood():
    truth = np.array([12_000.0, -8_000.0])
    x, mask = _scene(truth, exponent=3.3)
    est = maximum_likelihood(x[None], mask[None], ST)
    assert np.linalg.norm(est[0] - truth) < 500.0


def test_posterior_of_a_clean_scene_is_tight_and_centred():
    truth = np.array([-20_000.0, 15_000.0])
    x, mask = _scene(truth, exponent=2.8)
    post = posterior(x, mask, ST)
    assert np.linalg.norm(post.mean_m - truth) < 2_000.0
    assert np.sqrt(np.linalg.eigvalsh(post.covariance_m2).max()) < 12_000.0
    assert post.residual_db < 0.5 and post.n_detected == len(ST)


def test_the_posterior_widens_when_the_powers_fit_no_physical_explanation():
    truth = np.array([0.0, 0.0])
    clean, mask = _scene(truth)
    noisy, _ = _scene(truth, rng=np.random.default_rng(0), sigma=12.0)
    a, b = posterior(clean, mask, ST), posterior(noisy, mask, ST)
    assert b.residual_db > a.residual_db + 3.0
    assert np.linalg.det(b.covariance_m2) > 10 * np.linalg.det(a.covariance_m2)


def test_non_detections_are_information():
    """A station that heard nothing pushes the estimate away from itself."""
    truth = np.array([60_000.0, -60_000.0])
    x, mask = _scene(truth, noise_dbm=-95.0)
    assert 2 <= x[:, 2].sum() < len(ST)
    with_bounds = posterior(x, mask, ST)
    only_detected = posterior(x, mask * x[:, 2], ST)
    err = [np.linalg.norm(p.mean_m - truth) for p in (with_bounds, only_detected)]
    assert err[0] < err[1]


def test_posteriors_match_one_by_one():
    x, mask = _scene(np.array([5_000.0, 5_000.0]))
    many = posteriors(np.stack([x, x]), np.stack([mask, mask]), ST, LikelihoodParams())
    np.testing.assert_allclose(many[0].mean_m, posterior(x, mask, ST).mean_m)

"""Simulator: propagation known answers, reproducibility, calibration convention, families."""

import numpy as np
import pytest

from heimdall.geo import hull_distance_m
from heimdall.simulate import SimulationParams, sample_scenes, synthesize_iq
from heimdall.simulate.families import CALIBRATION, EVALUATION, TRAINING
from heimdall.simulate.propagation import (
    dual_slope_loss_db,
    free_space_loss_db,
    hata_loss_db,
    log_distance_loss_db,
    noise_floor_dbm,
    terrain_shadowing_db,
)
from heimdall.simulate.scenes import placement_box, station_enu
from heimdall.stations import load_network

NET = load_network()
FS = 16_000.0


def test_free_space_loss_known_value():
    # FSPL(dB) = 20 log10(d_km) + 20 log10(f_MHz) + 32.45
    assert float(free_space_loss_db(1000.0, 145.0)) == pytest.approx(
        32.45 + 20 * np.log10(145), abs=0.01
    )
    assert float(free_space_loss_db(10_000.0, 145.0)) - float(
        free_space_loss_db(1000.0, 145.0)
    ) == pytest.approx(20.0)


def test_log_distance_loss_is_anchored_at_d0_and_grows_10n_per_decade():
    p = SimulationParams()
    at_d0 = float(log_distance_loss_db(np.array(1000.0), 3.0, p))
    assert at_d0 == pytest.approx(float(free_space_loss_db(1000.0, 145.0)))
    decade = log_distance_loss_db(np.array(10_000.0), 3.0, p) - at_d0
    assert float(decade) == pytest.approx(30.0)


def test_hata_slope_depends_on_the_receiver_height():
    d = np.array([10_000.0, 100_000.0])
    low = hata_loss_db(d, np.array(1.5), np.array(10.0), 145.0)
    high = hata_loss_db(d, np.array(1.5), np.array(40.0), 145.0)
    assert float(low[1] - low[0]) == pytest.approx(44.9 - 6.55 * np.log10(10.0))
    assert float(high[1] - high[0]) == pytest.approx(44.9 - 6.55 * np.log10(40.0))


def test_dual_slope_is_free_space_before_the_breakpoint():
    h_t, h_r = np.array(10.0), np.array(30.0)
    bp = 4 * 10.0 * 30.0 / (299_792_458.0 / 145e6)
    near = dual_slope_loss_db(np.array(bp / 2), h_t, h_r, np.array(4.0), 145.0)
    assert float(near) == pytest.approx(float(free_space_loss_db(bp / 2, 145.0)))
    far = dual_slope_loss_db(np.array([bp * 10, bp * 100]), h_t, h_r, np.array(4.0), 145.0)
    assert float(far[1] - far[0]) == pytest.approx(40.0)


def test_noise_floor_is_kt_b_nf():
    assert float(noise_floor_dbm(48_000.0, 6.0)) == pytest.approx(-174 + 10 * np.log10(48_000) + 6)


def test_scenes_are_seeded_and_reproducible():
    a = sample_scenes(np.random.default_rng(5), 50, NET, TRAINING)
    b = sample_scenes(np.random.default_rng(5), 50, NET, TRAINING)
    np.testing.assert_array_equal(a.rx_power_dbm, b.rx_power_dbm)
    iq_a = synthesize_iq(np.random.default_rng(1), a, NET, TRAINING, FS, 1024)
    iq_b = synthesize_iq(np.random.default_rng(1), b, NET, TRAINING, FS, 1024)
    assert iq_a.tobytes() == iq_b.tobytes()


def test_placement_covers_inside_and_up_to_100_km_outside_the_hull():
    s = sample_scenes(np.random.default_rng(2), 3000, NET, TRAINING)
    d = hull_distance_m(np.stack([s.tx_east_m, s.tx_north_m], -1), station_enu(NET))
    assert d.max() <= 100_000.0 + 1.0
    assert 0.2 < (d > 30_000.0).mean() < 0.5, "a good share must lie well outside the network"
    assert (d < 0).mean() > 0.15
    assert TRAINING.min_stations <= s.present.sum(axis=1).min()
    out = sample_scenes(np.random.default_rng(2), 500, NET, EVALUATION["outside"])
    d = hull_distance_m(np.stack([out.tx_east_m, out.tx_north_m], -1), station_enu(NET))
    assert d.min() >= 30_000.0 - 1.0 and d.max() <= 100_000.0 + 1.0


def test_sparse_family_keeps_three_or_four_stations():
    s = sample_scenes(np.random.default_rng(3), 500, NET, EVALUATION["sparse"])
    assert set(np.unique(s.present.sum(axis=1))) <= {3, 4}


def test_iq_power_follows_the_calibration_convention():
    """received dBm = IQ dBFS + calibration, signal plus the noise of the whole sampled band."""
    p = TRAINING.but(station_presence=(1.0, 1.0))
    rng = np.random.default_rng(9)
    s = sample_scenes(rng, 200, NET, p)
    iq = synthesize_iq(rng, s, NET, p, 48_000.0, 4096)
    cal = NET.calibration(NET.ids)
    measured_dbm = 10 * np.log10((np.abs(iq) ** 2).mean(axis=-1)) + cal
    expected = 10 * np.log10(10 ** (s.rx_power_dbm / 10) + 10 ** (s.noise_floor_dbm(48e3) / 10))
    np.testing.assert_allclose(measured_dbm, expected, atol=0.5)


def test_station_enu_places_torino_west_of_milano():
    enu = station_enu(NET)
    ids = list(NET.ids)
    assert enu[ids.index("torino"), 0] < enu[ids.index("milano-baggio"), 0]
    assert enu[ids.index("genova"), 1] < enu[ids.index("milano-baggio"), 1]
    e0, _, _, _ = placement_box(NET, 10.0)
    assert e0 == pytest.approx(enu[:, 0].min() - 10_000.0)


@pytest.mark.parametrize("kernel", ["gaussian", "exponential"])
def test_terrain_is_drawn_per_scene_correlated_and_of_the_stated_spread(kernel):
    rng = np.random.default_rng(0)
    n = 4000
    pos = np.zeros((n, 2))
    st = station_enu(NET)
    sigma = np.full(n, 6.0)
    corr = np.full(n, 10_000.0)
    t = terrain_shadowing_db(rng, pos, st, sigma, corr, kernel)
    # The same place in different scenes sees different terrain: no fixed map.
    assert abs(t.std() - 6.0) < 0.5
    # Within one scene, near points agree better than far ones.
    rng = np.random.default_rng(1)
    a = terrain_shadowing_db(rng, pos, st, sigma, corr, kernel)
    rng = np.random.default_rng(1)
    b = terrain_shadowing_db(rng, pos + np.array([500.0, 0.0]), st, sigma, corr, kernel)
    rng = np.random.default_rng(1)
    c = terrain_shadowing_db(rng, pos + np.array([60_000.0, 0.0]), st, sigma, corr, kernel)
    assert np.abs(a - b).mean() < np.abs(a - c).mean()


def test_calibration_and_second_law_families_differ_from_training():
    assert CALIBRATION.terrain_kernel != TRAINING.terrain_kernel
    assert set(EVALUATION["second-law"].laws).isdisjoint(TRAINING.laws)


def test_simulated_request_is_valid_reproducible_and_carries_its_truth():
    from heimdall.iq import decode_request
    from heimdall.simulate.requests import simulated_request

    a = simulated_request(4, 1024)
    assert a == simulated_request(4, 1024)
    req = decode_request(a, stations=NET.ids, band_mhz=(144.0, 146.0), min_stations=3)
    pairs = simulated_request(4, 1024, "pairs")
    again = decode_request(pairs, stations=NET.ids, band_mhz=(144.0, 146.0), min_stations=3)
    assert req.digest() == again.digest()
    assert {"latitude", "longitude", "tx_power_dbm"} <= set(a["truth"])
    only = simulated_request(4, 1024, stations={"torino", "genova", "giaveno"})
    assert sorted(r["station"] for r in only["receivers"]) == ["genova", "giaveno", "torino"]

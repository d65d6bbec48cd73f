"""Simulator: propagation known answers, reproducibility, calibration convention."""

import numpy as np
import pytest

from heimdall.features import FeatureParams, log_mel_dbfs
from heimdall.simulate import SimulationParams, sample_scenes, synthesize_iq
from heimdall.simulate.propagation import free_space_loss_db, noise_floor_dbm, path_loss_db
from heimdall.simulate.scenes import placement_box, station_enu
from heimdall.stations import load_network

NET = load_network()
FS = FeatureParams().sample_rate_hz


def test_free_space_loss_known_value():
    # FSPL(dB) = 20 log10(d_km) + 20 log10(f_MHz) + 32.45
    assert float(free_space_loss_db(1000.0, 145.0)) == pytest.approx(
        32.45 + 20 * np.log10(145), abs=0.01
    )
    assert float(free_space_loss_db(10_000.0, 145.0)) - float(
        free_space_loss_db(1000.0, 145.0)
    ) == pytest.approx(20.0)


def test_path_loss_is_anchored_at_d0_and_grows_10n_per_decade():
    p = SimulationParams(path_loss_exponent=3.0)
    assert float(path_loss_db(1000.0, p)) == pytest.approx(float(free_space_loss_db(1000.0, 145.0)))
    assert float(path_loss_db(10_000.0, p) - path_loss_db(1000.0, p)) == pytest.approx(30.0)
    assert float(path_loss_db(1.0, p)) == float(path_loss_db(p.min_distance_m, p))


def test_noise_floor_is_kt_b_nf():
    assert noise_floor_dbm(48_000.0, SimulationParams(noise_figure_db=6.0)) == pytest.approx(
        -174 + 10 * np.log10(48_000) + 6
    )


def test_scenes_are_seeded_and_reproducible():
    a = sample_scenes(np.random.default_rng(5), 50, NET, SimulationParams(), FS)
    b = sample_scenes(np.random.default_rng(5), 50, NET, SimulationParams(), FS)
    np.testing.assert_array_equal(a.rx_power_dbm, b.rx_power_dbm)
    iq_a = synthesize_iq(np.random.default_rng(1), a, NET, SimulationParams(), FS, 1024)
    iq_b = synthesize_iq(np.random.default_rng(1), b, NET, SimulationParams(), FS, 1024)
    assert iq_a.tobytes() == iq_b.tobytes()


def test_transmitters_stay_in_the_box_and_every_scene_has_enough_stations():
    p = SimulationParams()
    s = sample_scenes(np.random.default_rng(2), 2000, NET, p, FS)
    e0, e1, n0, n1 = placement_box(NET, p)
    assert s.tx_east_m.min() >= e0 and s.tx_east_m.max() <= e1
    assert s.tx_north_m.min() >= n0 and s.tx_north_m.max() <= n1
    assert s.present.sum(axis=1).min() >= p.min_stations
    assert 0.05 < (~s.detected).mean() < 0.95, "some links must fall below detection"


def test_iq_power_follows_the_calibration_convention():
    """received dBm = IQ dBFS + calibration: a strong, detected link measures its own power."""
    p = SimulationParams(shadowing_sigma_db=0.0, station_presence=1.0)
    rng = np.random.default_rng(9)
    s = sample_scenes(rng, 200, NET, p, FS)
    iq = synthesize_iq(rng, s, NET, p, FS, 4096)
    cal = NET.calibration(NET.ids)
    measured_dbm = 10 * np.log10((np.abs(iq) ** 2).mean(axis=-1)) + cal
    strong = s.rx_power_dbm - s.noise_floor_dbm > 30
    assert strong.sum() > 20
    np.testing.assert_allclose(measured_dbm[strong], s.rx_power_dbm[strong], atol=0.1)
    # Below detection a station hears only its noise floor.
    weak = ~s.detected
    np.testing.assert_allclose(measured_dbm[weak], s.noise_floor_dbm, atol=0.5)
    # The features agree with the raw power (summed over the mel bands, within the filter edges).
    total = 10 * np.log10((10 ** (log_mel_dbfs(iq, FeatureParams()) / 10)).sum(-1)) + cal
    np.testing.assert_allclose(total[strong], s.rx_power_dbm[strong], atol=0.1)


def test_station_enu_places_torino_west_of_milano():
    enu = station_enu(NET)
    ids = list(NET.ids)
    assert enu[ids.index("torino"), 0] < enu[ids.index("milano-baggio"), 0]
    assert enu[ids.index("genova"), 1] < enu[ids.index("milano-baggio"), 1]


def test_terrain_maps_are_fixed_correlated_and_of_the_stated_spread():
    from heimdall.simulate.propagation import terrain_shadowing_db

    p = SimulationParams()
    rng = np.random.default_rng(0)
    east, north = rng.uniform(-90e3, 90e3, 20_000), rng.uniform(-80e3, 80e3, 20_000)
    t = terrain_shadowing_db(east, north, 7, p)
    np.testing.assert_array_equal(t, terrain_shadowing_db(east, north, 7, p))
    assert np.all(np.abs(t.std(axis=0) - p.terrain_sigma_db) < 1.5)
    # Near points agree, far points do not.
    near = terrain_shadowing_db(np.array([0.0, 500.0]), np.zeros(2), 7, p)
    far = terrain_shadowing_db(np.array([0.0, 80_000.0]), np.zeros(2), 7, p)
    assert np.abs(near[0] - near[1]).mean() < np.abs(far[0] - far[1]).mean()
    other = terrain_shadowing_db(east[:100], north[:100], 7, SimulationParams(terrain_seed=1))
    assert not np.allclose(other, t[:100])


def test_simulated_request_is_valid_reproducible_and_carries_its_truth():
    from heimdall.iq import decode_request
    from heimdall.simulate.requests import simulated_request

    a = simulated_request(4, 1024)
    assert a == simulated_request(4, 1024)
    req = decode_request(
        a, stations=NET.ids, sample_rate_hz=FS, band_mhz=(144.0, 146.0), min_stations=3
    )
    pairs = simulated_request(4, 1024, "pairs")
    again = decode_request(
        pairs, stations=NET.ids, sample_rate_hz=FS, band_mhz=(144.0, 146.0), min_stations=3
    )
    assert req.digest() == again.digest()
    assert {"latitude", "longitude", "tx_power_dbm"} <= set(a["truth"])
    only = simulated_request(4, 1024, stations={"torino", "genova", "giaveno"})
    assert sorted(r["station"] for r in only["receivers"]) == ["genova", "giaveno", "torino"]

"""The classical RSS least-squares localizer."""

import numpy as np

from heimdall.baseline import BaselineParams, localize, signal_power_dbm
from heimdall.simulate import SimulationParams
from heimdall.simulate.scenes import placement_box, station_enu
from heimdall.stations import load_network


def test_noise_free_scene_is_localized_exactly():
    """With the model's own propagation and no shadowing the fit recovers the position."""
    net = load_network()
    st = station_enu(net)
    truth = np.array([12_000.0, -8_000.0])
    d = np.linalg.norm(st - truth, axis=1)
    params = BaselineParams(path_loss_exponent=3.2, noise_floor_dbm=-200.0)
    p_dbm = 40.0 - 75.7 - 32.0 * np.log10(d / 1000.0)
    # One mel band carries the power; the others are silent.
    x = np.full((1, len(st), 24), -300.0)
    x[0, :, 5] = p_dbm
    est = localize(x, np.ones((1, len(st))), st, placement_box(net, SimulationParams()), params)
    assert np.linalg.norm(est[0] - truth) < 10.0


def test_signal_power_subtracts_the_noise_floor():
    x = np.full((1, 24), -300.0)
    x[0, 0] = 10 * np.log10(2 * 10 ** (-120 / 10))  # signal + noise, equal powers
    p, snr = signal_power_dbm(x, -120.0)
    assert abs(p[0] + 120.0) < 1e-6 and abs(snr[0]) < 1e-6

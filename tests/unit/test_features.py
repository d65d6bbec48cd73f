"""Feature extraction: known answers, rate independence, determinism, training/serving parity."""

import numpy as np
import pytest

from heimdall.features import (
    FeatureParams,
    band_matrix,
    band_power_dbfs,
    build_features,
    power_spectrogram,
    resample,
    station_features,
)
from heimdall.iq import decode_request, encode_base64
from heimdall.simulate import sample_scenes, synthesize_iq
from heimdall.simulate.dataset import build_dataset, scene_recordings
from heimdall.simulate.families import TRAINING
from heimdall.stations import load_network

P = FeatureParams()


def test_bands_split_the_channel_symmetrically():
    bank = band_matrix(P)
    assert bank.shape == (P.n_bands, P.n_fft)
    freqs = np.fft.fftfreq(P.n_fft, 1 / P.sample_rate_hz)
    inside = np.abs(freqs) <= P.channel_half_width_hz
    np.testing.assert_array_equal(bank.sum(axis=0), inside.astype(float))
    k = 5
    neg = int(np.flatnonzero(np.isclose(freqs, -freqs[k]))[0])
    np.testing.assert_array_equal(bank[:, k], bank[:, neg])


def test_power_is_in_dbfs():
    rng = np.random.default_rng(0)
    noise = ((rng.standard_normal(8192) + 1j * rng.standard_normal(8192)) / np.sqrt(2)) * 0.1
    total = power_spectrogram(noise.astype(np.complex64), P).sum(axis=0).mean()
    assert 10 * np.log10(total) == pytest.approx(-20.0, abs=0.2)
    t = np.arange(4096) / P.sample_rate_hz
    sine = 0.01 * np.exp(2j * np.pi * 1000.0 * t)
    assert power_spectrogram(sine, P).sum(axis=0).mean() == pytest.approx(1e-4, rel=1e-3)


def test_a_tone_gives_its_power_and_white_noise_its_channel_share():
    rate = 48_000.0
    t = np.arange(8192) / rate
    tone = (0.01 * np.exp(2j * np.pi * 800.0 * t)).astype(np.complex64)
    bands = band_power_dbfs(tone, rate, P)
    assert 10 * np.log10((10 ** (bands / 10)).sum()) == pytest.approx(-40.0, abs=0.1)
    rng = np.random.default_rng(1)
    noise = ((rng.standard_normal(65536) + 1j * rng.standard_normal(65536)) / np.sqrt(2)) * 0.1
    total = 10 * np.log10((10 ** (band_power_dbfs(noise, rate, P) / 10)).sum())
    # -20 dBFS over 48 kHz; the channel holds 10 kHz of it.
    assert total == pytest.approx(-20.0 + 10 * np.log10(P.channel_bandwidth_hz / rate), abs=0.2)


def test_station_features_subtract_the_noise_and_flag_detection():
    kt_b = -174.0 + 10 * np.log10(P.channel_bandwidth_hz)
    noise_dbm = kt_b + 6.0
    per_band = noise_dbm - 10 * np.log10(P.n_bands)
    quiet = np.full(P.n_bands, per_band)
    s, n, det = station_features(quiet, P)
    assert n == pytest.approx(noise_dbm, abs=1e-6) and det == 0.0
    loud = quiet.copy()
    loud[0] = 10 * np.log10(10 ** (per_band / 10) + 10 ** ((noise_dbm + 20) / 10))
    s, n, det = station_features(loud, P)
    assert s == pytest.approx(noise_dbm + 20, abs=1e-6) and det == 1.0


def test_calibration_adds_in_db_and_absent_slots_are_zero():
    t = np.arange(4096) / 48_000.0
    x = (0.01 * np.exp(2j * np.pi * 500.0 * t)).astype(np.complex64)
    a, mask = build_features({"torino": x}, ("genova", "torino"), {"torino": -30.0}, P, 48_000.0)
    b, _ = build_features({"torino": x}, ("genova", "torino"), {"torino": -20.0}, P, 48_000.0)
    assert b[1, 0] - a[1, 0] == pytest.approx(10.0, abs=1e-4)
    assert mask.tolist() == [0.0, 1.0] and not a[0].any()


def test_resampling_keeps_the_channel():
    rate = 192_000.0
    t = np.arange(19_200) / rate
    x = (np.exp(2j * np.pi * 2_000.0 * t) + np.exp(2j * np.pi * 40_000.0 * t)).astype(np.complex64)
    y = resample(x, rate, P.sample_rate_hz)
    assert y.size == 1600
    # The in-channel tone keeps its power; the out-of-band one is filtered, not folded in.
    assert np.mean(np.abs(y[200:-200]) ** 2) == pytest.approx(1.0, abs=0.02)


def test_features_do_not_depend_on_the_recording_rate():
    """The same scene recorded at 12, 48 and 192 kHz gives the same station features."""
    net = load_network()
    sim = TRAINING.but(station_presence=(1.0, 1.0))
    scenes = sample_scenes(np.random.default_rng(21), 3, net, sim)
    cal = {s.id: s.calibration_db for s in net.stations}
    out = {}
    for rate in (12_000.0, 48_000.0, 192_000.0):
        iq = synthesize_iq(np.random.default_rng(5), scenes, net, sim, rate, int(rate * 0.25))
        feats = [
            build_features(
                scene_recordings(iq[i], scenes.present[i], net.ids), net.ids, cal, P, rate
            )[0]
            for i in range(3)
        ]
        out[rate] = np.stack(feats)
    for rate in (12_000.0, 192_000.0):
        det = (out[rate][..., 2] > 0) & (out[48_000.0][..., 2] > 0)
        strong = det & (out[48_000.0][..., 0] - out[48_000.0][..., 1] > 6)
        assert strong.sum() >= 5
        diff = np.abs(out[rate][..., 0] - out[48_000.0][..., 0])[strong]
        assert diff.max() < 1.0, f"{rate:g} Hz: signal power differs by {diff.max():.2f} dB"


def test_features_are_deterministic_to_the_byte():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4096) + 1j * rng.standard_normal(4096)).astype(np.complex64)
    a = build_features({"torino": x}, ("torino",), {"torino": -30.0}, P, 48_000.0)[0]
    b = build_features({"torino": x.copy()}, ("torino",), {"torino": -30.0}, P, 48_000.0)[0]
    assert a.tobytes() == b.tobytes()


def test_training_features_equal_serving_features_for_the_same_scene():
    """The training set is built with the functions that serve: same scene -> same numbers."""
    net = load_network()
    data = build_dataset(
        4, seed=11, network=net, sim=TRAINING, features=P, lengths=(2048,), chunk=4
    )
    # Re-create the same scenes and send them through the request decoder, as a client would.
    rng = np.random.default_rng(11)
    scenes = sample_scenes(rng, 4, net, TRAINING)
    rng.choice((2048,))
    iq = synthesize_iq(rng, scenes, net, TRAINING, P.sample_rate_hz, 2048)
    cal = {s.id: s.calibration_db for s in net.stations}
    for i in range(4):
        rec = scene_recordings(iq[i], scenes.present[i], net.ids)
        body = {
            "receivers": [{"station": k, "iq": encode_base64(v)} for k, v in rec.items()],
            "sample_rate_hz": P.sample_rate_hz,
        }
        req = decode_request(body, stations=net.ids, band_mhz=(144.0, 146.0), min_stations=1)
        served, mask = build_features(req.as_mapping(), net.ids, cal, P, req.sample_rate_hz)
        np.testing.assert_allclose(served, data.x[i], rtol=0, atol=1e-9)
        assert mask.tobytes() == data.mask[i].tobytes()

"""Feature extraction: known answers, determinism, and training/serving parity."""

import numpy as np
import pytest

from heimdall.features import (
    FeatureParams,
    build_features,
    hz_to_mel,
    log_mel_dbfs,
    mel_filterbank,
    mel_to_hz,
    normalize,
    power_spectrogram,
)
from heimdall.iq import decode_request, encode_base64
from heimdall.simulate import SimulationParams, sample_scenes, synthesize_iq
from heimdall.simulate.dataset import build_dataset, scene_recordings
from heimdall.stations import load_network

P = FeatureParams()


def test_mel_scale_known_values():
    assert float(hz_to_mel(1000.0)) == pytest.approx(999.99, abs=0.01)  # HTK: 1000 Hz ~ 1000 mel
    assert float(mel_to_hz(hz_to_mel(4321.0))) == pytest.approx(4321.0)


def test_mel_filterbank_shape_peaks_and_symmetry():
    bank = mel_filterbank(P.n_fft, P.sample_rate_hz, P.n_mels, P.fmin_hz, P.fmax_hz)
    assert bank.shape == (P.n_mels, P.n_fft)
    assert bank.max() <= 1.0 + 1e-12
    assert np.all(bank.sum(axis=1) > 0), "every band must cover at least one bin"
    freqs = np.fft.fftfreq(P.n_fft, 1 / P.sample_rate_hz)
    # +f and -f fall in the same band with the same weight.
    k = 10
    neg = int(np.flatnonzero(np.isclose(freqs, -freqs[k]))[0])
    np.testing.assert_allclose(bank[:, k], bank[:, neg])
    # Triangles overlap and the edge bands are shelves, so every bin's weights sum to one.
    np.testing.assert_allclose(bank.sum(axis=0), 1.0, atol=1e-9)


def test_power_is_in_dbfs():
    rng = np.random.default_rng(0)
    noise = ((rng.standard_normal(8192) + 1j * rng.standard_normal(8192)) / np.sqrt(2)) * 0.1
    total = power_spectrogram(noise.astype(np.complex64), P).sum(axis=0).mean()
    assert 10 * np.log10(total) == pytest.approx(-20.0, abs=0.2)
    t = np.arange(4096) / P.sample_rate_hz
    sine = 0.01 * np.exp(2j * np.pi * 3000.0 * t)
    assert power_spectrogram(sine, P).sum(axis=0).mean() == pytest.approx(1e-4, rel=1e-3)


def test_a_tone_lands_in_its_band_and_calibration_adds_in_db():
    t = np.arange(4096) / P.sample_rate_hz
    x = (0.01 * np.exp(2j * np.pi * 5000.0 * t)).astype(np.complex64)
    db = log_mel_dbfs(x, P)
    assert int(np.argmax(db)) == int(
        np.argmax(mel_filterbank(256, 48000.0, 24, 0.0, 24000.0)[:, 5000 * 256 // 48000])
    )
    feats, mask = build_features({"torino": x}, ("genova", "torino"), {"torino": -30.0}, P)
    np.testing.assert_allclose(feats[1], db - 30.0, rtol=0, atol=1e-4)
    assert mask.tolist() == [0.0, 1.0] and not feats[0].any()


def test_absolute_power_survives_normalization():
    t = np.arange(2048) / P.sample_rate_hz
    quiet = (1e-3 * np.exp(2j * np.pi * 1000.0 * t)).astype(np.complex64)
    loud = quiet * 10
    cal = {"a": -30.0, "b": -30.0}
    x, mask = build_features({"a": quiet, "b": loud}, ("a", "b"), cal, P)
    xn = normalize(x, mask, -100.0, 20.0)
    assert (xn[1] - xn[0]).max() == pytest.approx(20.0 / 20.0, abs=1e-3)


def test_features_are_deterministic_to_the_byte():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4096) + 1j * rng.standard_normal(4096)).astype(np.complex64)
    a = build_features({"torino": x}, ("torino",), {"torino": -30.0}, P)[0]
    b = build_features({"torino": x.copy()}, ("torino",), {"torino": -30.0}, P)[0]
    assert a.tobytes() == b.tobytes()


def test_training_features_equal_serving_features_for_the_same_scene():
    """The training set is built with the function that serves: same scene -> same bytes."""
    net = load_network()
    sim = SimulationParams()
    data = build_dataset(4, seed=11, network=net, sim=sim, features=P, lengths=(2048,), chunk=4)
    # Re-create the same scenes and send them through the request decoder, as a client would.
    rng = np.random.default_rng(11)
    scenes = sample_scenes(rng, 4, net, sim, P.sample_rate_hz)
    rng.choice((2048,))
    iq = synthesize_iq(rng, scenes, net, sim, P.sample_rate_hz, 2048)
    cal = {s.id: s.calibration_db for s in net.stations}
    for i in range(4):
        rec = scene_recordings(iq[i], scenes.present[i], net.ids)
        body = {
            "receivers": [{"station": k, "iq": encode_base64(v)} for k, v in rec.items()],
            "sample_rate_hz": P.sample_rate_hz,
        }
        req = decode_request(
            body,
            stations=net.ids,
            sample_rate_hz=P.sample_rate_hz,
            band_mhz=(144.0, 146.0),
            min_stations=1,
        )
        served, mask = build_features(req.as_mapping(), net.ids, cal, P)
        assert served.tobytes() == data.x_dbm[i].tobytes()
        assert mask.tobytes() == data.mask[i].tobytes()

"""Scenes: where the transmitter is, what every receiver hears, and its IQ."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heimdall.geo import enu_to_geodetic, geodetic_to_enu
from heimdall.simulate.propagation import (
    SimulationParams,
    noise_floor_dbm,
    path_loss_db,
    rician_power_gain_db,
    terrain_shadowing_db,
)
from heimdall.stations import Network


@dataclass(frozen=True)
class SceneBatch:
    """A batch of simulated scenes over one network (stations in network order)."""

    tx_east_m: np.ndarray
    """(B,) transmitter east of the network centroid, m."""
    tx_north_m: np.ndarray
    """(B,) transmitter north of the network centroid, m."""
    tx_latitude: np.ndarray
    """(B,) degrees."""
    tx_longitude: np.ndarray
    """(B,) degrees."""
    tx_power_dbm: np.ndarray
    """(B,) transmit power, dBm."""
    rx_power_dbm: np.ndarray
    """(B, S) received signal power at each station, dBm."""
    noise_floor_dbm: float
    """Receiver noise power over the sampled band, dBm."""
    detected: np.ndarray
    """(B, S) bool: the signal is above detection (otherwise only noise is heard)."""
    present: np.ndarray
    """(B, S) bool: the station sent a recording."""

    def __len__(self) -> int:
        return int(self.tx_east_m.shape[0])


def station_enu(network: Network) -> np.ndarray:
    """(S, 2) station east/north of the network centroid, m."""
    lat0, lon0 = network.centroid
    lat = np.array([s.latitude for s in network.stations])
    lon = np.array([s.longitude for s in network.stations])
    east, north = geodetic_to_enu(lat, lon, lat0, lon0)
    return np.stack([np.asarray(east), np.asarray(north)], axis=-1)


def placement_box(network: Network, params: SimulationParams) -> tuple[float, float, float, float]:
    """(east_min, east_max, north_min, north_max) where transmitters are placed, m."""
    enu = station_enu(network)
    margin = params.margin_km * 1_000.0
    return (
        float(enu[:, 0].min() - margin),
        float(enu[:, 0].max() + margin),
        float(enu[:, 1].min() - margin),
        float(enu[:, 1].max() + margin),
    )


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    network: Network,
    params: SimulationParams,
    sample_rate_hz: float,
) -> SceneBatch:
    """Draw ``n`` scenes: positions, powers, per-link losses, detection, presence."""
    e0, e1, n0, n1 = placement_box(network, params)
    east = rng.uniform(e0, e1, n)
    north = rng.uniform(n0, n1, n)
    lat0, lon0 = network.centroid
    lat, lon = enu_to_geodetic(east, north, lat0, lon0)

    enu = station_enu(network)
    dist = np.hypot(east[:, None] - enu[None, :, 0], north[:, None] - enu[None, :, 1])
    tx_power = rng.uniform(params.tx_power_dbm_min, params.tx_power_dbm_max, n)
    terrain = terrain_shadowing_db(east, north, dist.shape[1], params)
    shadowing = terrain + rng.normal(0.0, params.shadowing_sigma_db, dist.shape)
    fading = rician_power_gain_db(rng, dist.shape, params.rician_k_db)
    spread = params.path_loss_exponent_spread
    exponent = params.path_loss_exponent + rng.uniform(-spread, spread, (n, 1))
    rx_power = tx_power[:, None] - path_loss_db(dist, params, exponent) + shadowing + fading

    floor = noise_floor_dbm(sample_rate_hz, params)
    detected = rx_power - floor >= params.detection_snr_db

    present = rng.random(dist.shape) < params.station_presence
    # Guarantee the minimum number of recordings by adding random stations back.
    for i in np.flatnonzero(present.sum(axis=1) < params.min_stations):
        order = rng.permutation(dist.shape[1])
        present[i, order[: params.min_stations]] = True

    return SceneBatch(
        tx_east_m=east,
        tx_north_m=north,
        tx_latitude=np.asarray(lat),
        tx_longitude=np.asarray(lon),
        tx_power_dbm=tx_power,
        rx_power_dbm=rx_power,
        noise_floor_dbm=floor,
        detected=detected,
        present=present,
    )


def _audio(rng: np.random.Generator, n_scenes: int, t: np.ndarray, voice_p: float) -> np.ndarray:
    """(B, N) modulating audio with peak 1: a test tone or a voice-like signal."""
    tone_hz = rng.uniform(300.0, 3_000.0, (n_scenes, 1))
    tone = np.sin(2 * np.pi * tone_hz * t + rng.uniform(0, 2 * np.pi, (n_scenes, 1)))
    # Voice-like: a glottal pitch with decaying harmonics, shaped by a syllabic envelope.
    pitch = rng.uniform(90.0, 250.0, (n_scenes, 1))
    voice = np.zeros((n_scenes, t.size))
    for h in range(1, 9):
        voice += np.sin(2 * np.pi * h * pitch * t + rng.uniform(0, 2 * np.pi, (n_scenes, 1))) / h
    syllable_hz = rng.uniform(3.0, 6.0, (n_scenes, 1))
    envelope = 0.55 + 0.45 * np.sin(
        2 * np.pi * syllable_hz * t + rng.uniform(0, 2 * np.pi, (n_scenes, 1))
    )
    voice *= envelope
    voice /= np.max(np.abs(voice), axis=1, keepdims=True)
    use_voice = rng.random((n_scenes, 1)) < voice_p
    return np.where(use_voice, voice, tone)


def synthesize_iq(
    rng: np.random.Generator,
    scenes: SceneBatch,
    network: Network,
    params: SimulationParams,
    sample_rate_hz: float,
    n_samples: int,
) -> np.ndarray:
    """(B, S, N) complex64 IQ in dBFS as each station would record it.

    Narrowband FM of the scene's audio with a random carrier offset and phase per
    receiver, at the received power (if detected), plus AWGN at the noise floor,
    both converted dBm -> dBFS with the station's calibration. Absent stations
    get zeros (callers drop them).
    """
    b, s = scenes.rx_power_dbm.shape
    t = np.arange(n_samples) / sample_rate_hz
    audio = _audio(rng, b, t, params.voice_probability)
    deviation = rng.uniform(params.fm_deviation_hz_min, params.fm_deviation_hz_max, (b, 1))
    # FM phase: 2 pi * deviation * integral of audio, shared by every receiver of a scene.
    fm_phase = 2 * np.pi * deviation * np.cumsum(audio, axis=1) / sample_rate_hz
    offset = rng.uniform(-params.frequency_offset_hz, params.frequency_offset_hz, (b, s, 1))
    phase0 = rng.uniform(0, 2 * np.pi, (b, s, 1))
    phase = (fm_phase[:, None, :] + 2 * np.pi * offset * t + phase0).astype(np.float32)

    calibration = network.calibration(network.ids)[None, :]
    signal_dbfs = scenes.rx_power_dbm - calibration
    amplitude = np.where(scenes.detected, 10.0 ** (signal_dbfs / 20.0), 0.0)
    amplitude = (amplitude * scenes.present)[..., None].astype(np.float32)
    noise_dbfs = scenes.noise_floor_dbm - calibration
    noise_sigma = (np.sqrt(10.0 ** (noise_dbfs / 10.0) / 2.0) * scenes.present)[..., None]
    noise_sigma = noise_sigma.astype(np.float32)
    # float32 throughout: the synthesis dominates data-set build time.
    iq = np.empty((b, s, n_samples), dtype=np.complex64)
    iq.real = amplitude * np.cos(phase) + noise_sigma * rng.standard_normal(
        (b, s, n_samples), dtype=np.float32
    )
    iq.imag = amplitude * np.sin(phase) + noise_sigma * rng.standard_normal(
        (b, s, n_samples), dtype=np.float32
    )
    return iq

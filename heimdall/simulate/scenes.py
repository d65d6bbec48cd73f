"""Scenes: where the transmitter is, what every receiver hears, and its IQ."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heimdall.geo import enu_to_geodetic, geodetic_to_enu, hull_distance_m
from heimdall.simulate.propagation import (
    SimulationParams,
    dual_slope_loss_db,
    hata_loss_db,
    log_distance_loss_db,
    noise_floor_dbm,
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
    """(B,) transmit power (ERP), dBm."""
    rx_power_dbm: np.ndarray
    """(B, S) received signal power at each station, dBm."""
    noise_figure_db: np.ndarray
    """(B, S) each receiver's noise figure, dB (its noise density is kT + NF)."""
    present: np.ndarray
    """(B, S) bool: the station sent a recording."""
    signal_type: np.ndarray
    """(B,) index into ``SimulationParams.signal_types``."""

    def __len__(self) -> int:
        return int(self.tx_east_m.shape[0])

    def noise_floor_dbm(self, sample_rate_hz: float) -> np.ndarray:
        """(B, S) receiver noise power over a bandwidth equal to ``sample_rate_hz``, dBm."""
        return noise_floor_dbm(sample_rate_hz, self.noise_figure_db)


def station_enu(network: Network) -> np.ndarray:
    """(S, 2) station east/north of the network centroid, m."""
    lat0, lon0 = network.centroid
    lat = np.array([s.latitude for s in network.stations])
    lon = np.array([s.longitude for s in network.stations])
    east, north = geodetic_to_enu(lat, lon, lat0, lon0)
    return np.stack([np.asarray(east), np.asarray(north)], axis=-1)


def placement_box(network: Network, margin_km: float) -> tuple[float, float, float, float]:
    """(east_min, east_max, north_min, north_max): the stations' bounding box grown by margin, m."""
    enu = station_enu(network)
    margin = margin_km * 1_000.0
    return (
        float(enu[:, 0].min() - margin),
        float(enu[:, 0].max() + margin),
        float(enu[:, 1].min() - margin),
        float(enu[:, 1].max() + margin),
    )


def _uniform_in_box(
    rng: np.random.Generator, n: int, box: tuple[float, float, float, float]
) -> np.ndarray:
    e0, e1, n0, n1 = box
    return np.stack([rng.uniform(e0, e1, n), rng.uniform(n0, n1, n)], axis=-1)


def sample_positions(
    rng: np.random.Generator, n: int, network: Network, params: SimulationParams
) -> np.ndarray:
    """(n, 2) transmitter east/north, m: a share inside the network, the rest outside its hull.

    'Outside' positions are uniform over the area between ``outside_min_km`` and
    ``outside_km`` from the stations' convex hull (rejection sampling).
    """
    enu = station_enu(network)
    inside = rng.random(n) < params.inside_fraction
    pos = _uniform_in_box(rng, n, placement_box(network, params.inside_margin_km))
    todo = np.flatnonzero(~inside)
    big = placement_box(network, params.outside_km)
    while todo.size:
        cand = _uniform_in_box(rng, 4 * todo.size + 16, big)
        d = hull_distance_m(cand, enu)
        ok = cand[(d >= params.outside_min_km * 1e3) & (d <= params.outside_km * 1e3)]
        take = min(len(ok), todo.size)
        pos[todo[:take]] = ok[:take]
        todo = todo[take:]
    return pos


def sample_scenes(
    rng: np.random.Generator, n: int, network: Network, params: SimulationParams
) -> SceneBatch:
    """Draw ``n`` scenes: positions, powers, per-link losses, noise figures, presence."""
    pos = sample_positions(rng, n, network, params)
    east, north = pos[:, 0], pos[:, 1]
    lat0, lon0 = network.centroid
    lat, lon = enu_to_geodetic(east, north, lat0, lon0)

    enu = station_enu(network)
    s = enu.shape[0]
    dist = np.hypot(east[:, None] - enu[None, :, 0], north[:, None] - enu[None, :, 1])
    tx_power = rng.uniform(params.tx_power_dbm_min, params.tx_power_dbm_max, n)

    law = rng.integers(0, len(params.laws), n)
    h_tx = rng.uniform(*params.tx_height_m, (n, 1))
    h_rx = rng.uniform(*params.rx_height_m, (n, s))
    exponent = rng.uniform(params.exponent_min, params.exponent_max, (n, 1))
    loss = np.zeros((n, s))
    for j, name in enumerate(params.laws):
        rows = law == j
        if not rows.any():
            continue
        if name == "log-distance":
            loss[rows] = log_distance_loss_db(dist[rows], exponent[rows], params)
        elif name == "hata":
            loss[rows] = hata_loss_db(dist[rows], h_tx[rows], h_rx[rows], params.carrier_mhz)
        elif name == "dual-slope":
            loss[rows] = dual_slope_loss_db(
                dist[rows], h_tx[rows], h_rx[rows], exponent[rows], params.carrier_mhz
            )
        else:
            raise ValueError(f"unknown path-loss law {name!r}")

    sigma = rng.uniform(*params.terrain_sigma_db, n)
    corr = rng.uniform(*params.terrain_correlation_km, n) * 1_000.0
    terrain = terrain_shadowing_db(rng, pos, enu, sigma, corr, params.terrain_kernel)
    bias = rng.normal(0.0, params.station_bias_db, (n, s))
    k_db = rng.uniform(*params.rician_k_db, (n, 1)) * np.ones((1, s))
    fading = rician_power_gain_db(rng, k_db)
    rx_power = tx_power[:, None] - loss + terrain + bias + fading

    nf = rng.uniform(*params.noise_figure_db, (n, s))
    presence = rng.uniform(*params.station_presence, (n, 1))
    present = rng.random((n, s)) < presence
    # Keep between min_stations and max_stations recordings, choosing stations at random.
    rank = np.argsort(np.argsort(rng.random((n, s)) - present, axis=1), axis=1)
    count = np.clip(present.sum(axis=1), params.min_stations, min(params.max_stations, s))
    present = rank < count[:, None]
    signal_type = rng.integers(0, len(params.signal_types), n)

    return SceneBatch(
        tx_east_m=east,
        tx_north_m=north,
        tx_latitude=np.asarray(lat),
        tx_longitude=np.asarray(lon),
        tx_power_dbm=tx_power,
        rx_power_dbm=rx_power,
        noise_figure_db=nf,
        present=present,
        signal_type=signal_type,
    )


def _audio(rng: np.random.Generator, n_scenes: int, t: np.ndarray) -> np.ndarray:
    """(B, N) modulating audio with peak 1: half test tones, half voice-like signals."""
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
    return np.where(rng.random((n_scenes, 1)) < 0.5, voice, tone)


def _symbols(
    rng: np.random.Generator, n_scenes: int, t: np.ndarray, rate: float, levels: np.ndarray
) -> np.ndarray:
    """(B, N) a random symbol stream at ``rate`` symbols/s drawn from ``levels``."""
    n_sym = int(t[-1] * rate) + 2
    sym = levels[rng.integers(0, len(levels), (n_scenes, n_sym))]
    start = rng.uniform(0.0, 1.0, (n_scenes, 1))
    idx = np.minimum((t[None, :] * rate + start).astype(int), n_sym - 1)
    return np.take_along_axis(sym, idx, axis=1)


def instantaneous_frequency_hz(
    rng: np.random.Generator, scenes: SceneBatch, params: SimulationParams, t: np.ndarray
) -> np.ndarray:
    """(B, N) the emission's frequency around its carrier, Hz (all types are constant-envelope).

    FM voice/tone at 1.5-3 kHz peak deviation; CW an unmodulated carrier; FSK
    1200 Bd with a +/-0.5-2.5 kHz shift; digital voice 4-FSK at 4800 Bd,
    +/-648 and +/-1944 Hz (DMR-like).
    """
    b = len(scenes)
    out = np.zeros((b, t.size))
    types = params.signal_types
    for j, name in enumerate(types):
        rows = np.flatnonzero(scenes.signal_type == j)
        if rows.size == 0:
            continue
        if name == "fm":
            dev = rng.uniform(1_500.0, 3_000.0, (rows.size, 1))
            out[rows] = dev * _audio(rng, rows.size, t)
        elif name == "cw":
            out[rows] = 0.0
        elif name == "fsk":
            shift = rng.uniform(500.0, 2_500.0, (rows.size, 1))
            out[rows] = shift * _symbols(rng, rows.size, t, 1_200.0, np.array([-1.0, 1.0]))
        elif name == "dv":
            levels = np.array([-1_944.0, -648.0, 648.0, 1_944.0])
            out[rows] = _symbols(rng, rows.size, t, 4_800.0, levels)
        else:
            raise ValueError(f"unknown signal type {name!r}")
    return out


def synthesize_iq(
    rng: np.random.Generator,
    scenes: SceneBatch,
    network: Network,
    params: SimulationParams,
    sample_rate_hz: float,
    n_samples: int,
) -> np.ndarray:
    """(B, S, N) complex64 IQ in dBFS as each station would record it at ``sample_rate_hz``.

    The scene's emission with a random carrier offset and phase per receiver, at
    the received power, plus white noise of density kT + NF over the whole
    sampled band, both converted dBm -> dBFS with the station's calibration. A
    signal below the noise is still there, buried: detecting it is the
    estimator's job. Absent stations get zeros (callers drop them).
    """
    b, s = scenes.rx_power_dbm.shape
    t = np.arange(n_samples) / sample_rate_hz
    freq = instantaneous_frequency_hz(rng, scenes, params, t)
    mod_phase = 2 * np.pi * np.cumsum(freq, axis=1) / sample_rate_hz
    offset = rng.uniform(-params.frequency_offset_hz, params.frequency_offset_hz, (b, s, 1))
    phase0 = rng.uniform(0, 2 * np.pi, (b, s, 1))
    phase = (mod_phase[:, None, :] + 2 * np.pi * offset * t + phase0).astype(np.float32)

    calibration = network.calibration(network.ids)[None, :]
    signal_dbfs = scenes.rx_power_dbm - calibration
    amplitude = (10.0 ** (signal_dbfs / 20.0) * scenes.present)[..., None].astype(np.float32)
    noise_dbfs = scenes.noise_floor_dbm(sample_rate_hz) - calibration
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

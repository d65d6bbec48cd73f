"""Propagation model: log-distance path loss, shadowing, fading, noise floor."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SPEED_OF_LIGHT_M_S = 299_792_458.0
BOLTZMANN_DBM_PER_HZ = -174.0
"""Thermal noise density kT at 290 K, dBm/Hz."""


@dataclass(frozen=True)
class SimulationParams:
    """Every knob of the simulator, with its unit (documented in docs/simulation.md)."""

    carrier_mhz: float = 145.0
    """Carrier frequency, MHz (2 m band)."""
    margin_km: float = 20.0
    """Transmitters are placed uniformly in the stations' bounding box grown by this, km."""
    tx_power_dbm_min: float = 27.0
    """Lowest transmit power (EIRP), dBm (0.5 W, a handheld)."""
    tx_power_dbm_max: float = 44.0
    """Highest transmit power (EIRP), dBm (25 W, a mobile rig)."""
    reference_distance_m: float = 1_000.0
    """Distance d0 at which path loss equals free-space loss, m."""
    path_loss_exponent: float = 3.2
    """Nominal log-distance exponent n beyond d0 (2 = free space; 3.2: hilly, obstructed)."""
    path_loss_exponent_spread: float = 0.4
    """Each scene's exponent is uniform in nominal +/- this: terrain differs per scene."""
    terrain_sigma_db: float = 6.0
    """Standard deviation of terrain shadowing, dB: a fixed, spatially correlated map per
    station (the same hills shadow the same places in every scene)."""
    terrain_correlation_km: float = 12.0
    """Correlation length of the terrain shadowing maps, km."""
    terrain_seed: int = 2026
    """Seed of the terrain maps: part of the region, not of a scene; keep it fixed."""
    shadowing_sigma_db: float = 3.0
    """Standard deviation of the random (clutter, vehicle) shadowing per link and scene, dB."""
    rician_k_db: float = 3.0
    """Rician K-factor of the block fading per link, dB (mean power gain 1)."""
    noise_figure_db: float = 6.0
    """Receiver noise figure, dB; the noise floor is kT + 10 log10(sample rate) + NF."""
    detection_snr_db: float = 3.0
    """Below this SNR a receiver hears only noise (the signal is not in its IQ), dB."""
    station_presence: float = 0.9
    """Probability that a station contributes a recording to a scene."""
    min_stations: int = 3
    """Fewest recordings in a scene."""
    min_distance_m: float = 100.0
    """Transmitters closer than this to a receiver are treated as at this distance, m."""
    fm_deviation_hz_min: float = 1_500.0
    """Lowest peak FM deviation, Hz."""
    fm_deviation_hz_max: float = 3_000.0
    """Highest peak FM deviation, Hz (12.5 kHz channel)."""
    frequency_offset_hz: float = 2_000.0
    """Carrier offset at each receiver is uniform in +/- this, Hz."""
    voice_probability: float = 0.5
    """Probability that the audio is voice-like rather than a single tone."""

    def to_dict(self) -> dict[str, float | int]:
        """JSON-able form."""
        return asdict(self)


def free_space_loss_db(distance_m: np.ndarray | float, carrier_mhz: float) -> np.ndarray:
    """Free-space path loss 20 log10(4 pi d / lambda), dB."""
    wavelength = SPEED_OF_LIGHT_M_S / (carrier_mhz * 1e6)
    return 20.0 * np.log10(4.0 * np.pi * np.asarray(distance_m, dtype=np.float64) / wavelength)


def path_loss_db(
    distance_m: np.ndarray | float,
    params: SimulationParams,
    exponent: np.ndarray | float | None = None,
) -> np.ndarray:
    """Log-distance path loss anchored on free-space loss at d0, dB (no shadowing).

    ``exponent`` (broadcast against the distances) defaults to the nominal one.
    """
    n = params.path_loss_exponent if exponent is None else np.asarray(exponent)
    d = np.maximum(np.asarray(distance_m, dtype=np.float64), params.min_distance_m)
    d0 = params.reference_distance_m
    return free_space_loss_db(d0, params.carrier_mhz) + 10.0 * n * np.log10(d / d0)


def noise_floor_dbm(sample_rate_hz: float, params: SimulationParams) -> float:
    """Receiver noise power over the sampled bandwidth, dBm."""
    return BOLTZMANN_DBM_PER_HZ + 10.0 * np.log10(sample_rate_hz) + params.noise_figure_db


TERRAIN_COMPONENTS = 96
"""Plane waves summed per terrain map: enough for a Gaussian-looking field."""


def terrain_shadowing_db(
    east_m: np.ndarray, north_m: np.ndarray, n_stations: int, params: SimulationParams
) -> np.ndarray:
    """Terrain shadowing (B, S) in dB at transmitter positions (B,), one map per station.

    Each map is a stationary Gaussian random field with standard deviation
    ``terrain_sigma_db`` and a Gaussian correlation of length
    ``terrain_correlation_km``, built as a sum of random plane waves from a fixed
    seed: deterministic in position, so a model trained on the region can learn
    it while a log-distance model treats it as noise.
    """
    rng = np.random.default_rng(params.terrain_seed)
    length = params.terrain_correlation_km * 1_000.0
    k = rng.normal(0.0, 1.0 / length, (n_stations, TERRAIN_COMPONENTS, 2))
    phase = rng.uniform(0.0, 2 * np.pi, (n_stations, TERRAIN_COMPONENTS))
    pos = np.stack([np.asarray(east_m), np.asarray(north_m)], axis=-1)  # (B, 2)
    arg = np.einsum("bd,skd->bsk", pos, k) + phase[None]
    return params.terrain_sigma_db * np.sqrt(2.0 / TERRAIN_COMPONENTS) * np.cos(arg).sum(-1)


def rician_power_gain_db(
    rng: np.random.Generator, shape: tuple[int, ...], k_db: float
) -> np.ndarray:
    """Block-fading power gain of a Rician channel with unit mean power, dB."""
    k = 10.0 ** (k_db / 10.0)
    los = np.sqrt(k / (k + 1.0))
    scatter = np.sqrt(1.0 / (2.0 * (k + 1.0)))
    h = los + scatter * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    return 20.0 * np.log10(np.abs(h))

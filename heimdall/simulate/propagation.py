"""Propagation: path-loss laws, per-scene terrain, fading, receiver noise.

Every nuisance is drawn per scene (or per link) from a range wide enough that
a model cannot learn one map: the exponent and the law itself, the terrain
field, antenna heights, noise figures and the fading regime all change from
one scene to the next. docs/simulation.md gives each range and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

SPEED_OF_LIGHT_M_S = 299_792_458.0
BOLTZMANN_DBM_PER_HZ = -174.0
"""Thermal noise density kT at 290 K, dBm/Hz."""

LAWS = ("log-distance", "hata", "dual-slope")
"""Path-loss families: the first two train the model, dual-slope is held out for evaluation."""


@dataclass(frozen=True)
class SimulationParams:
    """Every knob of the simulator, with its unit (documented in docs/simulation.md)."""

    carrier_mhz: float = 145.0
    """Carrier frequency, MHz (2 m band)."""
    laws: tuple[str, ...] = ("log-distance", "hata")
    """Path-loss families drawn per scene (uniformly) from :data:`LAWS`."""
    inside_fraction: float = 0.6
    """Share of transmitters placed in the stations' bounding box grown by ``inside_margin_km``;
    the rest lie in a ring up to ``outside_km`` beyond it."""
    inside_margin_km: float = 15.0
    """Growth of the bounding box for 'inside' transmitters, km."""
    outside_km: float = 100.0
    """Farthest a transmitter lies beyond the stations' bounding box, km."""
    outside_min_km: float = 0.0
    """Nearest an 'outside' transmitter lies beyond the bounding box, km."""
    tx_power_dbm_min: float = 27.0
    """Lowest ERP, dBm (0.5 W, a handheld)."""
    tx_power_dbm_max: float = 50.0
    """Highest ERP, dBm (100 W, a base station)."""
    reference_distance_m: float = 1_000.0
    """Distance d0 at which the log-distance law equals free-space loss, m."""
    exponent_min: float = 2.5
    """Lowest log-distance exponent (open, elevated paths)."""
    exponent_max: float = 4.2
    """Highest log-distance exponent (obstructed, urban)."""
    rx_height_m: tuple[float, float] = (5.0, 40.0)
    """Receiver antenna heights above ground, m (Hata law)."""
    tx_height_m: tuple[float, float] = (1.5, 30.0)
    """Transmitter antenna heights above ground, m (Hata law)."""
    terrain_sigma_db: tuple[float, float] = (2.0, 9.0)
    """Range of the per-scene terrain shadowing standard deviation, dB."""
    terrain_correlation_km: tuple[float, float] = (3.0, 30.0)
    """Range of the per-scene correlation length of the terrain field, km."""
    terrain_kernel: str = "gaussian"
    """Spectrum of the terrain field: 'gaussian' (smooth hills) or 'exponential' (rough)."""
    station_bias_db: float = 1.5
    """Standard deviation of a per-scene, per-station gain error (antenna, cable), dB."""
    rician_k_db: tuple[float, float] = (-10.0, 10.0)
    """Range of the per-scene Rician K-factor, dB (-10 is nearly Rayleigh)."""
    noise_figure_db: tuple[float, float] = (3.0, 10.0)
    """Range of each receiver's noise figure, dB (drawn per scene and station)."""
    station_presence: tuple[float, float] = (0.6, 1.0)
    """Range of the per-scene probability that a station sent a recording."""
    min_stations: int = 3
    """Fewest recordings in a scene."""
    max_stations: int = 99
    """Most recordings in a scene (the sparse family keeps 3-4)."""
    min_distance_m: float = 100.0
    """Transmitters closer than this to a receiver are treated as at this distance, m."""
    frequency_offset_hz: float = 1_000.0
    """Carrier offset at each receiver is uniform in +/- this, Hz."""
    signal_types: tuple[str, ...] = ("fm", "cw", "fsk", "dv")
    """Emissions drawn per scene: FM voice/tone, CW carrier, 2-FSK data, 4-FSK digital voice."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    def but(self, **changes: Any) -> SimulationParams:
        """A copy with some fields changed."""
        return replace(self, **changes)


def free_space_loss_db(distance_m: np.ndarray | float, carrier_mhz: float) -> np.ndarray:
    """Free-space path loss 20 log10(4 pi d / lambda), dB."""
    wavelength = SPEED_OF_LIGHT_M_S / (carrier_mhz * 1e6)
    return 20.0 * np.log10(4.0 * np.pi * np.asarray(distance_m, dtype=np.float64) / wavelength)


def log_distance_loss_db(
    distance_m: np.ndarray, exponent: np.ndarray | float, params: SimulationParams
) -> np.ndarray:
    """Log-distance path loss anchored on free-space loss at d0, dB."""
    d = np.maximum(np.asarray(distance_m, dtype=np.float64), params.min_distance_m)
    d0 = params.reference_distance_m
    return free_space_loss_db(d0, params.carrier_mhz) + 10.0 * np.asarray(exponent) * np.log10(
        d / d0
    )


def hata_loss_db(
    distance_m: np.ndarray, h_tx_m: np.ndarray, h_rx_m: np.ndarray, carrier_mhz: float
) -> np.ndarray:
    """Okumura-Hata (suburban form) loss, dB; the base is the receiver, the mobile the transmitter.

    Its slope, 44.9 - 6.55 log10(h_rx), depends on the receiver height, so each
    station of a scene sees its own exponent (3.4-4.4) and its own intercept.
    """
    d_km = np.maximum(np.asarray(distance_m, dtype=np.float64), 100.0) / 1_000.0
    f = carrier_mhz
    a_hm = (1.1 * np.log10(f) - 0.7) * h_tx_m - (1.56 * np.log10(f) - 0.8)
    urban = (
        69.55
        + 26.16 * np.log10(f)
        - 13.82 * np.log10(h_rx_m)
        - a_hm
        + (44.9 - 6.55 * np.log10(h_rx_m)) * np.log10(d_km)
    )
    return urban - 2.0 * np.log10(f / 28.0) ** 2 - 5.4


def dual_slope_loss_db(
    distance_m: np.ndarray,
    h_tx_m: np.ndarray,
    h_rx_m: np.ndarray,
    far_exponent: np.ndarray,
    carrier_mhz: float,
) -> np.ndarray:
    """Two-ray style loss: free space up to the breakpoint 4 h_t h_r / lambda, then n_far.

    The evaluation's independent family: its near/far slopes and breakpoint come
    from antenna heights, which the training laws never use this way.
    """
    wavelength = SPEED_OF_LIGHT_M_S / (carrier_mhz * 1e6)
    d = np.maximum(np.asarray(distance_m, dtype=np.float64), 100.0)
    breakpoint = np.maximum(4.0 * h_tx_m * h_rx_m / wavelength, 200.0)
    near = free_space_loss_db(np.minimum(d, breakpoint), carrier_mhz)
    return near + 10.0 * far_exponent * np.log10(np.maximum(d, breakpoint) / breakpoint)


def noise_floor_dbm(
    sample_rate_hz: float | np.ndarray, noise_figure_db: float | np.ndarray = 6.0
) -> np.ndarray:
    """Receiver noise power over a bandwidth equal to the sample rate, dBm."""
    return BOLTZMANN_DBM_PER_HZ + 10.0 * np.log10(sample_rate_hz) + np.asarray(noise_figure_db)


TERRAIN_COMPONENTS = 48
"""Plane waves summed per terrain field: enough for a Gaussian-looking field."""


def terrain_shadowing_db(
    rng: np.random.Generator,
    tx_enu_m: np.ndarray,
    station_enu_m: np.ndarray,
    sigma_db: np.ndarray,
    correlation_m: np.ndarray,
    kernel: str = "gaussian",
) -> np.ndarray:
    """Terrain shadowing (B, S) in dB, a new random field per scene and station.

    Each (scene, station) field is a sum of random plane waves evaluated at the
    transmitter; the wavenumbers are Gaussian (smooth, Gaussian correlation) or
    Cauchy (rough, exponential correlation) with the scene's correlation length.
    Drawn fresh per scene, so no map can be memorized.
    """
    b, s = tx_enu_m.shape[0], station_enu_m.shape[0]
    shape = (b, s, TERRAIN_COMPONENTS, 2)
    length = correlation_m[:, None, None, None]
    if kernel == "gaussian":
        k = rng.normal(0.0, 1.0, shape) / length
    elif kernel == "exponential":
        k = rng.standard_cauchy(shape) / length
    else:
        raise ValueError(f"unknown terrain kernel {kernel!r}")
    phase = rng.uniform(0.0, 2 * np.pi, shape[:3])
    arg = np.einsum("bd,bskd->bsk", tx_enu_m, k) + phase
    field = np.sqrt(2.0 / TERRAIN_COMPONENTS) * np.cos(arg).sum(-1)
    return sigma_db[:, None] * field


def rician_power_gain_db(rng: np.random.Generator, k_db: np.ndarray) -> np.ndarray:
    """Block-fading power gain of Rician channels with unit mean power, dB (shape of ``k_db``)."""
    k = 10.0 ** (np.asarray(k_db) / 10.0)
    los = np.sqrt(k / (k + 1.0))
    scatter = np.sqrt(1.0 / (2.0 * (k + 1.0)))
    shape = np.shape(k_db)
    h = los + scatter * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    return 20.0 * np.log10(np.abs(h))

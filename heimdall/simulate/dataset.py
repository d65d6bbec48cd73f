"""Simulated data sets: scenes -> IQ -> the serving feature function.

Training, evaluation and the feature-parity test all build their inputs here,
through :func:`heimdall.features.build_features`, the function that serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from heimdall.features import FeatureParams, band_power_dbfs, station_features
from heimdall.simulate.propagation import SimulationParams
from heimdall.simulate.scenes import SceneBatch, sample_scenes, synthesize_iq
from heimdall.stations import Network

DEFAULT_LENGTHS = (512, 1024, 2048, 4096)
"""Recording lengths (samples at the features' rate, 32-256 ms) drawn per chunk of scenes."""


@dataclass(frozen=True)
class Dataset:
    """Features and truth of simulated scenes (stations in network order)."""

    x: np.ndarray
    """(N, S, 3) station features: signal dBm, noise dBm, detected (see heimdall.features)."""
    mask: np.ndarray
    """(N, S) float32, 1 where the station sent a recording."""
    target_m: np.ndarray
    """(N, 2) float64 true east/north of the network centroid, m."""
    latitude: np.ndarray
    """(N,) true latitude, degrees."""
    longitude: np.ndarray
    """(N,) true longitude, degrees."""

    def __len__(self) -> int:
        return int(self.x.shape[0])


def scene_recordings(
    iq: np.ndarray, present: np.ndarray, slots: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """One scene's {station: IQ} as a client would send it (absent stations left out)."""
    return {sid: iq[j] for j, sid in enumerate(slots) if present[j]}


def build_dataset(
    n_scenes: int,
    seed: int,
    network: Network,
    sim: SimulationParams,
    features: FeatureParams,
    *,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    chunk: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Simulate ``n_scenes`` scenes and compute their features, reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    slots = network.ids
    calibration = network.calibration(slots)
    xs, masks, targets, lats, lons = [], [], [], [], []
    done = 0
    while done < n_scenes:
        n = min(chunk, n_scenes - done)
        scenes: SceneBatch = sample_scenes(rng, n, network, sim)
        n_samples = int(rng.choice(lengths))
        iq = synthesize_iq(rng, scenes, network, sim, features.sample_rate_hz, n_samples)
        # The serving functions, applied to the whole chunk at once (same numbers).
        bands = band_power_dbfs(iq, features.sample_rate_hz, features) + calibration[None, :, None]
        present = scenes.present.astype(np.float32)
        xs.append(station_features(bands, features) * present[..., None])
        masks.append(present)
        targets.append(np.stack([scenes.tx_east_m, scenes.tx_north_m], axis=-1))
        lats.append(scenes.tx_latitude)
        lons.append(scenes.tx_longitude)
        done += n
        if progress is not None:
            progress(done, n_scenes)
    return Dataset(
        x=np.concatenate(xs),
        mask=np.concatenate(masks),
        target_m=np.concatenate(targets),
        latitude=np.concatenate(lats),
        longitude=np.concatenate(lons),
    )

"""Simulated data sets: scenes -> IQ -> the serving feature function.

Training, evaluation and the feature-parity test all build their inputs here,
through :func:`heimdall.features.build_features`, the function that serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from heimdall.features import FeatureParams, build_features
from heimdall.simulate.propagation import SimulationParams
from heimdall.simulate.scenes import SceneBatch, sample_scenes, synthesize_iq
from heimdall.stations import Network

DEFAULT_LENGTHS = (1024, 2048, 4096)
"""Recording lengths (samples) drawn for simulated scenes."""


@dataclass(frozen=True)
class Dataset:
    """Features and truth of simulated scenes (stations in network order)."""

    x_dbm: np.ndarray
    """(N, S, n_mels) float32 log mel power, dBm (not normalized)."""
    mask: np.ndarray
    """(N, S) float32, 1 where the station sent a recording."""
    target_m: np.ndarray
    """(N, 2) float64 true east/north of the network centroid, m."""
    latitude: np.ndarray
    """(N,) true latitude, degrees."""
    longitude: np.ndarray
    """(N,) true longitude, degrees."""

    def __len__(self) -> int:
        return int(self.x_dbm.shape[0])


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
    calibration = {s.id: s.calibration_db for s in network.stations}
    xs, masks, targets, lats, lons = [], [], [], [], []
    done = 0
    while done < n_scenes:
        n = min(chunk, n_scenes - done)
        scenes: SceneBatch = sample_scenes(rng, n, network, sim, features.sample_rate_hz)
        n_samples = int(rng.choice(lengths))
        iq = synthesize_iq(rng, scenes, network, sim, features.sample_rate_hz, n_samples)
        for i in range(n):
            rec = scene_recordings(iq[i], scenes.present[i], slots)
            x, mask = build_features(rec, slots, calibration, features)
            xs.append(x)
            masks.append(mask)
        targets.append(np.stack([scenes.tx_east_m, scenes.tx_north_m], axis=-1))
        lats.append(scenes.tx_latitude)
        lons.append(scenes.tx_longitude)
        done += n
        if progress is not None:
            progress(done, n_scenes)
    return Dataset(
        x_dbm=np.stack(xs),
        mask=np.stack(masks),
        target_m=np.concatenate(targets),
        latitude=np.concatenate(lats),
        longitude=np.concatenate(lons),
    )

"""Ready-to-post ``/api/v1/predict`` bodies built from simulated scenes."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import numpy as np

from heimdall.iq import encode_base64
from heimdall.simulate.families import TRAINING
from heimdall.simulate.scenes import sample_scenes, synthesize_iq
from heimdall.stations import Network, load_network

ENCODINGS = ("base64", "pairs")


def simulated_request(
    seed: int,
    n_samples: int = 4096,
    encoding: str = "base64",
    *,
    stations: Collection[str] | None = None,
    all_stations: bool = False,
    network: Network | None = None,
    sample_rate_hz: float = 48_000.0,
) -> dict[str, Any]:
    """A predict request body for the scene drawn with ``seed``, its truth under ``truth``.

    Stations record with the simulator's presence probability, or all of them
    (``all_stations``), or exactly ``stations``; each sends ``n_samples``
    samples at ``sample_rate_hz``, as base64 complex64 or as
    ``[[I, Q], ...]`` pairs (the float32 values a JSON client would send).
    The API ignores ``truth``.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    network = network or load_network()
    sim = TRAINING.but(station_presence=(1.0, 1.0) if all_stations else (0.9, 0.9))
    rate = sample_rate_hz
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, 1, network, sim)
    if stations is not None:
        unknown = set(stations) - set(network.ids)
        if unknown:
            raise ValueError(f"unknown stations {sorted(unknown)}")
        present = np.array([[sid in stations for sid in network.ids]])
        scenes = dataclasses.replace(scenes, present=present)
    iq = synthesize_iq(rng, scenes, network, sim, rate, n_samples)[0]
    receivers = []
    for j, sid in enumerate(network.ids):
        if not scenes.present[0, j]:
            continue
        x = np.ascontiguousarray(iq[j], dtype="<c8")
        value: Any = (
            encode_base64(x) if encoding == "base64" else x.view("<f4").reshape(-1, 2).tolist()
        )
        receivers.append({"station": sid, "iq": value})
    return {
        "receivers": receivers,
        "sample_rate_hz": rate,
        "frequency_mhz": sim.carrier_mhz,
        "truth": {
            "latitude": round(float(scenes.tx_latitude[0]), 6),
            "longitude": round(float(scenes.tx_longitude[0]), 6),
            "tx_power_dbm": round(float(scenes.tx_power_dbm[0]), 2),
            "seed": seed,
        },
    }

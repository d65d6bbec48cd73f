"""Predict request bodies built from simulated scenes, as ``heimdall simulate`` builds them.

Each seed gives a different scene, so distinct seeds give distinct inputs
(distinct cache keys): a load test on them measures the workers, not the cache.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np

from heimdall.features import FeatureParams
from heimdall.iq import DecodedRequest, decode_request, encode_base64
from heimdall.modelcard import CARD_FILENAME, ModelCard
from heimdall.registry import shipped_model_dir
from heimdall.simulate import SimulationParams, sample_scenes, synthesize_iq
from heimdall.stations import Network, load_network

ENCODINGS = ("base64", "pairs")


@lru_cache(maxsize=1)
def _network() -> Network:
    return load_network()


def simulated_request(
    seed: int, samples: int = 4096, encoding: str = "base64", *, all_stations: bool = False
) -> dict[str, Any]:
    """A ``POST /api/v1/predict`` body from the scene drawn with ``seed``.

    The same recipe as ``heimdall simulate`` (``heimdall.cli.cmd_simulate``):
    the packaged network, each station present with probability 0.9 (at least
    the simulator's minimum), ``samples`` complex samples per station at the
    features' sample rate, as base64 complex64 or ``[[I, Q], ...]`` pairs.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    network = _network()
    sim = SimulationParams(station_presence=1.0 if all_stations else 0.9)
    rate = FeatureParams().sample_rate_hz
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, 1, network, sim, rate)
    iq = synthesize_iq(rng, scenes, network, sim, rate, samples)[0]
    receivers = []
    for j, sid in enumerate(network.ids):
        if not scenes.present[0, j]:
            continue
        x = iq[j]
        value: Any = (
            encode_base64(x)
            if encoding == "base64"
            # float32 -> Python float, as the CLI writes them: what a JSON client sends.
            else np.ascontiguousarray(x, dtype="<c8").view("<f4").reshape(-1, 2).tolist()
        )
        receivers.append({"station": sid, "iq": value})
    return {"receivers": receivers, "sample_rate_hz": rate, "frequency_mhz": sim.carrier_mhz}


def request_bytes(seed: int, samples: int = 4096, encoding: str = "base64") -> bytes:
    """:func:`simulated_request` serialized as the JSON bytes a client posts."""
    return json.dumps(simulated_request(seed, samples, encoding)).encode()


@lru_cache(maxsize=1)
def shipped_card() -> ModelCard:
    """The card of the shipped model (stations, sample rate, band)."""
    return ModelCard.load(shipped_model_dir() / CARD_FILENAME)


def decoded_request(seed: int, samples: int = 4096) -> DecodedRequest:
    """The scene of ``seed`` decoded and validated as the API does before dispatch."""
    card = shipped_card()
    return decode_request(
        simulated_request(seed, samples, "base64"),
        stations=card.slots,
        sample_rate_hz=card.features.sample_rate_hz,
        band_mhz=card.band_mhz,
        min_stations=1,
    )

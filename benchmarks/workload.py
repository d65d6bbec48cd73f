"""Predict request bodies built from simulated scenes, as ``heimdall simulate`` builds them.

Each seed gives a different scene, so distinct seeds give distinct inputs
(distinct cache keys): a load test on them measures the workers, not the cache.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from heimdall.iq import DecodedRequest, decode_request
from heimdall.modelcard import CARD_FILENAME, ModelCard
from heimdall.registry import shipped_model_dir
from heimdall.simulate.requests import ENCODINGS
from heimdall.simulate.requests import simulated_request as simulated_request_body

__all__ = ["ENCODINGS", "decoded_request", "request_bytes", "shipped_card", "simulated_request"]


def simulated_request(
    seed: int, samples: int = 4096, encoding: str = "base64", *, all_stations: bool = False
) -> dict[str, Any]:
    """A ``POST /api/v1/predict`` body from the scene drawn with ``seed``.

    The same recipe as ``heimdall simulate`` (``heimdall.cli.cmd_simulate``):
    the packaged network, each station present with probability 0.9 (at least
    the simulator's minimum), ``samples`` complex samples per station at the
    features' sample rate, as base64 complex64 or ``[[I, Q], ...]`` pairs.
    """
    body = simulated_request_body(seed, samples, encoding, all_stations=all_stations)
    body.pop("truth")
    return body


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
        band_mhz=card.band_mhz,
        min_stations=1,
    )

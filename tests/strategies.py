"""Hypothesis strategies for Heimdall requests, shared by the property and API tests.

Valid predict bodies (known distinct stations, recordings in either encoding
at drawn levels) and arbitrary JSON values as ``json.loads`` can produce them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from heimdall.iq import MIN_SAMPLES, encode_base64
from heimdall.stations import load_network

STATIONS = load_network().ids
MIN_STATIONS = 3
BAND = (144.0, 146.0)


@st.composite
def recordings(draw: st.DrawFn, min_size: int = MIN_SAMPLES, max_size: int = 4096) -> np.ndarray:
    """A complex64 recording: noise plus a tone at a drawn level, sometimes with exact zeros.

    Drawn through a seed, not sample by sample: thousands of samples per
    example are too many for hypothesis to shrink usefully, and what varies
    the behaviour is the length, the level and the structure, which are drawn.
    """
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    level_db = draw(st.floats(-140.0, 60.0))
    tone_db = draw(st.floats(-40.0, 40.0))
    freq = draw(st.floats(-0.5, 0.5))
    rng = np.random.default_rng(seed)
    amplitude = 10.0 ** (level_db / 20.0)
    noise = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    tone = 10.0 ** (tone_db / 20.0) * np.exp(2j * np.pi * freq * np.arange(n))
    x = amplitude * (noise / math.sqrt(2.0) + tone)
    if draw(st.booleans()):
        start = draw(st.integers(0, n - 1))
        x[start : start + draw(st.integers(1, n))] = 0.0  # silence: a muted receiver
    return x.astype(np.complex64)


def as_pairs(x: np.ndarray) -> list[list[float]]:
    """``[[I, Q], ...]`` with the exact float32 values, as a JSON client would send them."""
    return np.ascontiguousarray(x, dtype="<c8").view("<f4").reshape(-1, 2).tolist()


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid predict body: 3+ distinct known stations, each recording pairs or base64."""
    chosen = draw(
        st.lists(st.sampled_from(STATIONS), min_size=MIN_STATIONS, max_size=6, unique=True)
    )
    receivers = []
    for sid in chosen:
        x = draw(recordings(max_size=1024))
        iq = encode_base64(x) if draw(st.booleans()) else as_pairs(x)
        receivers.append({"station": sid, "iq": iq})
    body: dict[str, Any] = {
        "receivers": receivers,
        "sample_rate_hz": draw(st.sampled_from([48000, 48000.0])),
    }
    if draw(st.booleans()):
        body["frequency_mhz"] = draw(st.floats(*BAND))
    return body


def json_values(*, non_finite: bool = True) -> st.SearchStrategy[Any]:
    """Any JSON document; with ``non_finite`` also NaN and Infinity.

    Python's ``json.loads`` accepts NaN and Infinity, and integers of any size,
    so a view can be handed those; an HTTP client following the JSON RFC
    sends no NaN.
    """
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(10**400), 10**400)
        | st.floats(allow_nan=non_finite, allow_infinity=non_finite)
        | st.text(max_size=20)
        | st.sampled_from(["", "AAAA", "====", "AAAAAAAA", *STATIONS])
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
        ),
        max_leaves=30,
    )


JSON = json_values()

"""Properties of IQ decoding and features, checked on generated input (hypothesis).

The example-based tests (test_iq.py, test_features.py) pin known answers; these
state what must hold for *every* input: a valid request decodes the same way
whatever its encoding or station order, anything else is refused with the
project's own 4xx error (never another exception, which the API would turn
into a 500), and features are finite, deterministic and shift by exactly
20 log10 g dB when the IQ is scaled by g.

Runs are derandomized (a fixed seed per test) so CI sees the same examples
every time; ``HYPOTHESIS_PROFILE=deep`` runs many more for a local hunt (with
``--timeout=0``: the damaged-request property alone then takes several minutes).
"""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import BAND, JSON, MIN_STATIONS, STATIONS, as_pairs, recordings, valid_bodies

from heimdall.errors import HeimdallError
from heimdall.features import (
    POWER_FLOOR,
    FeatureParams,
    band_power_dbfs,
    build_features,
    station_features,
)
from heimdall.iq import (
    MAX_SAMPLES,
    MIN_SAMPLES,
    DecodedRequest,
    decode_iq,
    decode_request,
    encode_base64,
)
from heimdall.stations import load_network

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("deep", parent=settings.get_profile("ci"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NETWORK = load_network()
RATE = 48_000.0
P = FeatureParams()
FLOAT32_MAX = float(np.finfo(np.float32).max)


def decode(payload: Any) -> DecodedRequest:
    """The service's validation with the shipped model's contract."""
    return decode_request(payload, stations=STATIONS, band_mhz=BAND, min_stations=MIN_STATIONS)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> Any:
    """A valid body with one part replaced, removed, duplicated or cut."""
    body = draw(valid_bodies())
    receivers = body["receivers"]
    i = draw(st.integers(0, len(receivers) - 1))
    mutation = draw(
        st.sampled_from(
            [
                "body",
                "key",
                "drop-key",
                "receiver",
                "station",
                "iq",
                "duplicate",
                "truncate-base64",
                "pair",
                "too-few",
                "huge-samples",
            ]
        )
    )
    if mutation == "body":
        return draw(JSON)
    if mutation == "key":
        body[draw(st.sampled_from(["receivers", "sample_rate_hz", "frequency_mhz"]))] = draw(JSON)
    elif mutation == "drop-key":
        body.pop(draw(st.sampled_from(["receivers", "sample_rate_hz"])))
    elif mutation == "receiver":
        receivers[i] = draw(JSON)
    elif mutation == "station":
        receivers[i]["station"] = draw(JSON)
    elif mutation == "iq":
        receivers[i]["iq"] = draw(JSON)
    elif mutation == "duplicate":
        receivers.append(dict(receivers[i]))
    elif mutation == "truncate-base64":
        text = encode_base64(decode_iq(receivers[i]["iq"], "x"))
        receivers[i]["iq"] = text[: draw(st.integers(0, len(text) - 1))]
    elif mutation == "pair":
        x = decode_iq(receivers[i]["iq"], "x")
        pairs = as_pairs(x)
        pairs[draw(st.integers(0, len(pairs) - 1))] = draw(JSON)
        receivers[i]["iq"] = pairs
    elif mutation == "too-few":
        del receivers[MIN_STATIONS - 1 :]
    else:  # finite but absurd samples, up to the float32 range
        x = decode_iq(receivers[i]["iq"], "x").copy()
        x[draw(st.integers(0, x.size - 1))] = draw(st.floats(1e6, FLOAT32_MAX))
        receivers[i]["iq"] = encode_base64(x) if draw(st.booleans()) else as_pairs(x)
    return body


# -- decoding: valid requests ----------------------------------------------------------------


@given(x=recordings(max_size=MAX_SAMPLES // 8))
def test_pairs_and_base64_decode_to_the_same_samples(x: np.ndarray) -> None:
    from_pairs = decode_iq(as_pairs(x), "torino")
    from_base64 = decode_iq(encode_base64(x), "torino")

    assert from_pairs.dtype == from_base64.dtype == np.complex64
    assert from_pairs.tobytes() == from_base64.tobytes() == x.tobytes()


@given(body=valid_bodies(), data=st.data())
def test_canonical_form_ignores_encoding_and_station_order(body: dict[str, Any], data: Any) -> None:
    shuffled = data.draw(st.permutations(body["receivers"]))
    reencoded = [
        {
            "station": r["station"],
            "iq": as_pairs(decode_iq(r["iq"], "x"))
            if isinstance(r["iq"], str)
            else encode_base64(decode_iq(r["iq"], "x")),
        }
        for r in shuffled
    ]

    a = decode(body)
    b = decode({**body, "receivers": reencoded})

    assert a.to_bytes() == b.to_bytes()
    assert a.digest() == b.digest()
    assert list(a.stations) == sorted(r["station"] for r in body["receivers"])


@given(body=valid_bodies())
def test_canonical_bytes_round_trip(body: dict[str, Any]) -> None:
    decoded = decode(body)

    again = DecodedRequest.from_bytes(decoded.to_bytes())

    assert again.to_bytes() == decoded.to_bytes()
    assert again.stations == decoded.stations
    assert again.sample_rate_hz == decoded.sample_rate_hz == RATE
    assert again.frequency_mhz == decoded.frequency_mhz
    for (_, x), (_, y) in zip(again.recordings, decoded.recordings, strict=True):
        assert x.dtype == np.complex64 and x.tobytes() == y.tobytes()


@given(body=valid_bodies())
def test_a_request_survives_a_json_round_trip(body: dict[str, Any]) -> None:
    # What the client serialises is what the service decodes: float32 values
    # printed by json and parsed back are the same float32 values.
    assert decode(json.loads(json.dumps(body))).digest() == decode(body).digest()


@given(raw=st.binary(min_size=0, max_size=8 * 700))
def test_any_bytes_as_base64_decode_exactly_or_are_refused(raw: bytes) -> None:
    text = base64.b64encode(raw).decode()
    try:
        x = decode_iq(text, "torino")
    except HeimdallError as exc:
        assert exc.status == 422
        finite = np.all(np.isfinite(np.frombuffer(raw[: len(raw) - len(raw) % 8], "<f4")))
        assert len(raw) % 8 or not MIN_SAMPLES <= len(raw) // 8 <= MAX_SAMPLES or not finite
    else:
        assert x.tobytes() == raw


# -- decoding: everything else is a 4xx ---------------------------------------------------------


def _accepted_or_4xx(payload: Any) -> DecodedRequest | None:
    try:
        decoded = decode(payload)
    except HeimdallError as exc:
        assert 400 <= exc.status < 500, exc.to_problem()
        problem = exc.to_problem()
        json.dumps(problem, allow_nan=False)  # the API must be able to send it
        return None
    return decoded


@given(payload=JSON)
def test_any_json_document_is_decoded_or_refused_with_a_4xx(payload: Any) -> None:
    _accepted_or_4xx(payload)


@settings(max_examples=5 * settings.default.max_examples)
@given(payload=mutated_bodies())
def test_a_damaged_request_is_refused_with_a_4xx_or_still_valid(payload: Any) -> None:
    decoded = _accepted_or_4xx(payload)
    if decoded is None:
        return
    # What passes satisfies the contract the workers rely on.
    assert len(decoded.stations) >= MIN_STATIONS
    assert list(decoded.stations) == sorted(set(decoded.stations))
    assert set(decoded.stations) <= set(STATIONS)
    assert decoded.sample_rate_hz == RATE
    assert BAND[0] <= decoded.frequency_mhz <= BAND[1]
    for _, x in decoded.recordings:
        assert x.dtype == np.complex64
        assert MIN_SAMPLES <= x.size <= MAX_SAMPLES
        assert np.all(np.isfinite(x.view(np.float32)))
        features, _ = build_features({"s": x}, ["s"], {"s": 0.0}, P, decoded.sample_rate_hz)
        assert np.all(np.isfinite(features)), "an accepted recording must give finite features"


@pytest.mark.parametrize("key", ["sample_rate_hz", "frequency_mhz"])
def test_an_integer_beyond_float_range_is_a_4xx(key: str) -> None:
    # json.loads turns 1 followed by 400 zeros into an int that no float holds.
    body = json.loads(
        json.dumps({**_valid_example(), key: 0}).replace(f'"{key}": 0', f'"{key}": 1{"0" * 400}')
    )
    assert body[key] == 10**400

    with pytest.raises(HeimdallError) as caught:
        decode(body)

    assert caught.value.status == 400 and caught.value.field == key


def test_samples_beyond_a_receiver_scale_are_a_4xx() -> None:
    body = _valid_example()
    x = decode_iq(body["receivers"][0]["iq"], "x").copy()
    x[7] = complex(FLOAT32_MAX, 0.0)
    body["receivers"][0]["iq"] = encode_base64(x)

    with pytest.raises(HeimdallError) as caught:
        decode(body)

    assert caught.value.status == 422
    assert caught.value.field == "receivers[0].iq"


def _valid_example() -> dict[str, Any]:
    tone = (0.01 * np.exp(2j * np.pi * 0.05 * np.arange(1024))).astype(np.complex64)
    return {
        "receivers": [{"station": s, "iq": encode_base64(tone)} for s in STATIONS[:3]],
        "sample_rate_hz": 48000,
        "frequency_mhz": 145.5,
    }


# -- features --------------------------------------------------------------------------------


@given(x=recordings())
def test_features_are_finite_and_deterministic(x: np.ndarray) -> None:
    first = band_power_dbfs(x, RATE, P)
    again = band_power_dbfs(x.copy(), RATE, P)

    assert first.shape == (P.n_bands,)
    assert np.all(np.isfinite(first))
    assert first.tobytes() == again.tobytes()


@given(x=recordings(max_size=2048), gain_db=st.floats(-60.0, 60.0))
def test_scaling_the_iq_by_g_shifts_every_band_by_20_log10_g(x: np.ndarray, gain_db: float) -> None:
    g = 10.0 ** (gain_db / 20.0)
    scaled = (x.astype(np.complex128) * g).astype(np.complex64)

    before = band_power_dbfs(x, RATE, P)
    after = band_power_dbfs(scaled, RATE, P)

    # Where the band power is well above the floor and not in float32 rounding
    # noise of a much stronger band, the shift is exact to float32 precision.
    floor_db = 10.0 * math.log10(POWER_FLOOR)
    strongest = max(before.max(), after.max() - gain_db)
    usable = np.minimum(before, after - gain_db) > max(floor_db + 40.0, strongest - 80.0)
    assume(usable.any())
    np.testing.assert_allclose((after - before)[usable], gain_db, atol=0.01)


@given(
    n=st.integers(MIN_SAMPLES, 4096),
    amplitude_db=st.floats(-120.0, 60.0),
    offset_hz=st.floats(-3_000.0, 3_000.0),
)
def test_a_carrier_in_the_channel_puts_its_whole_power_in_the_bands(
    n: int, amplitude_db: float, offset_hz: float
) -> None:
    # A carrier of amplitude A inside the measured channel: the bands add up
    # to A^2, i.e. 20 log10 A dBFS, as docs/iq-input.md promises, whatever
    # the resampling from the recording's rate did.
    a = 10.0 ** (amplitude_db / 20.0)
    t = np.arange(n) / RATE
    x = (a * np.exp(2j * np.pi * offset_hz * t)).astype(np.complex64)

    total = np.sum(10.0 ** (band_power_dbfs(x, RATE, P) / 10.0) - POWER_FLOOR)

    assert 10.0 * math.log10(total) == pytest.approx(amplitude_db, abs=0.5)


@given(data=st.data(), n_stations=st.integers(1, len(STATIONS)))
def test_features_follow_the_slots_not_the_order_of_the_recordings(
    data: Any, n_stations: int
) -> None:
    chosen = data.draw(
        st.lists(st.sampled_from(STATIONS), min_size=n_stations, max_size=n_stations, unique=True)
    )
    recs = {sid: data.draw(recordings(max_size=1024)) for sid in chosen}
    reordered = dict(data.draw(st.permutations(list(recs.items()))))
    calibration = NETWORK.calibration(STATIONS)
    cal = dict(zip(STATIONS, calibration.tolist(), strict=True))

    x1, mask1 = build_features(recs, STATIONS, cal, P, RATE)
    x2, mask2 = build_features(reordered, STATIONS, cal, P, RATE)

    assert x1.tobytes() == x2.tobytes() and mask1.tobytes() == mask2.tobytes()
    assert mask1.sum() == n_stations
    for slot, sid in enumerate(STATIONS):
        expected = (
            station_features(band_power_dbfs(recs[sid], RATE, P) + cal[sid], P)
            if sid in recs
            else np.zeros(P.n_features)
        )
        np.testing.assert_array_equal(x1[slot], expected)

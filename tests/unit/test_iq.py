"""Decoding and validation of IQ payloads: both encodings and every rejection."""

import base64
import struct

import numpy as np
import pytest

from heimdall import errors
from heimdall.iq import (
    MAX_SAMPLES,
    MIN_SAMPLES,
    DecodedRequest,
    decode_iq,
    decode_request,
    encode_base64,
)

STATIONS = ("giaveno", "torino", "genova", "milano-baggio")


def tone(n=1024, amplitude=0.01):
    t = np.arange(n)
    return (amplitude * np.exp(2j * np.pi * 0.05 * t)).astype(np.complex64)


def body(**overrides):
    b = {
        "receivers": [{"station": s, "iq": encode_base64(tone())} for s in STATIONS[:3]],
        "sample_rate_hz": 48000,
        "frequency_mhz": 145.5,
    }
    b.update(overrides)
    return b


def decode(b, min_stations=3):
    return decode_request(
        b,
        stations=STATIONS,
        band_mhz=(144.0, 146.0),
        min_stations=min_stations,
    )


def test_base64_decodes_little_endian_complex64_exactly():
    raw = b"".join(struct.pack("<ff", i * 0.5, -i * 0.25) for i in range(MIN_SAMPLES))
    x = decode_iq(base64.b64encode(raw).decode(), "torino")
    assert x.dtype == np.complex64
    assert x[3] == pytest.approx(1.5 - 0.75j)
    assert x.size == MIN_SAMPLES


def test_pairs_decode_to_the_same_samples_as_base64():
    x = tone()
    pairs = [[float(v.real), float(v.imag)] for v in x]
    np.testing.assert_array_equal(decode_iq(pairs, "torino"), decode_iq(encode_base64(x), "torino"))


def test_pairs_keep_signed_zeros_and_integers_exactly():
    pairs = [[-0.0, 0.0], [0.0, -0.0], [3, -2]] + [[0.25, -0.5]] * (MIN_SAMPLES - 3)
    x = decode_iq(pairs, "torino")
    expected = np.array([complex(i, q) for i, q in pairs], dtype=np.complex64)
    assert x.tobytes() == expected.tobytes()


def test_pairs_of_float_subclasses_decode_like_plain_floats():
    # Not what a JSON parser gives, but a Python caller may pass numpy floats.
    plain = [[0.5, -0.25]] * MIN_SAMPLES
    numpy_floats = [[np.float64(0.5), np.float64(-0.25)]] * MIN_SAMPLES
    assert decode_iq(numpy_floats, "torino").tobytes() == decode_iq(plain, "torino").tobytes()


@pytest.mark.parametrize(
    ("bad", "index"),
    [([1.0, None], 700), ([False, 1.0], 1023), ((1.0, 2.0), 5), ([[1.0], 2.0], 0), (3.0, 9)],
)
def test_the_first_bad_pair_is_named_among_good_ones(bad, index):
    pairs = [[0.1, 0.2]] * 1024
    pairs[index] = bad
    pairs[-1] = "later and also bad"
    with pytest.raises(errors.InvalidIQ, match=rf"iq\[{index}\] is not an") as info:
        decode_iq(pairs, "torino", field="receivers[2].iq")
    assert info.value.field == f"receivers[2].iq[{index}]"


def test_canonical_form_sorts_stations_and_round_trips():
    req = decode(body())
    assert req.stations == tuple(sorted(STATIONS[:3]))
    again = DecodedRequest.from_bytes(req.to_bytes())
    assert again.stations == req.stations
    for (_, a), (_, b) in zip(again.recordings, req.recordings, strict=True):
        np.testing.assert_array_equal(a, b)
    shuffled = body(receivers=list(reversed(body()["receivers"])))
    assert decode(shuffled).digest() == req.digest()


def test_digest_changes_with_the_samples():
    b2 = body()
    b2["receivers"][0]["iq"] = encode_base64(tone(amplitude=0.02))
    assert decode(b2).digest() != decode(body()).digest()


@pytest.mark.parametrize(
    ("iq", "message"),
    [
        (encode_base64(tone(MIN_SAMPLES - 1)), "too short"),
        (encode_base64(tone(MAX_SAMPLES + 1)), "too long"),
        (encode_base64(np.full(1024, np.nan, dtype=np.complex64)), "NaN or Inf"),
        (encode_base64(np.full(1024, np.inf, dtype=np.complex64)), "NaN or Inf"),
        ([[1.0, 2.0], [3.0]] + [[0.0, 0.0]] * 1024, r"iq\[1\] is not an"),
        ([[1.0, "x"]] * 1024, r"iq\[0\] is not an"),
        ([[True, 1.0]] * 1024, r"iq\[0\] is not an"),
        ("not base64!!", "not valid base64"),
        (base64.b64encode(b"\0" * (8 * 600 + 4)).decode(), "not a multiple of 8"),
        ({"i": [1]}, r"list of \[I, Q\] pairs"),
    ],
)
def test_bad_recordings_are_rejected_naming_the_station(iq, message):
    with pytest.raises(errors.InvalidIQ, match=message) as info:
        decode_iq(iq, "torino")
    assert "torino" in info.value.detail
    assert info.value.status == 422


def test_pairs_beyond_float_range_are_rejected():
    pairs = [[0.1, 0.2]] * 1024
    pairs[3] = [10**400, 0]
    with pytest.raises(errors.InvalidIQ, match="too large"):
        decode_iq(pairs, "genova")
    pairs[3] = [1e300, 0.0]  # finite as float64, infinite as complex64
    with pytest.raises(errors.InvalidIQ, match="float32 range"):
        decode_iq(pairs, "genova")


def test_pairs_with_nan_are_rejected():
    pairs = [[0.1, 0.2]] * 1024
    pairs[5] = [float("nan"), 0.0]
    with pytest.raises(errors.InvalidIQ, match="NaN"):
        decode_iq(pairs, "genova")


def test_unknown_station_is_rejected():
    b = body()
    b["receivers"][0]["station"] = "atlantis"
    with pytest.raises(errors.UnknownStation, match="atlantis") as info:
        decode(b)
    assert info.value.field == "receivers[0].station"


def test_same_station_twice_is_rejected():
    b = body()
    b["receivers"][1]["station"] = b["receivers"][0]["station"]
    with pytest.raises(errors.DuplicateStation, match="more than once"):
        decode(b)


@pytest.mark.parametrize("rate", [8_000, 12_000, 96_000, 2_000_000])
def test_any_sample_rate_in_the_range_is_accepted(rate):
    n = max(MIN_SAMPLES, int(rate * 0.02))
    b = body(receivers=[{"station": s, "iq": encode_base64(tone(n))} for s in STATIONS[:3]])
    assert decode({**b, "sample_rate_hz": rate}).sample_rate_hz == rate


@pytest.mark.parametrize("rate", [4_000, 4_000_000])
def test_sample_rate_outside_the_range_is_rejected(rate):
    with pytest.raises(errors.SampleRateMismatch, match="8000 to 2e"):
        decode(body(sample_rate_hz=rate))


def test_recording_shorter_than_the_minimum_duration_is_rejected():
    with pytest.raises(errors.InvalidIQ, match="ms needed"):
        decode(body(sample_rate_hz=1_000_000))


def test_frequency_outside_the_band_is_rejected():
    with pytest.raises(errors.FrequencyOutOfBand):
        decode(body(frequency_mhz=433.0))


def test_too_few_stations_is_rejected():
    with pytest.raises(errors.TooFewStations, match="at least 4"):
        decode(body(), min_stations=4)


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"receivers": "x", "sample_rate_hz": 48000},
        {"receivers": [{"station": "torino"}], "sample_rate_hz": 48000},
        {"receivers": [{"station": 7, "iq": []}], "sample_rate_hz": 48000},
        {"receivers": []},
        {"receivers": [], "sample_rate_hz": "fast"},
    ],
)
def test_malformed_bodies_are_400(bad):
    with pytest.raises(errors.InvalidRequest) as info:
        decode(bad)
    assert info.value.status == 400

"""Decoding and validation of IQ recordings.

A request carries one complex-baseband recording per station, either as JSON
``[[I, Q], ...]`` pairs or as base64 of little-endian complex64 (interleaved
float32 I, Q). Everything a client can get wrong is rejected here with an error
that names the station and the problem; what passes is a
:class:`DecodedRequest` in canonical form (stations sorted by id, complex64),
which also defines the cache key and the compact binary form handed to workers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from heimdall.errors import (
    DuplicateStation,
    FrequencyOutOfBand,
    InvalidIQ,
    InvalidRequest,
    SampleRateMismatch,
    TooFewStations,
    UnknownStation,
)

MIN_SAMPLES = 512
MAX_SAMPLES = 65_536
MIN_SAMPLE_RATE_HZ = 8_000.0
"""Lowest accepted recording rate, Hz (a 12.5 kHz channel needs 12 kHz to be whole)."""
MAX_SAMPLE_RATE_HZ = 2_000_000.0
"""Highest accepted recording rate, Hz; the features band-limit and resample it."""
MIN_DURATION_S = 0.010
"""Shortest recording, s: enough STFT frames for a power estimate at the model's rate."""
MAX_ABS_SAMPLE = 1e6
"""Largest |I| or |Q| accepted: 120 dB above full scale, far beyond any receiver's
recording, and far enough below the float32 range that powers cannot overflow."""
_BLOB_MAGIC = b"HMDL1"


@dataclass(frozen=True)
class DecodedRequest:
    """A validated request: recordings sorted by station id, complex64."""

    recordings: tuple[tuple[str, np.ndarray], ...]
    sample_rate_hz: float
    frequency_mhz: float

    @property
    def stations(self) -> tuple[str, ...]:
        """Station ids, sorted."""
        return tuple(sid for sid, _ in self.recordings)

    def as_mapping(self) -> dict[str, np.ndarray]:
        """Station id -> complex64 samples."""
        return dict(self.recordings)

    def to_bytes(self) -> bytes:
        """Canonical binary form: the cache key's input and the worker hand-off."""
        return self._canonical

    @cached_property
    def _canonical(self) -> bytes:
        # Built once: the API needs it twice (digest, then the payload it stores).
        header = json.dumps(
            {
                "sample_rate_hz": self.sample_rate_hz,
                "frequency_mhz": self.frequency_mhz,
                "stations": [[sid, int(x.size)] for sid, x in self.recordings],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        parts = [_BLOB_MAGIC, struct.pack("<I", len(header)), header]
        parts.extend(np.ascontiguousarray(x, dtype="<c8").tobytes() for _, x in self.recordings)
        return b"".join(parts)

    def digest(self) -> str:
        """sha256 (hex) of the canonical form."""
        return hashlib.sha256(self._canonical).hexdigest()

    @classmethod
    def from_bytes(cls, blob: bytes) -> DecodedRequest:
        """Inverse of :meth:`to_bytes`."""
        if not blob.startswith(_BLOB_MAGIC):
            raise ValueError("not a Heimdall request blob")
        offset = len(_BLOB_MAGIC)
        (hlen,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        header = json.loads(blob[offset : offset + hlen])
        offset += hlen
        recordings = []
        for sid, n in header["stations"]:
            x = np.frombuffer(blob, dtype="<c8", count=n, offset=offset).astype(np.complex64)
            offset += 8 * n
            recordings.append((sid, x))
        return cls(tuple(recordings), header["sample_rate_hz"], header["frequency_mhz"])


def decode_iq(value: Any, station: str, field: str = "iq") -> np.ndarray:
    """Decode one station's recording (pairs or base64 complex64) to complex64.

    Raises :class:`InvalidIQ` naming the station for malformed data, a length
    outside [512, 65 536] samples, or non-finite samples.
    """
    if isinstance(value, str):
        x = _decode_base64(value, station, field)
    elif isinstance(value, list):
        x = _decode_pairs(value, station, field)
    else:
        raise InvalidIQ(
            f"station {station!r}: iq must be a list of [I, Q] pairs or a base64 string "
            f"of little-endian complex64, got {type(value).__name__}",
            field=field,
        )
    if x.size < MIN_SAMPLES:
        raise InvalidIQ(
            f"station {station!r}: recording too short: {x.size} samples, "
            f"at least {MIN_SAMPLES} needed",
            field=field,
        )
    if x.size > MAX_SAMPLES:
        raise InvalidIQ(
            f"station {station!r}: recording too long: {x.size} samples, "
            f"at most {MAX_SAMPLES} accepted",
            field=field,
        )
    if not np.all(np.isfinite(x.view(np.float32))):
        raise InvalidIQ(f"station {station!r}: recording contains NaN or Inf", field=field)
    if np.abs(x.view(np.float32)).max() > MAX_ABS_SAMPLE:
        raise InvalidIQ(
            f"station {station!r}: a sample exceeds {MAX_ABS_SAMPLE:g} in magnitude; "
            "IQ is expected in full-scale units (|x| = 1 is 0 dBFS)",
            field=field,
        )
    return x


def _decode_base64(text: str, station: str, field: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidIQ(
            f"station {station!r}: iq is not valid base64 ({exc})", field=field
        ) from exc
    if len(raw) % 8:
        raise InvalidIQ(
            f"station {station!r}: base64 iq decodes to {len(raw)} bytes, not a multiple of 8 "
            "(one complex64 sample is 8 bytes: float32 I, float32 Q, little-endian)",
            field=field,
        )
    return np.frombuffer(raw, dtype="<c8").astype(np.complex64)


def _is_pair(p: Any) -> bool:
    return (
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
    )


def _decode_pairs(pairs: list[Any], station: str, field: str) -> np.ndarray:
    # A JSON parser gives exact lists, floats and ints: the type sets below are
    # built at C speed (~0.1 us per sample, against ~1 us for a per-pair Python
    # check). Anything else (a bad item, or a subclass such as numpy's float64
    # from a Python caller) takes the per-pair check, which names the bad item.
    samples = itertools.chain.from_iterable
    plain = (
        set(map(type, pairs)) <= {list}
        and set(map(len, pairs)) <= {2}
        and set(map(type, samples(pairs))) <= {float, int}
    )
    if not plain:
        bad = next((i for i, p in enumerate(pairs) if not _is_pair(p)), None)
        if bad is not None:
            raise InvalidIQ(
                f"station {station!r}: iq[{bad}] is not an [I, Q] pair of two numbers",
                field=f"{field}[{bad}]",
            )
    try:
        # I, Q, I, Q, ... read straight from the lists: no nested-sequence
        # shape discovery, and the float64 buffer is the complex128 one.
        flat = np.fromiter(samples(pairs), dtype=np.float64, count=2 * len(pairs))
    except OverflowError as exc:  # an integer beyond float range, e.g. 10**400
        raise InvalidIQ(
            f"station {station!r}: a sample is too large to be a number ({exc})", field=field
        ) from exc
    if not np.all(np.isfinite(flat)):
        raise InvalidIQ(f"station {station!r}: recording contains NaN or Inf", field=field)
    if np.abs(flat).max(initial=0.0) > np.finfo(np.float32).max:
        raise InvalidIQ(
            f"station {station!r}: a sample exceeds the float32 range of complex64", field=field
        )
    return flat.view(np.complex128).astype(np.complex64)


def _number(payload: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = payload.get(key, default)
    if value is None:
        raise InvalidRequest(f"'{key}' is required", field=key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{key}' must be a finite number", field=key)
    try:
        number = float(value)
    except OverflowError:  # an integer no float holds, e.g. 10**400
        number = math.inf
    if not math.isfinite(number):
        raise InvalidRequest(f"'{key}' must be a finite number", field=key)
    return number


def decode_request(
    payload: Any,
    *,
    stations: Sequence[str],
    band_mhz: tuple[float, float],
    min_stations: int,
) -> DecodedRequest:
    """Validate a predict request body and decode its recordings.

    ``stations`` are the ids the model knows, ``band_mhz`` the carrier range it
    was trained for. Any sample rate in [8 kHz, 2 MHz] is accepted (the features
    resample), with at least ``MIN_DURATION_S`` of recording per station.
    """
    if not isinstance(payload, Mapping):
        raise InvalidRequest("request body must be a JSON object")
    receivers = payload.get("receivers")
    if not isinstance(receivers, list):
        raise InvalidRequest(
            "'receivers' must be a list of {station, iq} objects", field="receivers"
        )

    rate = _number(payload, "sample_rate_hz")
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise SampleRateMismatch(
            f"sample_rate_hz is {rate:g}; accepted rates are {MIN_SAMPLE_RATE_HZ:g} to "
            f"{MAX_SAMPLE_RATE_HZ:g} Hz",
            field="sample_rate_hz",
        )
    low, high = band_mhz
    freq = _number(payload, "frequency_mhz", (low + high) / 2)
    if not low <= freq <= high:
        raise FrequencyOutOfBand(
            f"frequency_mhz {freq:g} is outside the model's band {low:g}-{high:g} MHz",
            field="frequency_mhz",
        )

    known = set(stations)
    decoded: dict[str, np.ndarray] = {}
    for i, item in enumerate(receivers):
        where = f"receivers[{i}]"
        if not isinstance(item, Mapping) or "station" not in item or "iq" not in item:
            raise InvalidRequest(f"{where} must be an object with 'station' and 'iq'", field=where)
        sid = item["station"]
        if not isinstance(sid, str):
            raise InvalidRequest(f"{where}.station must be a string", field=f"{where}.station")
        if sid not in known:
            raise UnknownStation(
                f"station {sid!r} is not in the model's network (known: {', '.join(stations)})",
                field=f"{where}.station",
                station=sid,
            )
        if sid in decoded:
            raise DuplicateStation(
                f"station {sid!r} appears more than once", field=f"{where}.station", station=sid
            )
        decoded[sid] = decode_iq(item["iq"], sid, field=f"{where}.iq")
        if decoded[sid].size < MIN_DURATION_S * rate:
            raise InvalidIQ(
                f"station {sid!r}: recording too short: {decoded[sid].size} samples at "
                f"{rate:g} Hz is {decoded[sid].size / rate * 1e3:.1f} ms, at least "
                f"{MIN_DURATION_S * 1e3:g} ms needed",
                field=f"{where}.iq",
            )

    if len(decoded) < min_stations:
        raise TooFewStations(
            f"{len(decoded)} station(s) given, at least {min_stations} needed to localize",
            field="receivers",
        )
    recordings = tuple(sorted(decoded.items()))
    return DecodedRequest(recordings, rate, freq)


def encode_base64(x: np.ndarray) -> str:
    """base64 of little-endian complex64: the compact request encoding."""
    return base64.b64encode(np.ascontiguousarray(x, dtype="<c8").tobytes()).decode("ascii")

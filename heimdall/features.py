"""IQ recordings -> per-station received power, noise and detection.

One recording, at any sample rate in the accepted range, becomes three
physically meaningful numbers::

    IQ (complex64, dBFS, rate fs) -> resample to the model rate (band-limited)
      -> STFT (Hann) power per bin -> mean over frames
      -> power in 1 kHz bands of |f| within the channel -> + calibration (dBm)
      -> channel power, noise estimate (quietest band), signal = channel - noise, detected?

Absolute received power is what localizes a transmitter, so nothing here
normalizes per recording. Everything is computed inside the channel
(``|f| <= channel_half_width_hz``), which every accepted rate contains and
the resampler leaves untouched, so the features do not depend on the rate the
receiver recorded at. The same functions build the training set and serve
requests, and they are deterministic: the same input gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import fft as sp_fft
from scipy import signal

BOLTZMANN_DBM_PER_HZ = -174.0
"""Thermal noise density kT at 290 K, dBm/Hz."""
STATION_FEATURES = ("signal_dbm", "noise_dbm", "detected")
"""The per-station feature vector, in order."""
POWER_FLOOR = 1e-30
"""Power added before the logarithm, linear units: keeps silent bands finite."""


@dataclass(frozen=True)
class FeatureParams:
    """Resampling, STFT and detection parameters; stored in every model card."""

    sample_rate_hz: float = 16_000.0
    """Rate every recording is resampled to before the STFT, Hz."""
    n_fft: int = 64
    hop: int = 32
    channel_half_width_hz: float = 5_000.0
    """Power is measured in |f| <= this (a 12.5 kHz channel, clear of resampler edges), Hz."""
    n_bands: int = 5
    """Bands of equal width over |f| in the channel; the quietest one estimates the noise."""
    noise_figure_min_db: float = 2.0
    """Quietest receiver assumed: the noise estimate is not allowed below kT B + this, dB."""
    noise_figure_max_db: float = 12.0
    """Noisiest receiver assumed: the noise estimate is capped at kT B + this, dB."""
    detection_snr_db: float = 0.0
    """Signal-to-noise ratio in the channel at which a station counts as having heard it, dB."""

    def to_dict(self) -> dict[str, float | int]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, float | int]) -> FeatureParams:
        """Inverse of :meth:`to_dict`."""
        return cls(
            sample_rate_hz=float(data["sample_rate_hz"]),
            n_fft=int(data["n_fft"]),
            hop=int(data["hop"]),
            channel_half_width_hz=float(data["channel_half_width_hz"]),
            n_bands=int(data["n_bands"]),
            noise_figure_min_db=float(data["noise_figure_min_db"]),
            noise_figure_max_db=float(data["noise_figure_max_db"]),
            detection_snr_db=float(data["detection_snr_db"]),
        )

    @property
    def channel_bandwidth_hz(self) -> float:
        """Two-sided bandwidth the channel power is measured over, Hz."""
        return 2.0 * self.channel_half_width_hz

    @property
    def n_features(self) -> int:
        """Length of one station's feature vector."""
        return len(STATION_FEATURES)


def resample(iq: np.ndarray, from_hz: float, to_hz: float) -> np.ndarray:
    """Band-limit and resample complex IQ (last axis) from ``from_hz`` to ``to_hz``.

    Polyphase (``scipy.signal.resample_poly``, Kaiser-windowed FIR): the
    anti-alias filter cuts at the lower of the two Nyquist frequencies, so a
    recording at a higher rate loses what lies outside the model's band,
    never folds it in.
    """
    if from_hz == to_hz:
        return np.asarray(iq, dtype=np.complex64)
    ratio = Fraction(to_hz / from_hz).limit_denominator(1000)
    x = np.asarray(iq, dtype=np.complex64)
    # I and Q separately: the same numbers as one complex call, at under half the time.
    up, down = ratio.numerator, ratio.denominator
    h = _antialias_filter(up, down)
    out = np.empty((*x.shape[:-1], -(-x.shape[-1] * up // down)), dtype=np.complex64)
    out.real = signal.resample_poly(x.real, up, down, axis=-1, window=h)
    out.imag = signal.resample_poly(x.imag, up, down, axis=-1, window=h)
    return out


@lru_cache(maxsize=16)
def _antialias_filter(up: int, down: int) -> np.ndarray:
    """The float32 FIR ``resample_poly`` designs for ``up``/``down`` (its default Kaiser window).

    Designing it costs more than filtering a recording; handed back to
    ``resample_poly`` as its ``window`` it gives the same numbers.
    """
    max_rate = max(up, down)
    h = signal.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    h = h.astype(np.float32)
    h.setflags(write=False)
    return h


def power_spectrogram(iq: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Power per STFT bin and frame, shape (..., n_fft, frames), in |x|^2 units.

    Scaled so that, summed over bins, a frame's power equals the mean |x|^2 of
    its samples (Parseval with the Hann window's energy), hence dBFS.
    """
    # scipy.signal.stft(window="hann", boundary=None, padded=False, detrend=False,
    # scaling="psd", two-sided) step by step, with the window and scale computed once.
    x = np.asarray(iq)
    if x.shape[-1] < params.n_fft:
        raise ValueError(f"{x.shape[-1]} samples is shorter than one STFT frame ({params.n_fft})")
    out_dtype = np.result_type(x, np.complex64)
    window, scale = _stft_window(params.n_fft, params.sample_rate_hz, out_dtype)
    frames = np.lib.stride_tricks.sliding_window_view(x, params.n_fft, axis=-1)
    z = sp_fft.fft(window * frames[..., :: params.hop, :], n=params.n_fft)
    z *= scale
    z = np.moveaxis(z.astype(out_dtype), -1, -2)
    return (np.abs(z) ** 2) * (params.sample_rate_hz / params.n_fft)


@lru_cache(maxsize=8)
def _stft_window(
    n_fft: int, sample_rate_hz: float, out_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The periodic Hann window for an STFT in ``out_dtype``, and its 'psd' amplitude scale."""
    window = signal.get_window("hann", n_fft)
    if np.result_type(window, np.complex64) != out_dtype:
        window = window.astype(out_dtype)
    scale = np.sqrt(1.0 / (sample_rate_hz * (window * window).sum()))
    window.setflags(write=False)
    return window, scale


@lru_cache(maxsize=8)
def band_matrix(params: FeatureParams) -> np.ndarray:
    """(n_bands, n_fft) 0/1 weights: bins whose |f| falls in each band of the channel."""
    freqs = np.abs(np.fft.fftfreq(params.n_fft, d=1.0 / params.sample_rate_hz))
    edges = np.linspace(0.0, params.channel_half_width_hz, params.n_bands + 1)
    bank = np.zeros((params.n_bands, params.n_fft))
    for m in range(params.n_bands):
        upper = freqs <= edges[m + 1] if m == params.n_bands - 1 else freqs < edges[m + 1]
        bank[m] = (freqs >= edges[m]) & upper
    bank.setflags(write=False)
    return bank


def band_power_dbfs(iq: np.ndarray, sample_rate_hz: float, params: FeatureParams) -> np.ndarray:
    """Mean power of recording(s) in each band of the channel, dBFS, shape (..., n_bands)."""
    x = resample(iq, sample_rate_hz, params.sample_rate_hz)
    power = power_spectrogram(x, params).mean(axis=-1)
    return 10.0 * np.log10(power @ band_matrix(params).T + POWER_FLOOR)


def station_features(band_dbm: np.ndarray, params: FeatureParams) -> np.ndarray:
    """(..., 3) signal dBm, noise dBm, detected (0/1) from (..., n_bands) band powers in dBm.

    The noise is the quietest band's power spread over the channel, held
    within what receivers of noise figure ``noise_figure_min_db`` ..
    ``noise_figure_max_db`` produce; the signal is the channel power minus that
    noise (floored 20 dB under the noise); a station detected the signal when
    its signal-to-noise ratio reaches ``detection_snr_db``.
    """
    band_mw = 10.0 ** (np.asarray(band_dbm, dtype=np.float64) / 10.0)
    total_mw = band_mw.sum(axis=-1)
    kt_b = BOLTZMANN_DBM_PER_HZ + 10.0 * np.log10(params.channel_bandwidth_hz)
    lo = 10.0 ** ((kt_b + params.noise_figure_min_db) / 10.0)
    hi = 10.0 ** ((kt_b + params.noise_figure_max_db) / 10.0)
    noise_mw = np.clip(band_mw.min(axis=-1) * params.n_bands, lo, hi)
    signal_mw = np.maximum(total_mw - noise_mw, noise_mw * 0.01)
    signal_db = 10.0 * np.log10(signal_mw)
    noise_db = 10.0 * np.log10(noise_mw)
    detected = (signal_db - noise_db >= params.detection_snr_db).astype(np.float64)
    return np.stack([signal_db, noise_db, detected], axis=-1)


def build_features(
    recordings: Mapping[str, np.ndarray],
    slots: Sequence[str],
    calibration_db: Mapping[str, float],
    params: FeatureParams,
    sample_rate_hz: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One scene's input: (features (slots, 3) float64, mask (slots,) float32).

    ``slots`` fixes the station order of the model; a slot without a recording
    is all zeros with mask 0. ``calibration_db`` maps dBFS to dBm per station;
    ``sample_rate_hz`` is the rate the recordings were made at.
    """
    x = np.zeros((len(slots), params.n_features))
    mask = np.zeros(len(slots), dtype=np.float32)
    present = [(i, sid) for i, sid in enumerate(slots) if recordings.get(sid) is not None]
    # Recordings of one length go through the resampler and the STFT together: the
    # same numbers as one at a time, without paying the per-call overhead per station.
    by_length: dict[tuple[int, ...], list[tuple[int, str]]] = {}
    for i, sid in present:
        by_length.setdefault(np.shape(recordings[sid]), []).append((i, sid))
    for group in by_length.values():
        stacked = np.stack([np.asarray(recordings[sid], dtype=np.complex64) for _, sid in group])
        bands = band_power_dbfs(stacked, sample_rate_hz, params)
        for (i, sid), station_bands in zip(group, bands, strict=True):
            x[i] = station_features(station_bands + calibration_db[sid], params)
            mask[i] = 1.0
    return x, mask

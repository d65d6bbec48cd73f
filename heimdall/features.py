"""IQ recordings -> the model's input tensor.

One recording becomes a vector of log mel-band powers in dBm::

    IQ (complex64, dBFS) -> STFT (Hann) -> |X|^2 power per bin
      -> mel filterbank over |f| -> mean over frames -> 10 log10 -> + calibration (dBm)

Absolute received power is what localizes a transmitter, so nothing here
normalizes per recording; the model's normalization constants (from its card)
are applied by :func:`normalize`. The same functions build the training set
and serve requests (``tests/unit/test_features.py`` proves it), and they are
deterministic: the same input gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import signal

POWER_FLOOR = 1e-20
"""Power added before the logarithm, linear units: keeps silent bands finite (-200 dB)."""


@dataclass(frozen=True)
class FeatureParams:
    """STFT and mel parameters; stored in every model card."""

    sample_rate_hz: float = 48_000.0
    n_fft: int = 256
    hop: int = 128
    n_mels: int = 24
    fmin_hz: float = 0.0
    fmax_hz: float = 24_000.0

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
            n_mels=int(data["n_mels"]),
            fmin_hz=float(data["fmin_hz"]),
            fmax_hz=float(data["fmax_hz"]),
        )


def hz_to_mel(f_hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 log10(1 + f/700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f_hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(
    n_fft: int, sample_rate_hz: float, n_mels: int, fmin_hz: float, fmax_hz: float
) -> np.ndarray:
    """Triangular mel filters over the two-sided spectrum, shape (n_mels, n_fft).

    Complex baseband has negative frequencies; a filter weighs a bin by its
    absolute frequency ``|f|``, so the power at +f and -f falls in the same band.
    Filters have unit peak; the first is flat down to DC and the last flat up to
    Nyquist, so the weights of every bin sum to one and the bands add up to the
    total power (nothing is lost at the edges). Bins are in ``numpy.fft.fftfreq`` order.
    """
    freqs = np.abs(np.fft.fftfreq(n_fft, d=1.0 / sample_rate_hz))
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin_hz), hz_to_mel(fmax_hz), n_mels + 2))
    bank = np.zeros((n_mels, n_fft), dtype=np.float64)
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        rising = (freqs - left) / (centre - left)
        falling = (right - freqs) / (right - centre)
        if m == 0:
            rising = np.ones_like(freqs)
        if m == n_mels - 1:
            falling = np.ones_like(freqs)
        bank[m] = np.clip(np.minimum(np.minimum(rising, falling), 1.0), 0.0, None)
    bank.setflags(write=False)
    return bank


def power_spectrogram(iq: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Power per STFT bin and frame, shape (..., n_fft, frames), in |x|^2 units.

    Scaled so that, summed over bins, a frame's power equals the mean |x|^2 of
    its samples (Parseval with the Hann window's energy), hence dBFS.
    """
    _, _, z = signal.stft(
        iq,
        fs=params.sample_rate_hz,
        window="hann",
        nperseg=params.n_fft,
        noverlap=params.n_fft - params.hop,
        nfft=params.n_fft,
        return_onesided=False,
        boundary=None,
        padded=False,
        detrend=False,
        scaling="psd",
        axis=-1,
    )
    # 'psd' scaling gives |Z|^2 = |FFT(x w)|^2 / (fs sum w^2); times fs/n_fft -> mean-power units.
    return (np.abs(z) ** 2) * (params.sample_rate_hz / params.n_fft)


def log_mel_dbfs(iq: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Mean mel-band power of recording(s) in dBFS, shape (..., n_mels), float64."""
    power = power_spectrogram(np.asarray(iq, dtype=np.complex64), params)
    bank = mel_filterbank(
        params.n_fft, params.sample_rate_hz, params.n_mels, params.fmin_hz, params.fmax_hz
    )
    mel = np.einsum("mk,...kt->...mt", bank, power)
    return 10.0 * np.log10(mel.mean(axis=-1) + POWER_FLOOR)


def build_features(
    recordings: Mapping[str, np.ndarray],
    slots: Sequence[str],
    calibration_db: Mapping[str, float],
    params: FeatureParams,
) -> tuple[np.ndarray, np.ndarray]:
    """One scene's input: (features (slots, n_mels) dBm float32, mask (slots,) float32).

    ``slots`` fixes the station order of the model; a slot without a recording
    is all zeros with mask 0. ``calibration_db`` maps dBFS to dBm per station.
    """
    x = np.zeros((len(slots), params.n_mels), dtype=np.float32)
    mask = np.zeros(len(slots), dtype=np.float32)
    for i, sid in enumerate(slots):
        iq = recordings.get(sid)
        if iq is None:
            continue
        x[i] = (log_mel_dbfs(iq, params) + calibration_db[sid]).astype(np.float32)
        mask[i] = 1.0
    return x, mask


def normalize(x: np.ndarray, mask: np.ndarray, mean_db: float, std_db: float) -> np.ndarray:
    """Apply the model's normalization constants; absent slots stay zero.

    One global mean/std for all bins and stations, so differences in absolute
    power between stations (what localizes) are preserved.
    """
    return (((x - mean_db) / std_db) * mask[..., None]).astype(np.float32)

"""Log-mel features in numpy, equal to librosa's within float rounding.

This module is the single source of the signal processing: the torch front end used in
training is built from `analysis_window` and `mel_filterbank`, so the features a model is
trained on and the features it is served with cannot drift apart.
"""

from __future__ import annotations

import numpy as np

from .spec import FeatureSpec

_DEFAULT = FeatureSpec()


def analysis_window(spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """Periodic Hann window of ``spec.win_length`` samples, zero-padded (centred) to ``n_fft``.

    Returns:
        float64 array of shape ``(n_fft,)``.
    """
    n = np.arange(spec.win_length)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / spec.win_length)
    left = (spec.n_fft - spec.win_length) // 2
    return np.pad(window, (left, spec.n_fft - spec.win_length - left))


def hz_to_mel(hz, htk: bool = False) -> np.ndarray:
    """Hz to mels: Slaney's scale (linear below 1 kHz, logarithmic above) or HTK's."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    mels = hz / (200.0 / 3)
    log_step = np.log(6.4) / 27.0
    above = hz >= 1000.0
    return np.where(above, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / log_step, mels)


def mel_to_hz(mels, htk: bool = False) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    log_step = np.log(6.4) / 27.0
    above = mels >= 15.0
    return np.where(above, 1000.0 * np.exp(log_step * (np.maximum(mels, 15.0) - 15.0)), mels * (200.0 / 3))


def mel_filterbank(spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """Triangular mel filters over the rfft bins, as librosa.filters.mel builds them.

    Returns:
        float64 array of shape ``(n_mels, n_fft // 2 + 1)``; row ``m`` weights the power
        spectrum into band ``m``. With ``mel_norm="slaney"`` each triangle has unit area in Hz.
    """
    bin_hz = np.fft.rfftfreq(spec.n_fft, d=1.0 / spec.sample_rate)
    edges_mel = np.linspace(hz_to_mel(spec.fmin, spec.htk), hz_to_mel(spec.f_max, spec.htk), spec.n_mels + 2)
    edges_hz = mel_to_hz(edges_mel, spec.htk)
    widths = np.diff(edges_hz)
    # distance of every bin from every edge, (n_mels + 2, n_bins)
    offsets = edges_hz[:, None] - bin_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if spec.mel_norm == "slaney":
        weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights


def _as_batch(audio) -> tuple:
    x = np.asarray(audio)
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must have shape (samples,) or (clips, samples), got {x.shape}")
    if x.shape[-1] == 0:
        raise ValueError("audio is empty")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"audio must be floating point in [-1, 1], got {x.dtype}")
    return x.reshape(-1, x.shape[-1]), x.ndim == 1


def power_spectrogram(audio, spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """|STFT|**power of each clip, as librosa.stft frames it.

    Args:
        audio: float array ``(samples,)`` or ``(clips, samples)``.

    Returns:
        float64 array ``(clips, frames, n_fft // 2 + 1)`` (a leading axis even for one clip).
    """
    batch, _ = _as_batch(audio)
    batch = batch.astype(np.float64, copy=False)
    if spec.center:
        half = spec.n_fft // 2
        batch = np.pad(batch, ((0, 0), (half, half)), mode=spec.pad_mode)
    if batch.shape[-1] < spec.n_fft:
        raise ValueError(f"audio of {batch.shape[-1]} samples is shorter than n_fft={spec.n_fft}")
    frames = np.lib.stride_tricks.sliding_window_view(batch, spec.n_fft, axis=-1)[:, :: spec.hop_length]
    spectrum = np.fft.rfft(frames * analysis_window(spec), axis=-1)
    if spec.power == 2.0:
        return spectrum.real**2 + spectrum.imag**2
    return np.abs(spectrum) ** spec.power


def power_to_db(mel_power, spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """Power to decibels per clip, as librosa.power_to_db with the spec's ref, amin and top_db.

    Args:
        mel_power: array ``(clips, ...)``; with ``ref="max"`` each clip is referenced to its own peak.
    """
    db = 10.0 * np.log10(np.maximum(mel_power, spec.amin))
    axes = tuple(range(1, db.ndim))
    if spec.ref == "max":
        db -= 10.0 * np.log10(np.maximum(mel_power.max(axis=axes, keepdims=True), spec.amin))
    else:
        db -= 10.0 * np.log10(max(spec.ref, spec.amin))
    if spec.top_db is not None:
        db = np.maximum(db, db.max(axis=axes, keepdims=True) - spec.top_db)
    return db


def log_mel(audio, spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """Log-mel spectrogram in dB.

    Args:
        audio: float waveform(s) at ``spec.sample_rate``, ``(samples,)`` or ``(clips, samples)``.
            Clips are not padded or cut here; `load_audio` does that.
        spec: the feature spec.

    Returns:
        float32 array ``(n_mels, frames)`` for one clip or ``(clips, n_mels, frames)``.
    """
    batch, single = _as_batch(audio)
    power = power_spectrogram(batch, spec)
    mel = np.matmul(power, _filterbank_t(spec))  # (clips, frames, n_mels)
    db = power_to_db(mel, spec).transpose(0, 2, 1).astype(np.float32)
    return db[0] if single else db


_FILTERBANKS: dict = {}


def _filterbank_t(spec: FeatureSpec) -> np.ndarray:
    # Built once per spec: it costs more than the features of a clip.
    fb = _FILTERBANKS.get(spec)
    if fb is None:
        fb = _FILTERBANKS[spec] = np.ascontiguousarray(mel_filterbank(spec).T)
    return fb

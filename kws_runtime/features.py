"""Log-mel features in numpy, equal to librosa's within float rounding.

This module is the single source of the signal processing: the torch front end used in
training is built from `analysis_window` and `mel_filterbank`, so the features a model is
trained on and the features it is served with cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

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
    if x.dtype.kind != "f":
        raise ValueError(f"audio must be floating point in [-1, 1], got {x.dtype}")
    return x.reshape(-1, x.shape[-1]), x.ndim == 1


def _padded_length(n_samples: int, spec: FeatureSpec) -> int:
    padded = n_samples + (2 * (spec.n_fft // 2) if spec.center else 0)
    if padded < spec.n_fft:
        raise ValueError(f"audio of {padded} samples is shorter than n_fft={spec.n_fft}")
    return padded


def _frames(padded: np.ndarray, spec: FeatureSpec, n_frames: int) -> np.ndarray:
    # A read-only strided view (..., frames, n_fft) over the padded audio, no copy.
    step = padded.strides[-1]
    return np.lib.stride_tricks.as_strided(
        padded,
        padded.shape[:-1] + (n_frames, spec.n_fft),
        padded.strides[:-1] + (spec.hop_length * step, step),
        writeable=False,
    )


def _pad(batch: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    if not spec.center:
        return batch.astype(np.float64, copy=False)
    half = spec.n_fft // 2
    return np.pad(batch.astype(np.float64, copy=False), ((0, 0), (half, half)), mode=spec.pad_mode)


def power_spectrogram(audio, spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """|STFT|**power of each clip, as librosa.stft frames it.

    Args:
        audio: float array ``(samples,)`` or ``(clips, samples)``.

    Returns:
        float64 array ``(clips, frames, n_fft // 2 + 1)`` (a leading axis even for one clip).
    """
    batch, _ = _as_batch(audio)
    work = _workspace(spec, *batch.shape)
    out = np.empty((len(batch), work.n_frames, spec.n_fft // 2 + 1))
    for start, stop, spectrum in _stft_chunks(batch, spec, work):
        out[start:stop] = spectrum.real**2 + spectrum.imag**2 if spec.power == 2.0 else np.abs(spectrum) ** spec.power
    return out


def power_to_db(mel_power, spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """Power to decibels per clip, as librosa.power_to_db with the spec's ref, amin and top_db.

    Args:
        mel_power: array ``(clips, ...)``; with ``ref="max"`` each clip is referenced to its own peak.

    Returns:
        float64 array of the same shape.
    """
    return _to_db_inplace(np.array(mel_power, dtype=np.float64), spec)


def _to_db_inplace(power: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    return _log_to_db_inplace(_log_power_inplace(power, spec), spec)


def _log_power_inplace(power: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """``log10(max(power, amin))``: the part of the dB scale that depends on each value alone
    (a stream reuses it for the frames two windows share)."""
    return np.log10(np.maximum(power, spec.amin, out=power), out=power)


def _log_to_db_inplace(db: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """From `_log_power_inplace` of clips ``(clips, ...)`` to dB: the reference and the floor."""
    axes = tuple(range(1, db.ndim))
    # log10 is monotonic, so the log of each clip's peak is the peak of its logs.
    db -= db.max(axis=axes, keepdims=True) if spec.ref == "max" else np.log10(max(spec.ref, spec.amin))
    db *= 10.0
    if spec.top_db is not None:
        # With ref="max" every clip peaks at 0 dB, so the floor is the same for all of them.
        floor = -spec.top_db if spec.ref == "max" else db.max(axis=axes, keepdims=True) - spec.top_db
        np.maximum(db, floor, out=db)
    return db


def log_mel(audio, spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """Log-mel spectrogram in dB.

    Args:
        audio: float waveform(s) at ``spec.sample_rate``, ``(samples,)`` or ``(clips, samples)``.
            Clips are not padded or cut here; `load_audio` does that.
        spec: the feature spec.

    Returns:
        float32 array ``(n_mels, frames)`` for one clip or ``(clips, n_mels, frames)``, C-contiguous.
    """
    batch, single = _as_batch(audio)
    # float32 from here on: the logarithm is several times faster and the output is float32.
    db = _to_db_inplace(_mel_power(batch, spec).astype(np.float32), spec)
    out = np.ascontiguousarray(db.transpose(0, 2, 1))
    return out[0] if single else out


def frame_mel_power(audio, spec: FeatureSpec = _DEFAULT) -> np.ndarray:
    """Mel-band power of every full frame of ``audio`` as it is, without centring or padding:
    row ``k`` is the frame ``audio[k * hop_length : k * hop_length + n_fft]``.

    The same computation as `log_mel`'s before the decibels (the streaming detector assembles
    a window's features from these rows and converts them with `power_to_db`).

    Args:
        audio: float ``(samples,)``, at least ``n_fft`` samples.

    Returns:
        float64 ``(frames, n_mels)``.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1 or len(audio) < spec.n_fft:
        raise ValueError(f"frame_mel_power takes (samples,) of at least n_fft={spec.n_fft}, got {audio.shape}")
    return _mel_power(audio[None], _unpadded(spec, len(audio)))[0]


@functools.lru_cache(maxsize=64)
def _unpadded(spec: FeatureSpec, n_samples: int) -> FeatureSpec:
    return dataclasses.replace(spec, center=False, clip_samples=n_samples, hop_length=min(spec.hop_length, n_samples))


# Clips transformed per numpy call: enough to spread the per-call overhead, few enough that
# the windowed frames and their spectra stay in cache (about 0.5 MB per clip for 40 x 32).
_CHUNK_BYTES = 1 << 20


def _stft_chunks(batch: np.ndarray, spec: FeatureSpec, work: "_Workspace"):
    """The one numpy STFT: ``(start, stop, spectrum)`` for each chunk of clips, the complex
    spectrum ``(clips, frames, n_fft // 2 + 1)`` living in ``work`` until the next chunk."""
    n_clips, n_samples = batch.shape
    for start in range(0, n_clips, work.chunk):
        stop = min(start + work.chunk, n_clips)
        count = stop - start
        if work.padded is not None:
            work.padded[:count, work.offset : work.offset + n_samples] = batch[start:stop]
            frames = work.frames[:count]
        else:
            frames = _frames(_pad(batch[start:stop], spec), spec, work.n_frames)
        windowed = np.multiply(frames, work.window, out=work.windowed[:count])
        yield start, stop, np.fft.rfft(windowed, axis=-1, out=work.spectrum[:count])


def _mel_power(batch: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Mel-band power ``(clips, frames, n_mels)`` float64, one chunk of clips at a time."""
    work = _workspace(spec, *batch.shape)
    mel = np.zeros((len(batch), work.n_frames, spec.n_mels))
    for start, stop, spectrum in _stft_chunks(batch, spec, work):
        rows = (stop - start) * work.n_frames
        out = mel[start:stop].reshape(rows, spec.n_mels)
        if spec.power == 2.0:
            # re and im side by side; the filterbank blocks repeat each weight for both.
            squares = spectrum.view(np.float64).reshape(rows, -1)
            np.multiply(squares, squares, out=squares)
            for lo, hi, band_lo, band_hi, weights in work.blocks:
                np.matmul(squares[:, lo:hi], weights, out=out[:, band_lo:band_hi])
        else:
            np.matmul((np.abs(spectrum) ** spec.power).reshape(rows, -1), work.filterbank_t, out=out)
    return mel


class _Plan:
    """Per-spec constants: the window, and the mel filterbank cut into dense blocks.

    A band covers a contiguous run of bins and a bin lies in at most two bands, so the
    filterbank is mostly zeros. Each block is a group of consecutive bands with the run of
    bins they cover; the groups are chosen to minimise a cost model of numpy calls and
    multiplications.
    """

    # Measured with one BLAS thread: about 3 us per block (slices and the product) and
    # 19 multiply-adds per ns.
    call_us = 3.0
    mac_per_us = 19000.0

    def __init__(self, spec: FeatureSpec):
        self.window = analysis_window(spec)
        self.filterbank = mel_filterbank(spec)
        self.filterbank_t = np.ascontiguousarray(self.filterbank.T)
        self._blocks: dict = {}

    def blocks(self, rows: int) -> list:
        """``(col_lo, col_hi, band_lo, band_hi, weights)`` over interleaved re/im columns."""
        found = self._blocks.get(rows)
        if found is None:
            found = self._blocks[rows] = self._cut(rows)
        return found

    def _cut(self, rows: int) -> list:
        fb = self.filterbank
        nonzero = fb > 0
        bands = np.flatnonzero(nonzero.any(axis=1))  # bands without any bin stay zero
        if bands.size == 0:
            return []
        first = nonzero[bands].argmax(axis=1)  # first bin of each band
        stop = fb.shape[1] - nonzero[bands, ::-1].argmax(axis=1)  # one past its last bin
        # Triangles are ordered (first and stop never decrease), so a group of consecutive
        # bands needs the bins first[i] .. stop[j - 1]. Groups are disjoint in bands (each
        # product writes its own output columns); their bins may overlap.
        n = len(bands)
        cost = np.full(n + 1, np.inf)
        cost[0] = 0.0
        previous = np.zeros(n + 1, dtype=int)
        for j in range(1, n + 1):
            for i in range(j):
                macs = rows * 2 * (stop[j - 1] - first[i]) * (j - i)
                c = cost[i] + self.call_us + macs / self.mac_per_us
                if c < cost[j]:
                    cost[j], previous[j] = c, i
        blocks, j = [], n
        while j > 0:
            i = previous[j]
            lo, hi, b0, b1 = int(first[i]), int(stop[j - 1]), int(bands[i]), int(bands[j - 1]) + 1
            weights = np.ascontiguousarray(np.repeat(fb[b0:b1, lo:hi].T, 2, axis=0))
            blocks.append((2 * lo, 2 * hi, b0, b1, weights))
            j = i
        return blocks[::-1]


_PLANS: dict = {}


def _plan(spec: FeatureSpec) -> _Plan:
    # Built once per spec: it costs more than the features of a clip.
    # keyed by what the window and the filterbank depend on, not the clip length or padding
    key = (spec.sample_rate, spec.n_fft, spec.win_length, spec.window, spec.n_mels, spec.fmin, spec.fmax, spec.htk,
           spec.mel_norm)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(spec)
    return plan


class _Workspace:
    """Buffers for one spec and input size, reused call after call by one thread."""

    def __init__(self, spec: FeatureSpec, n_clips: int, n_samples: int):
        padded_length = _padded_length(n_samples, spec)
        self.n_frames = spec.frames_for(n_samples)
        self.max_chunk = max(1, _CHUNK_BYTES // (self.n_frames * spec.n_fft * 8))
        self.spec, self.n_samples, self.chunk = spec, n_samples, min(n_clips, self.max_chunk)
        plan = _plan(spec)
        self.window, self.filterbank_t = plan.window, plan.filterbank_t
        self.blocks = plan.blocks(self.chunk * self.n_frames)
        self.padded = self.frames = None
        if spec.center and spec.pad_mode == "constant":
            # The zero padding is written once; each chunk only overwrites the middle.
            self.offset = spec.n_fft // 2
            self.padded = np.zeros((self.chunk, padded_length))
            self.frames = _frames(self.padded, spec, self.n_frames)
        self.windowed = np.empty((self.chunk, self.n_frames, spec.n_fft))
        self.spectrum = np.empty((self.chunk, self.n_frames, spec.n_fft // 2 + 1), dtype=np.complex128)

    def fits(self, spec: FeatureSpec, n_clips: int, n_samples: int) -> bool:
        return (
            n_samples == self.n_samples
            and min(n_clips, self.max_chunk) == self.chunk
            and (spec is self.spec or spec == self.spec)
        )


_WORKSPACES = threading.local()


# Workspaces kept per thread: a few shapes alternate in a streaming detector's hop (the
# window's edges and its new frames).
_KEPT_WORKSPACES = 4


def _workspace(spec: FeatureSpec, n_clips: int, n_samples: int) -> _Workspace:
    # Fresh megabyte-sized arrays cost page faults on every call; a few sets per thread are
    # kept (threads never share one, so concurrent calls stay independent).
    kept = getattr(_WORKSPACES, "kept", None)
    if kept is None:
        kept = _WORKSPACES.kept = []
    for i, work in enumerate(kept):
        if work.fits(spec, n_clips, n_samples):
            kept.insert(0, kept.pop(i))
            return work
    work = _Workspace(spec, n_clips, n_samples)
    kept.insert(0, work)
    del kept[_KEPT_WORKSPACES:]
    return work

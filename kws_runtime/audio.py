"""Reading audio files into float32 mono waveforms at the model's sample rate."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .spec import FeatureSpec

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg"})
_DEFAULT = FeatureSpec()


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def read_audio(path, sample_rate: int = 16000, max_seconds: float = 30.0) -> np.ndarray:
    """Decode a WAV (8/16/24/32-bit PCM or float), FLAC or OGG file.

    Args:
        path: the file.
        sample_rate: output rate in Hz; other rates are resampled with soxr.
        max_seconds: longer files are refused rather than decoded into memory.

    Returns:
        float32 mono waveform ``(samples,)`` in [-1, 1] (channels are averaged).

    Raises:
        AudioError: missing, empty, truncated, undecodable, too long, or containing NaN/inf.
    """
    # Imported on first use: `import kws_runtime` stays light for feature-only callers.
    import soundfile

    path = Path(path)
    if not path.exists():
        raise AudioError(path, "no such file")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        info = soundfile.info(str(path))
    except (soundfile.SoundFileError, RuntimeError) as exc:
        raise AudioError(path, f"not a readable audio file ({_libsndfile_reason(exc)})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(path, "contains no audio samples")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise AudioError(path, f"is {seconds:.1f} s long, over the {max_seconds:g} s limit")
    if info.format == "WAV":
        _check_wav_complete(path)
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as exc:
        raise AudioError(path, f"could not be decoded ({_libsndfile_reason(exc)})") from None
    if data.size == 0:
        raise AudioError(path, "contains no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or infinite samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate).astype(np.float32, copy=False)
    return np.ascontiguousarray(mono)


def fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Zero-pad at the end or cut the end so ``audio`` has ``n_samples`` samples (last axis)."""
    length = audio.shape[-1]
    if length >= n_samples:
        return audio[..., :n_samples]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, n_samples - length)]
    return np.pad(audio, pad)


def load_audio(path, spec: FeatureSpec = _DEFAULT, max_seconds: float = 30.0) -> np.ndarray:
    """A clip ready for `log_mel`: float32 mono at ``spec.sample_rate``, ``(spec.clip_samples,)``."""
    return fit_length(read_audio(path, spec.sample_rate, max_seconds), spec.clip_samples)


def _libsndfile_reason(exc: Exception) -> str:
    text = str(exc)
    # libsndfile messages read "Error opening 'path': reason"; the path is already in ours.
    return text.split(": ", 1)[1] if ": " in text else text


def _check_wav_complete(path: Path) -> None:
    # libsndfile quietly returns the samples present when a WAV's data chunk is cut short;
    # a cut recording is a broken recording, so compare the declared size with the file.
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return  # RF64 and friends: leave it to libsndfile
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk = f.read(8)
            if len(chunk) < 8:
                break
            declared = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                available = size - offset - 8
                # 0 and 0xFFFFFFFF are what streaming writers leave when they cannot seek back.
                if declared not in (0, 0xFFFFFFFF) and declared > available:
                    raise AudioError(
                        path,
                        f"is truncated: its data chunk declares {declared} bytes but only {available} are present",
                    )
                return
            offset += 8 + declared + (declared & 1)


def is_audio_file(path) -> bool:
    """True for file names with an extension `read_audio` decodes."""
    return os.path.splitext(str(path))[1].lower() in AUDIO_EXTENSIONS

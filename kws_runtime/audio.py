"""Reading audio files into float32 mono waveforms at the model's sample rate."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .files import os_error_reason
from .spec import FeatureSpec
from .wav import WavLayout, is_riff_wave, read_pcm16, scan_wav

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg"})
# Samples beyond this magnitude (24 dB over full scale) are not a loud recording but a broken
# one: a float WAV of 1e20 would square to infinity in the features and give a confident-looking
# label from NaN. Ordinary clipping and float files that overshoot a little stay accepted.
MAX_ABS_SAMPLE = 16.0
# WAV files up to this size (about 4 minutes of 16 kHz mono) are read in one go and parsed in memory
_WHOLE_WAV_BYTES = 8 << 20
_DEFAULT = FeatureSpec()


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def check_samples(samples: np.ndarray) -> Optional[str]:
    """Why a waveform's values cannot be used (NaN/inf, or beyond `MAX_ABS_SAMPLE`), or None."""
    if not np.isfinite(samples).all():
        return "contains NaN or infinite samples"
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > MAX_ABS_SAMPLE:
        return (
            f"has samples up to {peak:.3g}, far outside the [-1, 1] of audio (the limit is {MAX_ABS_SAMPLE:g}); "
            "the file is damaged or was written with the wrong scale"
        )
    return None


def read_audio(path, sample_rate: int = 16000, max_seconds: float = 30.0) -> np.ndarray:
    """Decode a WAV (8/16/24/32-bit PCM or float), FLAC or OGG file.

    Args:
        path: the file.
        sample_rate: output rate in Hz; other rates are resampled with soxr.
        max_seconds: longer files are refused rather than decoded into memory.

    Returns:
        float32 mono waveform ``(samples,)`` (channels are averaged), in [-1, 1] for integer
        formats; float files may overshoot a little (up to `MAX_ABS_SAMPLE`).

    Raises:
        AudioError: missing, unreadable (permissions, a name too long, ...), empty, truncated,
            undecodable, too long, or containing NaN/inf or absurd sample values.
    """
    path = Path(path)
    try:
        size, content = _check_file(path, _WHOLE_WAV_BYTES)
        layout = None
        if is_riff_wave(content):
            with io.BytesIO(content) if len(content) == size else open(path, "rb") as stream:
                layout = scan_wav(stream, size)
                if layout is not None and layout.plain_pcm16:
                    _check_length(path, layout.frames, layout.sample_rate, max_seconds, layout)
                    # 16-bit samples cannot be NaN or beyond full scale: no check_samples
                    data, rate = read_pcm16(stream, layout), layout.sample_rate
    except OSError as exc:
        raise AudioError(path, os_error_reason(exc)) from None
    if layout is None or not layout.plain_pcm16:
        data, rate = _read_libsndfile(path, max_seconds, layout)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate).astype(np.float32, copy=False)
    return np.ascontiguousarray(mono)


def _read_libsndfile(path: Path, max_seconds: float, layout: Optional[WavLayout]) -> tuple:
    """``(float32 (frames, channels), rate)`` of any format libsndfile decodes (``layout``: a WAV's)."""
    # Imported on first use: `import kws_runtime` stays light for feature-only callers.
    import soundfile

    try:
        info = soundfile.info(str(path))
    except OSError as exc:
        raise AudioError(path, os_error_reason(exc)) from None
    except (soundfile.SoundFileError, RuntimeError) as exc:
        raise AudioError(path, f"not a readable audio file ({_libsndfile_reason(exc)})") from None
    _check_length(path, info.frames, info.samplerate, max_seconds, layout)
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except OSError as exc:
        raise AudioError(path, os_error_reason(exc)) from None
    except (soundfile.SoundFileError, RuntimeError) as exc:
        raise AudioError(path, f"could not be decoded ({_libsndfile_reason(exc)})") from None
    if data.size == 0:
        raise AudioError(path, "contains no audio samples")
    problem = check_samples(data)
    if problem:
        raise AudioError(path, problem)
    return data, rate


def _check_length(path: Path, frames: int, rate: int, max_seconds: float, layout: Optional[WavLayout]) -> None:
    if frames <= 0 or rate <= 0:
        raise AudioError(path, "contains no audio samples")
    seconds = frames / rate
    if seconds > max_seconds:
        raise AudioError(path, f"is {seconds:.1f} s long, over the {max_seconds:g} s limit")
    # libsndfile quietly returns the samples present when a WAV's data chunk is cut short;
    # a cut recording is a broken recording
    if layout is not None and layout.truncated:
        raise AudioError(path, f"is truncated: its data chunk declares {layout.data_declared} bytes but only "
                         f"{layout.data_available} are present")


def _check_file(path: Path, whole_wav_bytes: int = 0) -> tuple:
    """``(size, first 12 bytes)`` of a non-empty regular file we may read, before libsndfile
    opens it: its errors say "System error." where Python's say "permission denied". A WAV
    file of at most ``whole_wav_bytes`` comes whole instead: one read instead of three opens."""
    # stat before open: opening a FIFO would block until something writes to it
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AudioError(path, "no such file" if not os.path.islink(path) else "a link to a file that does not exist") from None
    if stat.S_ISDIR(info.st_mode):
        raise AudioError(path, "is a folder, not an audio file")
    if not stat.S_ISREG(info.st_mode):
        raise AudioError(path, "not a regular file")
    if info.st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    with open(path, "rb") as stream:
        head = stream.read(12)
        if is_riff_wave(head) and info.st_size <= whole_wav_bytes:
            head += stream.read()
        return info.st_size, head


def stream_audio(path, sample_rate: int = 16000, block_seconds: float = 1.0) -> Iterator[np.ndarray]:
    """Read a recording of any length block by block: float32 mono blocks at ``sample_rate``.

    Memory stays bounded by a block whatever the file's length: channels are averaged per
    block and other rates go through soxr's streaming resampler. The checks are `read_audio`'s
    (missing, unreadable, empty, not audio, NaN or absurd samples), raised when met.

    Raises:
        AudioError: naming the file and what is wrong with it.
    """
    import soundfile

    path = Path(path)
    try:
        _check_file(path)
        stream = soundfile.SoundFile(str(path))
    except OSError as exc:
        raise AudioError(path, os_error_reason(exc)) from None
    except (soundfile.SoundFileError, RuntimeError) as exc:
        raise AudioError(path, f"not a readable audio file ({_libsndfile_reason(exc)})") from None
    with stream:
        if stream.frames == 0 or stream.samplerate <= 0:
            raise AudioError(path, "contains no audio samples")
        resampler = None
        if stream.samplerate != sample_rate:
            import soxr

            resampler = soxr.ResampleStream(stream.samplerate, sample_rate, 1, dtype="float32")
        block = max(1, int(block_seconds * stream.samplerate))
        try:
            for data in stream.blocks(blocksize=block, dtype="float32", always_2d=True):
                problem = check_samples(data)
                if problem:
                    raise AudioError(path, problem)
                mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
                if resampler is not None:
                    mono = resampler.resample_chunk(mono)
                if len(mono):
                    yield np.ascontiguousarray(mono, dtype=np.float32)
        except (soundfile.SoundFileError, RuntimeError) as exc:
            raise AudioError(path, f"could not be decoded ({_libsndfile_reason(exc)})") from None
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                yield np.ascontiguousarray(tail, dtype=np.float32)


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


def is_audio_file(path) -> bool:
    """True for file names with an extension `read_audio` decodes."""
    return os.path.splitext(str(path))[1].lower() in AUDIO_EXTENSIONS

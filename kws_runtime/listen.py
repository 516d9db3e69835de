"""Live detection: an audio source, read block by block, through a `Detector`.

An audio source is one method, ``read() -> block or None`` (float32 mono samples at the
detector's rate; None at the end), plus ``close()``. `Microphone` reads a sound card through
sounddevice (the ``mic`` extra); `Recording` plays a file as a source, so the same loop runs
where no microphone exists.
"""

from __future__ import annotations

import queue
from typing import Callable, Iterator, Optional, Protocol

import numpy as np

from .audio import stream_audio
from .stream import Detector, Event


class MicrophoneError(RuntimeError):
    """No microphone can be opened; the message says why and what to do."""


class AudioSource(Protocol):
    def read(self) -> Optional[np.ndarray]:
        """The next block of samples, or None when the source has ended."""

    def close(self) -> None:
        """Release the device or file."""


class Recording:
    """A recording as an audio source, read in blocks of ``block_seconds``."""

    def __init__(self, path, sample_rate: int, block_seconds: float = 0.1):
        self._blocks: Iterator[np.ndarray] = stream_audio(path, sample_rate, block_seconds)

    def read(self) -> Optional[np.ndarray]:
        return next(self._blocks, None)

    def close(self) -> None:
        self._blocks.close()


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise MicrophoneError("sounddevice is not installed: pip install 'kws-toolkit[mic]'") from None
    except OSError as exc:  # the module imports, but PortAudio is missing
        raise MicrophoneError(f"PortAudio cannot be loaded ({exc}); install it (e.g. apt install libportaudio2)") from None
    return sounddevice


def input_devices() -> list:
    """``(index, name, channels, default rate)`` of every device that can record."""
    sd = _sounddevice()
    return [(i, d["name"], d["max_input_channels"], d["default_samplerate"])
            for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]


class Microphone:
    """A sound card's input at ``sample_rate`` (mono), through sounddevice.

    Raises:
        MicrophoneError: sounddevice or PortAudio missing, no input device, or the device
            refuses the stream.
    """

    def __init__(self, sample_rate: int, device=None, block_seconds: float = 0.1):
        sd = _sounddevice()
        try:
            if device is None and not input_devices():
                raise MicrophoneError("no input device found (is a microphone connected?); kws listen --list-devices")
            self._blocks: queue.Queue = queue.Queue()
            self._stream = sd.InputStream(
                samplerate=sample_rate, channels=1, dtype="float32", device=device,
                blocksize=max(1, int(block_seconds * sample_rate)),
                callback=lambda data, frames, time, status: self._blocks.put(data[:, 0].copy()),
            )
            self._stream.start()
        except sd.PortAudioError as exc:
            raise MicrophoneError(f"the input device cannot be opened ({exc}); kws listen --list-devices") from None

    def read(self) -> Optional[np.ndarray]:
        return self._blocks.get()

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


def run(detector: Detector, source: AudioSource, on_event: Callable[[Event], None]) -> int:
    """Feed ``source`` to ``detector`` until it ends, calling ``on_event`` as events come;
    returns how many fired. The source is closed at the end (and on Ctrl-C)."""
    fired = 0
    try:
        while True:
            block = source.read()
            if block is None:
                break
            for event in detector.feed(block):
                on_event(event)
                fired += 1
        for event in detector.flush():
            on_event(event)
            fired += 1
    finally:
        source.close()
    return fired

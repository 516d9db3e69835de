"""The layout of a RIFF/WAVE file, and the one kind read without libsndfile: 16-bit PCM.

Speech Commands and most recorders write 16-bit PCM WAV. For a 1 s clip, opening it through
libsndfile (its header, then its samples) costs about ten times the read itself (0.24 ms
against 0.02 ms, measured), which is a sixth of a small model's whole prediction; the samples
of such a file are a plain array of little-endian int16 after a short header. Everything
else (8/24/32-bit, float, A-law, RF64, a data chunk whose size its writer never filled in)
is left to libsndfile.
"""

from __future__ import annotations

import dataclasses
from typing import BinaryIO, Optional

import numpy as np

__all__ = ["WavLayout", "is_riff_wave", "read_pcm16", "scan_wav"]

_PCM = 1
_EXTENSIBLE = 0xFFFE
# what streaming writers leave in the data chunk's size when they cannot seek back to fill it in
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def is_riff_wave(header: bytes) -> bool:
    """True when the file's first 12 bytes open a RIFF/WAVE file."""
    return header[:4] == b"RIFF" and header[8:12] == b"WAVE"


@dataclasses.dataclass(frozen=True)
class WavLayout:
    """Where a WAV file's samples are and how they are stored (sizes in bytes).

    ``format_tag`` is 0 when the file has no ``fmt `` chunk; an extensible format's tag is
    that of its sub-format.
    """

    format_tag: int
    channels: int
    sample_rate: int
    bits: int
    block_align: int
    data_offset: int
    data_declared: int
    data_available: int

    @property
    def truncated(self) -> bool:
        """The data chunk declares more bytes than the file holds (a cut recording)."""
        return self.data_declared not in _UNKNOWN_SIZES and self.data_declared > self.data_available

    @property
    def plain_pcm16(self) -> bool:
        """16-bit PCM with a known data size: the layout `read_pcm16` reads."""
        return (self.format_tag == _PCM and self.bits == 16 and self.channels >= 1 and self.sample_rate > 0
                and self.block_align == 2 * self.channels and self.data_declared not in _UNKNOWN_SIZES)

    @property
    def frames(self) -> int:
        """Whole sample frames present (a cut last frame does not count)."""
        return min(self.data_declared, self.data_available) // max(self.block_align, 1)


def scan_wav(stream: BinaryIO, size: int) -> Optional[WavLayout]:
    """Walk the chunks of a RIFF/WAVE file of ``size`` bytes open in ``stream``.

    Returns:
        the layout, or None when no data chunk header is found before the end of the file.
    """
    fmt = (0, 0, 0, 0, 0)
    offset = 12
    while offset + 8 <= size:
        stream.seek(offset)
        head = stream.read(8)
        if len(head) < 8:
            return None
        declared = int.from_bytes(head[4:8], "little")
        if head[:4] == b"fmt ":
            fmt = _format(stream.read(min(declared, 40)))
        elif head[:4] == b"data":
            return WavLayout(*fmt, data_offset=offset + 8, data_declared=declared, data_available=size - offset - 8)
        offset += 8 + declared + (declared & 1)  # chunks are padded to even sizes
    return None


def _format(body: bytes) -> tuple:
    """``(format tag, channels, sample rate, bits, block align)`` of a ``fmt `` chunk's body."""
    if len(body) < 16:
        return (0, 0, 0, 0, 0)
    tag = int.from_bytes(body[0:2], "little")
    if tag == _EXTENSIBLE:
        # WAVEFORMATEXTENSIBLE: the sub-format GUID starts with the actual tag, at byte 24
        tag = int.from_bytes(body[24:26], "little") if len(body) >= 26 else 0
    channels = int.from_bytes(body[2:4], "little")
    rate = int.from_bytes(body[4:8], "little")
    block_align = int.from_bytes(body[12:14], "little")
    bits = int.from_bytes(body[14:16], "little")
    return (tag, channels, rate, bits, block_align)


def read_pcm16(stream: BinaryIO, layout: WavLayout) -> np.ndarray:
    """The samples of a `WavLayout.plain_pcm16` file as float32 ``(frames, channels)`` in [-1, 1).

    Scaled by 1/32768, as libsndfile scales 16-bit samples, so both readers give the same floats.
    """
    stream.seek(layout.data_offset)
    raw = stream.read(layout.frames * layout.block_align)
    samples = np.frombuffer(raw, dtype="<i2", count=len(raw) // 2).reshape(-1, layout.channels)
    return samples.astype(np.float32) * np.float32(1 / 32768)

"""Audio files broken in every way load_audio must refuse (broken_files), and the tone they are cut from."""

import struct

import numpy as np
import soundfile

SR = 16000


def tone(freq, sr=SR, seconds=1.0, amplitude=0.5):
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)


def _wav_bytes(tmp_path, **kwargs):
    soundfile.write(tmp_path / "src.wav", tone(440), SR, subtype="PCM_16", **kwargs)
    return (tmp_path / "src.wav").read_bytes()


def broken_files(tmp_path):
    """name -> (bytes, expected message)."""
    wav = _wav_bytes(tmp_path)
    soundfile.write(tmp_path / "src.flac", tone(440), SR, subtype="PCM_16")
    flac = (tmp_path / "src.flac").read_bytes()
    soundfile.write(tmp_path / "src.ogg", tone(440), SR, format="OGG", subtype="VORBIS")
    ogg = (tmp_path / "src.ogg").read_bytes()
    nan = np.zeros(100, np.float32)
    nan[50] = np.nan
    soundfile.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    inf = np.zeros(100)
    inf[10] = -np.inf
    soundfile.write(tmp_path / "inf.wav", inf, SR, subtype="DOUBLE")
    return {
        "empty.wav": (b"", r"file is empty \(0 bytes\)"),
        "header_only.wav": (wav[:44], "contains no audio samples"),
        "truncated.wav": (wav[:1000], "is truncated: its data chunk declares 32000 bytes but only 956 are present"),
        "short_header.wav": (wav[:20], "not a readable audio file"),
        "riff_only.wav": (wav[:12], "not a readable audio file"),
        "text.wav": (b"this is a text file, not audio\n" * 10, "not a readable audio file"),
        "nan.wav": ((tmp_path / "nan.wav").read_bytes(), "contains NaN or infinite samples"),
        "inf.wav": ((tmp_path / "inf.wav").read_bytes(), "contains NaN or infinite samples"),
        "garbage.flac": (bytes(range(256)) * 8, "not a readable audio file"),
        "truncated.flac": (flac[: len(flac) // 2], "could not be decoded|not a readable audio file"),
        "header_only.flac": (flac[:60], "not a readable audio file"),
        "truncated.ogg": (ogg[: len(ogg) // 2], "could not be decoded|not a readable audio file"),
        "header_only.ogg": (ogg[:100], "not a readable audio file"),
        "lying_size.wav": (wav[:40] + struct.pack("<I", 2**31) + wav[44:], "is truncated"),
    }

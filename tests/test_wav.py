"""The in-memory 16-bit PCM WAV reader gives libsndfile's samples, and leaves every other layout to it."""

import io
import struct

import numpy as np
import pytest
import soundfile

import kws_runtime.audio as audio
from kws_runtime.audio import AudioError, read_audio
from kws_runtime.wav import read_pcm16, scan_wav

SR = 16000


def _noise(frames, channels=1, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (frames, channels)).squeeze()


def _layout(path):
    data = path.read_bytes()
    return scan_wav(io.BytesIO(data), len(data))


def _with_chunk_before_data(wav: bytes, chunk_id: bytes, body: bytes) -> bytes:
    """The file with an extra chunk (padded to an even size) between ``fmt `` and ``data``."""
    at = wav.index(b"data")
    extra = chunk_id + struct.pack("<I", len(body)) + body + b"\0" * (len(body) & 1)
    out = wav[:at] + extra + wav[at:]
    return out[:4] + struct.pack("<I", len(out) - 8) + out[8:]


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("container", ["WAV", "WAVEX"])
def test_pcm16_is_read_in_memory_equal_to_libsndfile(tmp_path, channels, container):
    path = tmp_path / "clip.wav"
    soundfile.write(path, _noise(12345, channels), SR, subtype="PCM_16", format=container)
    layout = _layout(path)
    assert layout.plain_pcm16 and layout.channels == channels and layout.frames == 12345
    expected, _ = soundfile.read(path, dtype="float32", always_2d=True)
    assert np.array_equal(read_pcm16(io.BytesIO(path.read_bytes()), layout), expected)
    mono = expected.mean(axis=1, dtype=np.float32) if channels > 1 else expected[:, 0]
    assert np.array_equal(read_audio(path), mono)


def test_chunks_before_the_data_and_odd_sizes_are_walked(tmp_path):
    path = tmp_path / "clip.wav"
    soundfile.write(path, _noise(4000), SR, subtype="PCM_16")
    odd = _with_chunk_before_data(path.read_bytes(), b"LIST", b"INFOISFT\x05\0\0\0kws!\0")  # 17 bytes: padded
    (tmp_path / "odd.wav").write_bytes(odd)
    assert _layout(tmp_path / "odd.wav").plain_pcm16
    assert np.array_equal(read_audio(tmp_path / "odd.wav"), soundfile.read(path, dtype="float32")[0])


def test_a_frame_cut_in_half_is_dropped_as_libsndfile_drops_it(tmp_path):
    path = tmp_path / "clip.wav"
    soundfile.write(path, _noise(1000, 2), SR, subtype="PCM_16")
    data = bytearray(path.read_bytes()[:-2])  # the last frame loses its right sample
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 3998)
    (tmp_path / "cut.wav").write_bytes(bytes(data))
    assert _layout(tmp_path / "cut.wav").frames == 999
    assert np.array_equal(read_audio(tmp_path / "cut.wav"), read_audio(path)[:999])


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_24", "PCM_32", "FLOAT", "ULAW"])
def test_other_sample_formats_go_to_libsndfile(tmp_path, subtype):
    path = tmp_path / "clip.wav"
    soundfile.write(path, _noise(3000), SR, subtype=subtype)
    assert not _layout(path).plain_pcm16
    assert np.array_equal(read_audio(path), soundfile.read(path, dtype="float32")[0])


def test_an_unfilled_data_size_goes_to_libsndfile(tmp_path):
    path = tmp_path / "clip.wav"
    soundfile.write(path, _noise(3000), SR, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = b"\xff\xff\xff\xff"  # what a writer that could not seek back leaves
    (tmp_path / "streamed.wav").write_bytes(bytes(data))
    assert not _layout(tmp_path / "streamed.wav").plain_pcm16
    assert np.array_equal(read_audio(tmp_path / "streamed.wav"), soundfile.read(path, dtype="float32")[0])


def test_a_wav_too_large_to_read_whole_is_read_from_the_file(tmp_path, monkeypatch):
    path = tmp_path / "clip.wav"
    soundfile.write(path, _noise(8000), SR, subtype="PCM_16")
    whole = read_audio(path)
    monkeypatch.setattr(audio, "_WHOLE_WAV_BYTES", 1000)
    assert np.array_equal(read_audio(path), whole)
    soundfile.write(tmp_path / "long.wav", _noise(SR * 3), SR, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"long\.wav: is 3\.0 s long, over the 2 s limit"):
        read_audio(tmp_path / "long.wav", max_seconds=2)

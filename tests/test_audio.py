"""Audio loading: every supported encoding, mixdown, resampling, and a specific error per failure."""

import re

import numpy as np
import pytest
import soundfile

from kws_runtime import AUDIO_EXTENSIONS, AudioError, FeatureSpec, fit_length, load_audio, read_audio
from kws_runtime.audio import is_audio_file

from broken_audio import SR, broken_files, tone


def dominant_hz(y, sr=SR):
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.fft.rfftfreq(len(y), 1 / sr)[spectrum.argmax()]


@pytest.mark.parametrize(
    "ext, subtype, atol",
    [
        ("wav", "PCM_U8", 1 / 64),  # 8-bit WAV is unsigned
        ("wav", "PCM_16", 1e-4),
        ("wav", "PCM_24", 1e-6),
        ("wav", "PCM_32", 1e-7),
        ("wav", "FLOAT", 1e-7),
        ("wav", "DOUBLE", 1e-7),
        ("flac", "PCM_16", 1e-4),
        ("flac", "PCM_24", 1e-6),
    ],
)
def test_lossless_encodings_decode_to_the_signal(tmp_path, ext, subtype, atol):
    x = tone(440) + tone(3000, amplitude=0.2)
    path = tmp_path / f"clip.{ext}"
    soundfile.write(path, x, SR, subtype=subtype)
    y = read_audio(path)
    assert y.dtype == np.float32 and y.shape == (SR,) and y.flags.c_contiguous
    np.testing.assert_allclose(y, x, atol=atol)


def test_ogg_vorbis_keeps_the_tone(tmp_path):
    path = tmp_path / "clip.ogg"
    soundfile.write(path, tone(1000), SR, format="OGG", subtype="VORBIS")
    y = read_audio(path)
    assert y.dtype == np.float32 and abs(len(y) - SR) < 100
    assert abs(dominant_hz(y) - 1000) < 2
    assert 0.4 < np.abs(y).max() < 0.6


def test_stereo_is_averaged(tmp_path):
    left, right = tone(500), tone(2000, amplitude=0.25)
    soundfile.write(tmp_path / "st.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(read_audio(tmp_path / "st.wav"), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("rate, freq", [(44100, 1000), (48000, 3000), (8000, 440), (22050, 2500)])
def test_other_rates_are_resampled_keeping_frequency(tmp_path, rate, freq):
    soundfile.write(tmp_path / "r.wav", tone(freq, sr=rate), rate, subtype="PCM_16")
    y = read_audio(tmp_path / "r.wav")
    assert abs(len(y) - SR) <= 1
    assert abs(dominant_hz(y) - freq) <= 1.0
    assert 0.45 < np.abs(y[1000:-1000]).max() < 0.55


def test_target_rate_can_be_chosen(tmp_path):
    soundfile.write(tmp_path / "r.wav", tone(440), SR, subtype="PCM_16")
    y = read_audio(tmp_path / "r.wav", sample_rate=8000)
    assert len(y) == 8000 and abs(dominant_hz(y, 8000) - 440) <= 1


def test_fit_length_pads_and_cuts():
    x = np.arange(1, 6, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(x, 8), [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(fit_length(x, 3), [1, 2, 3])
    np.testing.assert_array_equal(fit_length(x, 5), x)
    assert fit_length(np.ones((2, 5), np.float32), 7).shape == (2, 7)
    assert fit_length(x, 8).dtype == np.float32


@pytest.mark.parametrize("seconds", [0.3, 1.0, 2.5])
def test_load_audio_gives_one_clip(tmp_path, seconds):
    x = tone(700, seconds=seconds)
    soundfile.write(tmp_path / "c.wav", x, SR, subtype="FLOAT")
    y = load_audio(tmp_path / "c.wav")
    assert y.shape == (SR,) and y.dtype == np.float32
    n = min(len(x), SR)
    np.testing.assert_allclose(y[:n], x[:n], atol=1e-7)
    assert not y[n:].any()
    fine = FeatureSpec(clip_samples=8000)
    assert load_audio(tmp_path / "c.wav", fine).shape == (8000,)


def test_real_recording(real_data):
    path = sorted((real_data / "yes").glob("*.wav"))[0]
    y = load_audio(path)
    assert y.shape == (SR,) and y.dtype == np.float32 and np.abs(y).max() > 0.01


def test_audio_extensions():
    assert AUDIO_EXTENSIONS == {".wav", ".flac", ".ogg"}
    assert is_audio_file("a/B.WAV") and is_audio_file("x.flac") and not is_audio_file("x.mp3")


# ------------------------------------------------------------------------------------- errors


def test_each_broken_file_raises_audio_error_with_its_path(tmp_path):
    cases = broken_files(tmp_path)
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(AudioError) as info:  # never struct.error, IndexError, RuntimeError, ...
            load_audio(path)
        assert type(info.value) is AudioError, name
        assert str(path) in str(info.value), name
        assert info.value.path == str(path)
        assert re.search(message, info.value.reason), (name, info.value.reason)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(AudioError, match=r"nowhere\.wav: no such file"):
        read_audio(tmp_path / "nowhere.wav")
    with pytest.raises(AudioError, match="is a folder, not an audio file"):
        read_audio(tmp_path)


def test_length_limit(tmp_path):
    soundfile.write(tmp_path / "long.wav", tone(440, seconds=2.0), SR, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"long\.wav: is 2\.0 s long, over the 1\.5 s limit"):
        read_audio(tmp_path / "long.wav", max_seconds=1.5)
    with pytest.raises(AudioError, match="over the 1 s limit"):
        load_audio(tmp_path / "long.wav", max_seconds=1.0)
    assert len(read_audio(tmp_path / "long.wav")) == 2 * SR

"""log_mel against librosa (the reference), on real speech and on signals that stress it."""

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import librosa
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kws_runtime import FeatureSpec, analysis_window, load_audio, log_mel, mel_filterbank
from kws_runtime.features import power_spectrogram, power_to_db

TOLERANCE_DB = 1e-3
PRESETS = ["seed", "fine"]
SR = 16000


def reference(y, spec: FeatureSpec) -> np.ndarray:
    """librosa's log-mel for ``spec``: what the runtime must reproduce."""
    with warnings.catch_warnings():
        # Clips shorter than n_fft are part of what is tested; librosa warns about them.
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large for input signal", category=UserWarning)
        mel = _melspectrogram(y, spec)
    ref = np.max if spec.ref == "max" else spec.ref
    return librosa.power_to_db(mel, ref=ref, amin=spec.amin, top_db=spec.top_db)


def _melspectrogram(y, spec):
    return librosa.feature.melspectrogram(
        y=y,
        sr=spec.sample_rate,
        n_fft=spec.n_fft,
        win_length=spec.win_length,
        hop_length=spec.hop_length,
        window=spec.window,
        center=spec.center,
        pad_mode=spec.pad_mode,
        power=spec.power,
        n_mels=spec.n_mels,
        fmin=spec.fmin,
        fmax=spec.fmax,
        htk=spec.htk,
        norm=spec.mel_norm,
    )


def assert_matches_librosa(y, spec):
    got = log_mel(y, spec)
    want = reference(y, spec)
    assert got.shape == want.shape
    if len(y) == spec.clip_samples:
        assert got.shape == spec.shape
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.abs(got - want).max() < TOLERANCE_DB


def tone(freq, amplitude=0.5, n=SR):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


def synthetic_signals():
    rng = np.random.default_rng(0)
    return {
        "silence": np.zeros(SR, np.float32),
        "tone_440": tone(440),
        "tone_50": tone(50, 0.9),
        "tone_7900": tone(7900, 0.1),
        "tone_quiet": tone(1000, 1e-4),
        "two_tones": tone(300, 0.3) + tone(2500, 0.01),
        "clipped": np.clip(4 * tone(250, 1.0), -1, 1),  # square-ish, sitting at +-1
        "full_scale_square": np.sign(tone(1000, 1.0) + 1e-9).astype(np.float32),
        "white_noise": rng.uniform(-1, 1, SR).astype(np.float32),
        "quiet_noise": (1e-3 * rng.standard_normal(SR)).astype(np.float32),
        "click": np.eye(1, SR, SR // 2, dtype=np.float32)[0],
    }


@pytest.fixture(scope="module")
def speech(real_data):
    words = ["yes", "no", "up", "stop", "seven", "marvin"]
    files = [sorted((real_data / w).glob("*.wav"))[0] for w in words if (real_data / w).is_dir()]
    return [load_audio(f) for f in files]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(synthetic_signals()))
def test_synthetic_signals_match_librosa(preset, name):
    assert_matches_librosa(synthetic_signals()[name], FeatureSpec.preset(preset))


@pytest.mark.parametrize("preset", PRESETS)
def test_real_speech_matches_librosa_single_and_batched(speech, preset):
    spec = FeatureSpec.preset(preset)
    batch = np.stack(speech)
    got = log_mel(batch, spec)
    assert got.shape == (len(speech), *spec.shape) and got.dtype == np.float32
    for clip, features in zip(speech, got):
        want = reference(clip, spec)
        assert np.abs(features - want).max() < TOLERANCE_DB
        assert np.abs(log_mel(clip, spec) - want).max() < TOLERANCE_DB


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_equals_single_clips(preset):
    spec = FeatureSpec.preset(preset)
    signals = np.stack(list(synthetic_signals().values()))
    batch = log_mel(signals, spec)
    for clip, features in zip(signals, batch):
        np.testing.assert_array_equal(log_mel(clip, spec), features)


def test_large_batch_is_processed_in_chunks_consistently():
    spec = FeatureSpec()
    rng = np.random.default_rng(1)
    clips = (rng.standard_normal((9, SR)) * rng.uniform(0.01, 1, (9, 1))).astype(np.float32)
    np.testing.assert_array_equal(log_mel(clips, spec)[5], log_mel(clips[5], spec))


OTHER_SPECS = {
    "reflect_pad": FeatureSpec(pad_mode="reflect"),
    "not_centered": FeatureSpec(center=False, n_fft=512, win_length=400, hop_length=160),
    "fixed_ref_no_top_db": FeatureSpec(ref=1.0, top_db=None),
    "magnitude": FeatureSpec(power=1.0),
    "htk_unnormalised_band_limited": FeatureSpec(htk=True, mel_norm=None, fmin=20.0, fmax=7600.0, n_mels=64),
    "many_mels_short_fft": FeatureSpec(n_mels=128, n_fft=512, win_length=400, hop_length=160),
    "odd_window": FeatureSpec(n_fft=1024, win_length=777, hop_length=333),
    "half_second_8k": FeatureSpec(sample_rate=8000, clip_samples=4000, n_fft=256, win_length=200, hop_length=80),
}


@pytest.mark.parametrize("name", list(OTHER_SPECS))
def test_other_specs_match_librosa(name, speech):
    spec = OTHER_SPECS[name]
    rng = np.random.default_rng(2)
    clip = speech[0][: spec.clip_samples] if spec.sample_rate == SR else rng.uniform(-0.5, 0.5, spec.clip_samples).astype(np.float32)
    assert_matches_librosa(clip, spec)
    assert_matches_librosa(tone(700, 0.2, spec.clip_samples), spec)


def test_lengths_other_than_the_clip_length():
    spec = FeatureSpec.preset("fine")
    for n in (1, 100, 511, 513, 16001, 24000):
        y = np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32)
        assert_matches_librosa(y, spec)


@pytest.mark.parametrize("win_length, n_fft", [(2048, 2048), (480, 512), (400, 512), (777, 1024)])
def test_window_matches_librosa(win_length, n_fft):
    spec = FeatureSpec(n_fft=n_fft, win_length=win_length)
    want = librosa.util.pad_center(librosa.filters.get_window("hann", win_length, fftbins=True), size=n_fft)
    got = analysis_window(spec)
    assert got.dtype == np.float64 and got.shape == (n_fft,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"n_fft": 512, "win_length": 480},
        {"htk": True},
        {"mel_norm": None},
        {"n_mels": 128, "n_fft": 1024, "win_length": 1024},
        {"fmin": 300.0, "fmax": 3400.0, "n_mels": 20},
        {"sample_rate": 8000, "clip_samples": 8000, "n_fft": 256, "win_length": 256},
    ],
)
def test_filterbank_matches_librosa(kwargs):
    spec = FeatureSpec(**kwargs)
    want = librosa.filters.mel(
        sr=spec.sample_rate, n_fft=spec.n_fft, n_mels=spec.n_mels, fmin=spec.fmin, fmax=spec.fmax,
        htk=spec.htk, norm=spec.mel_norm, dtype=np.float64,
    )
    got = mel_filterbank(spec)
    assert got.shape == (spec.n_mels, spec.n_fft // 2 + 1) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("preset", PRESETS)
def test_power_spectrogram_and_power_to_db_match_librosa(preset, speech):
    spec = FeatureSpec.preset(preset)
    y = speech[1].astype(np.float64)
    stft = librosa.stft(y, n_fft=spec.n_fft, win_length=spec.win_length, hop_length=spec.hop_length, center=True)
    power = power_spectrogram(y, spec)
    assert power.shape == (1, spec.n_frames, spec.n_fft // 2 + 1)
    np.testing.assert_allclose(power[0].T, np.abs(stft) ** 2, rtol=1e-9, atol=1e-9)
    mel = power[0] @ mel_filterbank(spec).T
    np.testing.assert_allclose(power_to_db(mel[None], spec)[0].T, librosa.power_to_db(mel.T, ref=np.max, top_db=80), atol=1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    preset=st.sampled_from(PRESETS),
    seed=st.integers(0, 2**32 - 1),
    log_amplitude=st.floats(-5, 0),
    length=st.integers(600, 2 * SR),
    dc=st.floats(-0.5, 0.5),
)
def test_random_signals_match_librosa(preset, seed, log_amplitude, length, dc):
    rng = np.random.default_rng(seed)
    y = (10**log_amplitude * rng.standard_normal(length) + dc).clip(-1, 1).astype(np.float32)
    assert_matches_librosa(y, FeatureSpec.preset(preset))


def test_concurrent_calls_with_different_shapes_agree_with_serial_ones():
    rng = np.random.default_rng(3)
    jobs = []
    for i in range(24):
        spec = FeatureSpec.preset(PRESETS[i % 2])
        shape = (SR,) if i % 3 == 0 else ((i % 4) + 1, SR - 37 * (i % 5))
        jobs.append((rng.uniform(-1, 1, shape).astype(np.float32), spec))
    serial = [log_mel(y, spec) for y, spec in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: (threading.get_ident(), log_mel(*job)), jobs))
    for want, (_, got) in zip(serial, parallel):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros(SR, np.int16), "floating point"),
        (np.zeros((2, 2, SR), np.float32), r"shape \(samples,\) or \(clips, samples\)"),
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((3, 0), np.float32), "empty"),
    ],
)
def test_bad_audio_is_refused(audio, message):
    with pytest.raises(ValueError, match=message):
        log_mel(audio)


def test_too_short_without_centering_is_refused():
    with pytest.raises(ValueError, match="shorter than n_fft"):
        log_mel(np.zeros(100, np.float32), FeatureSpec(center=False, n_fft=512, win_length=512, clip_samples=16000))

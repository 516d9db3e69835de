"""The torch log-mel front end against the runtime's numpy features."""

import dataclasses

import numpy as np
import pytest
import torch

from kws_runtime.audio import load_audio
from kws_runtime.features import log_mel
from kws_runtime.spec import FeatureSpec
from kws_train.augment import SpecAugment
from kws_train.frontend import Frontend, LogMel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESETS = ["seed", "fine"]


@pytest.fixture(scope="module")
def real_batch(real_data):
    """Three clips of every word folder (and ``_silence_``), plus a clip whose weak high
    bands sit at the float32 FFT's noise floor (when present), as float32 ``(N, 16000)``."""
    paths = []
    for folder in sorted(p for p in real_data.iterdir() if p.is_dir() and p.name != "_background_noise_"):
        paths += sorted(folder.glob("*.wav"))[:3]
    hard = real_data / "go" / "bfd26d6b_nohash_2.wav"
    if hard.is_file():
        paths.append(hard)
    assert len(paths) > 60
    return np.stack([load_audio(p) for p in paths])


def synthetic_batch(n_samples=16000):
    rng = np.random.default_rng(0)
    t = np.arange(n_samples) / 16000.0
    return np.stack(
        [
            np.zeros(n_samples),  # digital silence: everything at the amin floor
            rng.standard_normal(n_samples) * 0.3,  # loud white noise
            rng.integers(-1, 2, n_samples) / 32768.0,  # one-LSB dither
            np.full(n_samples, 0.25),  # DC only
            0.5 * np.sin(2 * np.pi * 440.0 * t) + 1e-4 * rng.standard_normal(n_samples),  # tone over a floor
        ]
    ).astype(np.float32)


def features(module, audio):
    with torch.no_grad():
        return module.to(DEVICE)(torch.from_numpy(audio).to(DEVICE)).cpu().numpy()


@pytest.mark.parametrize("preset", PRESETS)
def test_equals_runtime_on_real_clips(real_batch, preset):
    spec = FeatureSpec.preset(preset)
    ours = features(LogMel(spec), real_batch)
    ref = log_mel(real_batch, spec)
    assert ours.shape == ref.shape == (len(real_batch),) + spec.shape
    assert ours.dtype == np.float32
    if DEVICE.type == "cpu":
        assert np.abs(ours - ref).max() <= 1e-3
    else:  # float32 FFT on accelerators: see LogMel's docstring
        assert np.abs(ours - ref).max() <= 3e-3
        assert np.abs(ours - ref)[ref >= -60].max() <= 5e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_equals_runtime_on_silence_and_noise(preset):
    spec = FeatureSpec.preset(preset)
    audio = synthetic_batch()
    ours = features(LogMel(spec), audio)
    ref = log_mel(audio, spec)
    assert np.abs(ours - ref).max() <= 1e-3
    assert np.all(ours[0] == 0.0)  # silence: ref=max puts the floor at 0 dB


@pytest.mark.parametrize("preset", PRESETS)
def test_float32_fft_error_stays_in_the_weak_bins(real_batch, preset):
    """The float32 path used on accelerators: the error is documented, and confined to
    bins far below the clip's peak."""
    spec = FeatureSpec.preset(preset)
    ours = features(LogMel(spec, fft_dtype=torch.float32), real_batch)
    ref = log_mel(real_batch, spec)
    err = np.abs(ours - ref)
    assert err.max() <= 3e-3
    assert err[ref >= -60].max() <= 5e-4


@pytest.mark.parametrize(
    "change",
    [
        {"pad_mode": "reflect"},
        {"center": False},
        {"ref": 1.0, "top_db": None},
        {"power": 1.0, "mel_norm": None, "htk": True, "fmin": 20.0, "fmax": 7000.0},
        {"n_mels": 64, "n_fft": 1024, "win_length": 400, "hop_length": 160},
    ],
    ids=lambda c: ",".join(c),
)
def test_follows_every_spec_field(change):
    spec = dataclasses.replace(FeatureSpec.preset("fine"), **change)
    audio = synthetic_batch()[1:]
    # float64 on every device: this is about the fields, the float32 error has its own test
    ours = features(LogMel(spec, fft_dtype=torch.float64), audio)
    ref = log_mel(audio, spec)
    assert ours.shape == ref.shape == (len(audio),) + spec.shape
    assert np.abs(ours - ref).max() <= 1e-3


def test_shapes_int16_and_bad_input():
    spec = FeatureSpec.preset("seed")
    m = LogMel(spec).to(DEVICE)
    audio = synthetic_batch()[1]
    one = m(torch.from_numpy(audio).to(DEVICE))
    assert one.shape == spec.shape
    as_int = torch.from_numpy(np.round(audio.clip(-1, 0.99) * 32768).astype(np.int16)).to(DEVICE)
    ref = log_mel((as_int.cpu().numpy() / 32768.0).astype(np.float32), spec)
    assert np.abs(m(as_int).cpu().numpy() - ref).max() <= 1e-3
    with pytest.raises(ValueError, match="shape"):
        m(torch.zeros(2, 3, 16000, device=DEVICE))
    with pytest.raises(ValueError, match="int32"):
        m(torch.zeros(2, 16000, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="shorter than n_fft"):
        LogMel(dataclasses.replace(spec, center=False))(torch.zeros(1, 100))
    with pytest.raises(ValueError, match="fft_dtype"):
        LogMel(spec, fft_dtype=torch.float16)


def test_nothing_in_the_state_dict_and_float32_under_autocast():
    spec = FeatureSpec.preset("seed")
    m = LogMel(spec)
    assert m.state_dict() == {}  # window and filterbank come from the spec, never from a checkpoint
    audio = torch.from_numpy(synthetic_batch()[1:])
    plain = m(audio)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m(audio)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)


def test_frontend_adds_channel_and_augments_only_in_training():
    spec = FeatureSpec.preset("fine")
    fe = Frontend(spec, spec_augment=SpecAugment(freq_masks=2, freq_mask_bands=10, fill=123.0, seed=3)).to(DEVICE)
    audio = torch.from_numpy(synthetic_batch()).to(DEVICE)
    plain = LogMel(spec).to(DEVICE)(audio)
    fe.train()
    out = fe(audio)
    assert out.shape == (len(audio), 1) + spec.shape
    masked = out[:, 0] == 123.0
    assert masked.any()
    assert torch.equal(out[:, 0][~masked], plain[~masked])
    fe.eval()
    assert torch.equal(fe(audio)[:, 0], plain)

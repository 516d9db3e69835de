"""Batch augmentation on the device: determinism, speed, shift bounds, achieved SNR, gain, masks."""

import json

import numpy as np
import pytest
import torch

from kws_runtime.spec import FeatureSpec
from kws_train.augment import AugmentConfig, SpecAugment, WaveformAugment, build_frontend, resample_about_centre
from kws_train.frontend import LogMel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPEC = FeatureSpec.preset("seed")
L = SPEC.clip_samples


def recordings():
    """Two 'background recordings' with recognisable content, and one too short to use."""
    rng = np.random.default_rng(1)
    t = np.arange(3 * L) / SPEC.sample_rate
    return [
        (0.2 * rng.standard_normal(3 * L)).astype(np.float32),
        (0.05 * np.sin(2 * np.pi * 300.0 * t) + 0.01 * np.sin(2 * np.pi * 2.1 * t)).astype(np.float32),
        np.ones(L // 2, dtype=np.float32),
    ]


def clips(n=64, seed=0):
    """Speech-like clips: bursts of noise with different levels and silence around them."""
    rng = np.random.default_rng(seed)
    start = rng.integers(2000, 6000, size=(n, 1))
    pos = np.arange(L)[None, :]
    burst = (pos >= start) & (pos < start + 8000)
    level = rng.uniform(0.01, 0.5, size=(n, 1))
    x = (burst * level * rng.standard_normal((n, L))).astype(np.float32)
    return torch.from_numpy(x).to(DEVICE)


def only(**change):
    """A config with everything off except ``change``."""
    base = AugmentConfig.off().to_dict()
    base.update(change)
    return AugmentConfig.from_dict(base)


def test_same_seed_same_batch_other_seed_other_batch():
    x = clips()
    a = WaveformAugment(SPEC, recordings(), AugmentConfig(), seed=5).to(DEVICE)
    b = WaveformAugment(SPEC, recordings(), AugmentConfig(), seed=5).to(DEVICE)
    c = WaveformAugment(SPEC, recordings(), AugmentConfig(), seed=6).to(DEVICE)
    first = a(x)
    assert torch.equal(first, b(x))
    assert not torch.equal(first, c(x))
    assert not torch.equal(first, a(x))  # the stream moves on
    a.manual_seed(5)
    assert torch.equal(first, a(x))
    s1, s2 = SpecAugment(seed=9).to(DEVICE), SpecAugment(seed=9).to(DEVICE)
    feats = LogMel(SPEC).to(DEVICE)(x)
    assert torch.equal(s1(feats), s2(feats))


def test_eval_mode_is_identity():
    x = clips(8)
    wave = WaveformAugment(SPEC, recordings(), AugmentConfig(), seed=0).to(DEVICE).eval()
    assert wave(x) is x
    feats = LogMel(SPEC).to(DEVICE)(x)
    assert SpecAugment().to(DEVICE).eval()(feats) is feats
    fe = build_frontend(SPEC, AugmentConfig(), recordings(), seed=0).to(DEVICE).eval()
    assert torch.equal(fe(x)[:, 0], feats)
    fe.train()
    assert not torch.equal(fe(x)[:, 0], feats)


def test_shift_stays_within_bounds_and_fills_zeros():
    aug = WaveformAugment(SPEC, None, only(shift_ms=100.0, clip=False), seed=1).to(DEVICE)
    assert aug.max_shift == 1600
    x = torch.arange(1, L + 1, dtype=torch.float32, device=DEVICE).repeat(512, 1)
    params = aug.draw(len(x), DEVICE)
    out = aug.apply(x, params).cpu().numpy()
    shifts = params["shift"].cpu().numpy()
    assert np.abs(shifts).max() <= 1600
    assert shifts.min() < -1400 and shifts.max() > 1400  # the whole range is used
    ramp = x[0].cpu().numpy()
    for row, s in zip(out, shifts):
        expected = np.zeros(L, dtype=np.float32)
        if s >= 0:
            expected[s:] = ramp[: L - s]
        else:
            expected[:s] = ramp[-s:]
        np.testing.assert_array_equal(row, expected)


def test_noise_is_mixed_at_the_drawn_snr_from_the_recordings():
    noise = recordings()
    aug = WaveformAugment(SPEC, noise, only(noise_prob=1.0, snr_db=(0.0, 20.0), clip=False), seed=2).to(DEVICE)
    assert len(aug.noise_lengths) == 2  # the short recording is skipped
    x = clips(256)
    params = aug.draw(len(x), DEVICE)
    added = (aug.apply(x, params) - x).double()
    achieved = 10 * torch.log10(x.double().square().mean(1) / added.square().mean(1))
    snr = params["snr_db"].double()
    assert snr.min() >= 0 and snr.max() <= 20 and snr.max() - snr.min() > 15
    assert torch.allclose(achieved, snr, atol=0.01)
    # the added noise is a scaled window of the recording that was drawn
    for i in range(0, 256, 37):
        rec = noise[int(params["noise_file"][i])]
        start = int(params["noise_start"][i])
        assert 0 <= start <= len(rec) - L
        segment = torch.from_numpy(rec[start : start + L]).double().to(DEVICE)
        scale = added[i].dot(segment) / segment.dot(segment)
        assert torch.allclose(added[i], scale * segment, atol=1e-6)


def test_noise_probability_and_silent_clips():
    aug = WaveformAugment(SPEC, recordings(), only(noise_prob=0.3, clip=False), seed=3).to(DEVICE)
    x = clips(600)
    x[:10] = 0.0
    params = aug.draw(len(x), DEVICE)
    out = aug.apply(x, params)
    changed = (out != x).any(dim=1)
    assert torch.equal(changed[10:], params["noise"][10:])
    assert 0.22 < params["noise"].float().mean() < 0.38
    assert not out[:10].any()  # no signal, no SNR to honour: stays silent


def test_gain_and_saturation():
    aug = WaveformAugment(SPEC, None, only(gain_db=(-6.0, 6.0), clip=False), seed=4).to(DEVICE)
    x = clips(128)
    params = aug.draw(len(x), DEVICE)
    ratio = aug.apply(x, params).abs().amax(1) / x.abs().amax(1)
    gain = params["gain_db"]
    assert gain.min() >= -6 and gain.max() <= 6
    assert torch.allclose(20 * torch.log10(ratio), gain, atol=1e-4)
    loud = WaveformAugment(SPEC, None, only(gain_db=(30.0, 30.0)), seed=4).to(DEVICE)
    out = loud(x)
    assert out.abs().max() == 1.0


def peak_hz(x: torch.Tensor) -> np.ndarray:
    spectrum = np.abs(np.fft.rfft(x.cpu().numpy() * np.hanning(x.shape[1]), axis=1))
    return spectrum.argmax(axis=1) * SPEC.sample_rate / x.shape[1]


def test_speed_changes_pitch_and_tempo_about_the_centre():
    t = torch.arange(L, device=DEVICE, dtype=torch.float32) / SPEC.sample_rate
    tone = torch.sin(2 * np.pi * 500.0 * t).repeat(3, 1)
    speed = torch.tensor([1.0, 0.9, 1.1], device=DEVICE)
    out = resample_about_centre(tone, speed)
    assert torch.allclose(out[0], tone[0], atol=1e-6)
    assert np.allclose(peak_hz(out), [500.0, 450.0, 550.0], atol=2.0)
    # a click at the centre stays there; one 2,000 samples after it moves to 2,000 / speed
    click = torch.zeros(2, L, device=DEVICE)
    centre = (L - 1) // 2
    click[:, centre] = click[:, centre + 2000] = 1.0
    moved = resample_about_centre(click, torch.tensor([0.8, 1.25], device=DEVICE)).cpu()
    assert moved[0, centre] > 0.85 and moved[1, centre] > 0.85
    assert moved[0, centre + 2500] > 0.85 and moved[1, centre + 1600] > 0.85
    # faster: the edges come from outside the clip and are silent
    ones = resample_about_centre(torch.ones(1, L, device=DEVICE), torch.tensor([1.25], device=DEVICE)).cpu()[0]
    assert ones[:1000].abs().max() == 0 and ones[-1000:].abs().max() == 0 and ones[L // 2] == 1.0


def test_speed_is_drawn_in_range_and_leaves_the_other_draws_alone():
    x = clips(256)
    plain = WaveformAugment(SPEC, recordings(), AugmentConfig(), seed=3).to(DEVICE)
    faster = WaveformAugment(SPEC, recordings(), AugmentConfig(speed=(0.9, 1.1)), seed=3).to(DEVICE)
    p, q = plain.draw(len(x), DEVICE), faster.draw(len(x), DEVICE)
    assert torch.equal(p["speed"], torch.ones(len(x), device=DEVICE))
    assert 0.9 <= q["speed"].min() < 0.92 and 1.08 < q["speed"].max() <= 1.1
    for key in ("shift", "noise", "noise_file", "noise_start", "snr_db", "gain_db"):
        assert torch.equal(p[key], q[key]), key
    only_speed = WaveformAugment(SPEC, None, only(speed=(0.9, 1.1), clip=False), seed=3).to(DEVICE)
    params = only_speed.draw(len(x), DEVICE)
    assert torch.equal(only_speed.apply(x, params), resample_about_centre(x, params["speed"]))


@pytest.mark.parametrize("preset", ["seed", "fine"])
def test_masks_stay_within_limits(preset):
    spec = FeatureSpec.preset(preset)
    masker = SpecAugment.from_config(spec, AugmentConfig(freq_masks=2, freq_mask_bands=7, time_masks=2, time_mask_ms=100.0), seed=7)
    frames = round(100.0 * spec.sample_rate / 1000 / spec.hop_length)
    assert masker.time_mask_frames == frames
    masker.to(DEVICE)
    feats = LogMel(spec).to(DEVICE)(clips(200))
    params = masker.draw(*feats.shape, DEVICE)
    out = masker.apply(feats, params)
    for axis, count, widest, size in (("freq", 2, 7, spec.n_mels), ("time", 2, frames, spec.n_frames)):
        width, start = params[f"{axis}_width"], params[f"{axis}_start"]
        assert width.shape == (200, count)
        assert width.min() == 0 and width.max() == widest  # the full range 0..widest is drawn
        assert start.min() >= 0 and (start + width).max() <= size
        covered = params[axis].sum(1)
        assert covered.max() <= count * widest
        assert torch.equal(covered > 0, width.sum(1) > 0)
    mean = feats.mean(dim=(1, 2), keepdim=True).expand_as(feats)
    masked = params["freq"][:, :, None] | params["time"][:, None, :]
    assert torch.equal(out[masked], mean[masked])
    assert torch.equal(out[~masked], feats[~masked])


def test_config_round_trip_and_clear_errors():
    config = AugmentConfig(snr_db=[5, 10], mask_fill="min")
    data = json.loads(json.dumps(config.to_dict()))
    assert AugmentConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="snr_db"):
        AugmentConfig(snr_db=(20.0, 0.0))
    with pytest.raises(ValueError, match="noise_prob"):
        AugmentConfig(noise_prob=1.5)
    with pytest.raises(ValueError, match="speed"):
        AugmentConfig(speed=(0.9, 3.0))
    assert AugmentConfig.from_dict(AugmentConfig(speed=(0.9, 1.1)).to_dict()).speed == (0.9, 1.1)
    with pytest.raises(ValueError, match="unknown field"):
        AugmentConfig.from_dict({"shfit_ms": 10})
    with pytest.raises(ValueError, match="background_noise"):
        WaveformAugment(SPEC, None, AugmentConfig())
    with pytest.raises(ValueError, match="shorter than"):
        WaveformAugment(SPEC, [np.zeros(100, np.float32)], AugmentConfig())
    aug = WaveformAugment(SPEC, recordings(), AugmentConfig())
    with pytest.raises(ValueError, match="clip_samples"):
        aug(torch.zeros(2, L // 2))

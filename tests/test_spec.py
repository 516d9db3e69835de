"""FeatureSpec: JSON round trips, presets, and refusals with clear messages."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kws_runtime import FeatureSpec, SpecError
from kws_runtime.spec import SPEC_VERSION


def through_json(spec: FeatureSpec) -> FeatureSpec:
    return FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))


def test_presets():
    seed, fine = FeatureSpec.preset("librosa"), FeatureSpec.preset("fine")
    assert FeatureSpec.preset("seed") == seed  # the preset's first name still works
    assert seed == FeatureSpec()
    assert (seed.n_fft, seed.win_length, seed.hop_length, seed.n_mels) == (2048, 2048, 512, 40)
    assert seed.shape == (40, 32) and seed.n_frames == 32
    assert (fine.n_fft, fine.win_length, fine.hop_length) == (512, 480, 160)
    assert fine.shape == (40, 101)
    assert seed.f_max == 8000.0
    with pytest.raises(SpecError, match="unknown feature preset 'coarse'; choose one of librosa, fine"):
        FeatureSpec.preset("coarse")


def test_n_frames_without_centering():
    spec = FeatureSpec(center=False, n_fft=512, win_length=400, hop_length=160)
    assert spec.n_frames == 1 + (16000 - 512) // 160


@pytest.mark.parametrize("name", ["seed", "fine"])
def test_presets_round_trip_through_json(name):
    spec = FeatureSpec.preset(name)
    data = spec.to_dict()
    assert data["version"] == SPEC_VERSION
    assert set(data) == {"version"} | {f.name for f in dataclasses.fields(FeatureSpec)}
    assert through_json(spec) == spec
    assert hash(through_json(spec)) == hash(spec)  # usable as a cache key


@st.composite
def specs(draw):
    sample_rate = draw(st.sampled_from([8000, 16000, 22050, 44100]))
    n_fft = draw(st.sampled_from([256, 400, 512, 1024, 2048]))
    fmin = draw(st.floats(0, sample_rate / 4, allow_nan=False))
    return FeatureSpec(
        sample_rate=sample_rate,
        clip_samples=draw(st.integers(n_fft, 3 * sample_rate)),
        n_fft=n_fft,
        win_length=draw(st.integers(1, n_fft)),
        hop_length=draw(st.integers(1, n_fft)),
        n_mels=draw(st.integers(1, 128)),
        fmin=fmin,
        fmax=draw(st.one_of(st.none(), st.floats(fmin + 1, sample_rate / 2))),
        center=draw(st.booleans()),
        pad_mode=draw(st.sampled_from(["constant", "reflect"])),
        power=draw(st.sampled_from([1.0, 2.0, 1.5])),
        mel_norm=draw(st.sampled_from(["slaney", None])),
        htk=draw(st.booleans()),
        ref=draw(st.one_of(st.just("max"), st.floats(1e-6, 1e3))),
        amin=draw(st.floats(1e-12, 1e-3)),
        top_db=draw(st.one_of(st.none(), st.floats(0, 200))),
    )


@settings(max_examples=60, deadline=None)
@given(specs())
def test_any_valid_spec_round_trips_through_json(spec):
    again = through_json(spec)
    assert again == spec
    assert again.shape == spec.shape


def test_unknown_field_is_refused_with_its_name():
    data = FeatureSpec().to_dict()
    data["n_mfcc"] = 13
    data["colour"] = "blue"
    with pytest.raises(SpecError, match="unknown field.*colour, n_mfcc; known: amin, center"):
        FeatureSpec.from_dict(data)


@pytest.mark.parametrize("version", [None, 0, 2, "1", 1.5])
def test_unknown_version_is_refused(version):
    data = FeatureSpec().to_dict()
    data["version"] = version
    with pytest.raises(SpecError, match=f"feature spec version {version!r} is not supported"):
        FeatureSpec.from_dict(data)


def test_missing_version_is_refused():
    data = FeatureSpec().to_dict()
    del data["version"]
    with pytest.raises(SpecError, match="version None is not supported"):
        FeatureSpec.from_dict(data)


@pytest.mark.parametrize("data", [None, [], "seed", 3])
def test_non_object_is_refused(data):
    with pytest.raises(SpecError, match="must be a JSON object"):
        FeatureSpec.from_dict(data)


BAD_VALUES = [
    ("sample_rate", 0, "positive integer"),
    ("sample_rate", 16000.0, "positive integer"),
    ("n_fft", True, "positive integer"),
    ("hop_length", -160, "positive integer"),
    ("n_mels", "40", "positive integer"),
    ("win_length", 4096, "must not exceed n_fft=2048"),
    # sizes a hostile bundle could use to make the reader allocate gigabytes
    ("sample_rate", 10**9, "at most 384000 Hz"),
    ("clip_samples", 10**12, "at most 60 s"),
    ("n_fft", 1 << 30, "must not exceed the clip length"),
    ("hop_length", 10**6, "must not exceed the clip length"),
    ("n_mels", 100_000, "must not exceed the 1025 frequency bins"),
    ("fmin", -1.0, r"must be in \[0, 8000.0\)"),
    ("fmin", float("nan"), r"must be in \[0, 8000.0\)"),
    ("fmax", 9000.0, r"must be in \(fmin, 8000.0\]"),
    ("fmax", 0.0, r"must be in \(fmin, 8000.0\] Hz or None"),
    ("center", 1, "true or false"),
    ("pad_mode", "edge", "'constant' or 'reflect'"),
    ("power", 0, "positive number"),
    ("mel_norm", "l2", "'slaney' or None"),
    ("htk", "yes", "true or false"),
    ("ref", "mean", "'max' or a positive number"),
    ("ref", -1.0, "'max' or a positive number"),
    ("amin", 0.0, "positive number"),
    ("top_db", -3.0, "non-negative number or None"),
    ("top_db", float("inf"), "non-negative number or None"),
    ("window", "hamming", "only 'hann'"),
]


@pytest.mark.parametrize("field, value, message", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(SpecError, match=rf"FeatureSpec\.{field}=.*{message}"):
        FeatureSpec(**{field: value})
    data = FeatureSpec().to_dict()
    data[field] = value
    with pytest.raises(SpecError, match=field):
        FeatureSpec.from_dict(data)


def test_clip_shorter_than_a_frame_without_centering_is_refused():
    with pytest.raises(SpecError, match="clip_samples.*shorter than n_fft=2048"):
        FeatureSpec(center=False, clip_samples=1000)


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FeatureSpec().n_mels = 64

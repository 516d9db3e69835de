"""eSpeak NG synthesis: real engine, real worker processes, small outputs."""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from kws_train import dataset as ds
from kws_train import synth

WORDS = ["yes", "marvin", "backward"]
PER_WORD = 24  # 72 clips: two fixed batches, so the job count changes who renders what


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory, real_data):
    out = tmp_path_factory.mktemp("synth") / "data"
    report = synth.synthesize_dataset(out, words=WORDS, per_word=PER_WORD, seed=7, noise=real_data, jobs=2, progress=False)
    assert report.clips == len(WORDS) * PER_WORD
    return out


def wav_files(root: Path) -> list:
    """The spoken clips (the dataset's `_background_noise_/` aside)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.wav") if p.parent.name != "_background_noise_")


def test_dataset_carries_the_given_noise(synth_root, real_data):
    given = sorted(p.name for p in (real_data / "_background_noise_").glob("*.wav"))
    assert sorted(p.name for p in (synth_root / "_background_noise_").iterdir()) == given


def test_without_noise_it_generates_white_and_pink_noise(tmp_path):
    out = tmp_path / "syn"
    synth.synthesize_dataset(out, words=["go"], per_word=1, seed=3, jobs=1, progress=False)
    noise = {p.name: soundfile.read(str(p))[0] for p in (out / "_background_noise_").iterdir()}
    assert sorted(noise) == ["pink_noise.wav", "white_noise.wav"]
    for audio in noise.values():
        assert len(audio) == 60 * 16000 and 0.05 < np.sqrt(np.mean(audio**2)) < 0.2
    # pink noise has more power below 500 Hz than above 4 kHz; white noise has it spread evenly
    def low_high(audio):
        power = np.abs(np.fft.rfft(audio)) ** 2
        hz = np.fft.rfftfreq(len(audio), 1 / 16000)
        return power[(hz > 20) & (hz < 500)].mean() / power[hz > 4000].mean()
    assert low_high(noise["pink_noise.wav"]) > 10 * low_high(noise["white_noise.wav"])


def test_clips_are_one_second_16k_mono_pcm_and_not_silent(synth_root):
    files = wav_files(synth_root)
    assert len(files) == len(WORDS) * PER_WORD
    for rel in files:
        info = soundfile.info(str(synth_root / rel))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16")
        audio, _ = soundfile.read(str(synth_root / rel), dtype="float32")
        peak = np.abs(audio).max()
        assert 0.05 < peak <= 1.0
        # The word stands out of the background: loudest 100 ms well above the quietest.
        frames = np.sqrt(np.mean(audio.reshape(10, 1600) ** 2, axis=1))
        assert frames.max() > 2 * frames.min()


def test_layout_labels_and_lists_are_consistent(synth_root):
    assert sorted(p.name for p in synth_root.iterdir() if p.is_dir()) == sorted(WORDS + ["_background_noise_"])
    with open(synth_root / "speakers.csv", newline="") as f:
        speakers = {row["speaker"]: row for row in csv.DictReader(f)}
    listed = {}
    for name in ("validation", "testing"):
        for rel in ds.read_list(synth_root / f"{name}_list.txt"):
            assert (synth_root / rel).is_file()
            listed[rel] = name
    clips = ds.index_dataset(synth_root)
    assert len(clips) == len(WORDS) * PER_WORD
    per_speaker = collections.defaultdict(set)
    for clip in clips:
        assert clip.word == clip.path.parent.name
        assert clip.path.name.startswith(f"{clip.speaker}_nohash_")
        assert clip.split == listed.get(clip.path.relative_to(synth_root).as_posix(), "training")
        # Lists and the hash rule agree, and speakers.csv says the same.
        assert clip.split == ds.which_set(clip.path.name) == speakers[clip.speaker]["split"]
        per_speaker[clip.speaker].add(clip.split)
    assert all(len(s) == 1 for s in per_speaker.values())
    assert set(per_speaker) == set(speakers)
    for row in speakers.values():
        assert synth.SynthSpeaker(row["voice"], row["variant"]).speaker_id == row["speaker"]
    recipe = json.loads((synth_root / "synth.json").read_text())
    assert recipe["seed"] == 7 and recipe["words"] == WORDS and recipe["clips"] == len(clips)
    assert len(recipe["noise_files"]) == 6


def test_same_seed_same_bytes_whatever_the_job_count(synth_root, tmp_path, real_data):
    again = synth.synthesize_dataset(
        tmp_path / "again", words=WORDS, per_word=PER_WORD, seed=7, noise=real_data, jobs=1, progress=False
    ).out
    assert wav_files(again) == wav_files(synth_root)
    for rel in wav_files(again):
        assert (again / rel).read_bytes() == (synth_root / rel).read_bytes(), rel
    for name in ("validation_list.txt", "testing_list.txt", "speakers.csv"):
        assert (again / name).read_text() == (synth_root / name).read_text()

    other = synth.synthesize_dataset(
        tmp_path / "other", words=WORDS, per_word=PER_WORD, seed=8, noise=real_data, jobs=2, progress=False
    ).out
    assert wav_files(other) != wav_files(synth_root) or any(
        (other / rel).read_bytes() != (synth_root / rel).read_bytes() for rel in wav_files(other)
    )


def test_speakers_are_many_distinct_voices():
    speakers = synth.synthetic_speakers()
    assert len(speakers) == len(synth.VOICES) * len(synth.VARIANTS) >= 200
    assert len({s.speaker_id for s in speakers}) == len(speakers)
    assert all(len(s.speaker_id) == 8 and "_" not in s.speaker_id for s in speakers)
    # Different voices really sound different.
    a = synth.synthesize_word("seven", synth.SynthSpeaker("en-US", "m1"))
    b = synth.synthesize_word("seven", synth.SynthSpeaker("en-GB-scotland", "f3"))
    assert a.dtype == np.float32 and 0.1 * 16000 < len(a) <= 16000 and np.abs(a).max() > 0.05
    assert len(a) != len(b) or not np.allclose(a, b)


def test_unknown_voice_is_refused():
    with pytest.raises(synth.SynthError, match="no voice 'xx-nowhere"):
        synth.synthesize_word("yes", synth.SynthSpeaker("xx-nowhere", "m1"))


def test_bad_arguments_and_busy_output(tmp_path, synth_root):
    with pytest.raises(synth.SynthError, match="use letters"):
        synth.synthesize_dataset(tmp_path / "a", words=["two words"], per_word=1, progress=False)
    with pytest.raises(synth.SynthError, match="at least 1"):
        synth.synthesize_dataset(tmp_path / "a", words=["yes"], per_word=0, progress=False)
    with pytest.raises(synth.SynthError, match="not empty"):
        synth.synthesize_dataset(synth_root, words=["yes"], per_word=1, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(synth.SynthError, match="not a synthetic dataset"):
        synth.synthesize_dataset(mine, words=["yes"], per_word=1, overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(synth.SynthError, match="no audio files"):
        synth.synthesize_dataset(tmp_path / "b", words=["yes"], per_word=1, noise=mine, progress=False)
    with pytest.raises(synth.SynthError, match="no such folder"):
        synth.synthesize_dataset(tmp_path / "b", words=["yes"], per_word=1, noise=tmp_path / "nothing", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_overwrite_replaces_a_synthetic_dataset(tmp_path):
    out = tmp_path / "syn"
    synth.synthesize_dataset(out, words=["go"], per_word=2, seed=1, jobs=1, progress=False)
    synth.synthesize_dataset(out, words=["up"], per_word=1, seed=1, jobs=1, overwrite=True, progress=False)
    assert [Path(p).parent.name for p in wav_files(out)] == ["up"]
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no staging folders left behind

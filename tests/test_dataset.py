"""Dataset index, splits and tasks, on the real Speech Commands sample and on small folders."""

from __future__ import annotations

import collections
import csv
import dataclasses
import math

import numpy as np
import pytest
import soundfile

from kws_runtime.audio import read_audio
from kws_train import dataset as ds
from kws_train.recipe import RunRecipe, SplitRule

# The part of the real sample that came from the official v0.02 test archive.
TEST_ARCHIVE_SOURCE = "thegtagamer/PICO-tinyML-benchmark"


@pytest.fixture(scope="module")
def real_clips(real_data):
    return ds.index_dataset(real_data)


def write_wav(path, seconds=1.0, rate=16000, channels=1, value=0.1, freq=440.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    audio = (value * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels > 1:
        audio = np.stack([audio] * channels, axis=1)
    soundfile.write(str(path), audio, rate, subtype="PCM_16")
    return path


def make_root(tmp_path, files):
    root = tmp_path / "root"
    for rel in files:
        write_wav(root / rel)
    return root


# --- splits -------------------------------------------------------------------------------


def test_official_test_set_clips_fall_in_testing_by_the_hash_rule(real_data, real_clips):
    with open(real_data / "manifest.csv", newline="") as f:
        official = {
            row["file"] for row in csv.DictReader(f) if row["repo"] == TEST_ARCHIVE_SOURCE and row["word"] in ds.COMMANDS
        }
    assert len(official) > 2000  # the ten command words, ~250 clips each
    by_rel = {c.path.relative_to(real_data).as_posix(): c for c in real_clips}
    assert official <= set(by_rel)
    splits = collections.Counter(by_rel[rel].split for rel in official)
    assert splits == {"testing": len(official)}
    assert all(ds.which_set(rel) == "testing" for rel in official)


def test_no_speaker_in_two_splits(real_clips):
    splits = collections.defaultdict(set)
    for clip in real_clips:
        if clip.word != ds.SILENCE:
            splits[clip.speaker].add(clip.split)
    assert len(splits) == 206
    assert all(len(s) == 1 for s in splits.values())
    assert {c.split for c in real_clips} == set(ds.SPLITS)  # the non-test clips spread out


def test_which_set_depends_on_the_speaker_only():
    names = [f"{spk}_nohash_{n}.wav" for spk in ("0a7c2a8d", "3bfd30e6", "c50f55b8", "ffd2ba2f") for n in range(5)]
    for name in names:
        speaker_split = ds.which_set(name.split("_nohash_")[0] + "_nohash_0.wav")
        assert ds.which_set(name) == speaker_split
        assert ds.which_set(f"some/folder/{name}") == speaker_split
    # Percentages move the boundaries: everything is validation at 100 %.
    assert {ds.which_set(n, 1.0, 0.0) for n in names} == {"validation"}
    assert {ds.which_set(n, 0.0, 0.0) for n in names} == {"training"}


def test_speaker_of():
    assert ds.speaker_of("yes/0a7c2a8d_nohash_3.wav") == "0a7c2a8d"
    assert ds.speaker_of("_unknown_/backward_0c540988_nohash_0.wav") == "0c540988"
    assert ds.speaker_of("_silence_/1037.wav") == "1037"


def test_official_lists_decide_the_split(tmp_path):
    root = make_root(tmp_path, ["yes/aaaa0001_nohash_0.wav", "yes/bbbb0002_nohash_0.wav", "no/cccc0003_nohash_0.wav"])
    (root / "validation_list.txt").write_text("yes/aaaa0001_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/cccc0003_nohash_0.wav\n\n")
    clips = {c.path.name: c for c in ds.index_dataset(root)}
    assert clips["aaaa0001_nohash_0.wav"].split == "validation"
    assert clips["cccc0003_nohash_0.wav"].split == "testing"
    assert clips["bbbb0002_nohash_0.wav"].split == "training"
    assert clips["cccc0003_nohash_0.wav"].word == "no"


def test_one_list_without_the_other_is_an_error(tmp_path):
    root = make_root(tmp_path, ["yes/aaaa0001_nohash_0.wav"])
    (root / "testing_list.txt").write_text("yes/aaaa0001_nohash_0.wav\n")
    with pytest.raises(ds.DatasetError, match="no validation_list.txt"):
        ds.index_dataset(root)


def test_bad_roots_are_clear_errors(tmp_path):
    with pytest.raises(ds.DatasetError, match="no such folder"):
        ds.index_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.DatasetError, match="no clips found"):
        ds.index_dataset(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ds.DatasetError, match="not a folder"):
        ds.index_dataset(tmp_path / "file.txt")


def test_test_archive_layout_loads_as_an_evaluation_set(tmp_path):
    root = make_root(
        tmp_path,
        ["yes/aaaa0001_nohash_0.wav", "stop/bbbb0002_nohash_1.wav", "_unknown_/bed_cccc0003_nohash_0.wav",
         "_unknown_/wow_dddd0004_nohash_0.wav", "_silence_/1037.wav"],
    )  # fmt: skip
    clips = ds.index_dataset(root)
    unknown = [c for c in clips if c.word == ds.UNKNOWN]
    assert [c.speaker for c in unknown] == ["cccc0003", "dddd0004"]
    assert all(c.split == "testing" for c in clips if c.word in (ds.UNKNOWN, ds.SILENCE))

    test_clips = ds.split_by_speaker(clips, 0.0, 1.0)  # everything in testing, as the archive means
    task = ds.build_task(test_clips, "12", "testing")  # no root: nothing has to be drawn
    assert task.counts() == {**{label: 0 for label in ds.LABELS_12}, "_silence_": 1, "_unknown_": 2, "yes": 1, "stop": 1}
    silence = next(e for e in task.examples if e.label == ds.SILENCE)
    audio = ds.load_example(silence)
    assert audio.shape == (16000,) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, read_audio(silence.path), atol=1e-6)


# --- speaker re-split ---------------------------------------------------------------------


def test_split_by_speaker_is_deterministic_and_keeps_speakers_together(real_clips):
    a = ds.split_by_speaker(real_clips, 0.15, 0.15, salt="exp1")
    assert a == ds.split_by_speaker(real_clips, 0.15, 0.15, salt="exp1")
    per_speaker = collections.defaultdict(set)
    for clip in a:
        per_speaker[clip.speaker].add(clip.split)
    assert all(len(s) == 1 for s in per_speaker.values())
    share = collections.Counter(next(iter(s)) for s in per_speaker.values())
    n = len(per_speaker)
    assert 0.07 * n <= share["validation"] <= 0.25 * n
    assert 0.07 * n <= share["testing"] <= 0.25 * n
    b = ds.split_by_speaker(real_clips, 0.15, 0.15, salt="exp2")
    assert [c.split for c in a] != [c.split for c in b]
    assert [c.path for c in a] == [c.path for c in real_clips]


def test_split_by_speaker_rejects_impossible_fractions(real_clips):
    with pytest.raises(ds.DatasetError, match="fractions"):
        ds.split_by_speaker(real_clips, 0.6, 0.5)
    with pytest.raises(ds.DatasetError, match="fractions"):
        ds.split_by_speaker(real_clips, -0.1, 0.1)


# --- tasks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resplit(real_clips):
    # Without the sample's ready-made 1 s silence clips, so silence has to be drawn.
    words = [c for c in real_clips if c.word != ds.SILENCE]
    return ds.split_by_speaker(words, 0.1, 0.1, salt="tasks")


def test_twelve_class_task_draws_unknown_and_silence(real_data, resplit):
    task = ds.build_task(resplit, "12", "training", root=real_data, silence_share=0.1, unknown_share=0.15, seed=3)
    assert task.labels == ds.LABELS_12
    counts = task.counts()
    n_targets = sum(counts[w] for w in ds.COMMANDS)
    expected_targets = sum(1 for c in resplit if c.split == "training" and c.word in ds.COMMANDS)
    assert n_targets == expected_targets > 0
    assert counts["_unknown_"] == math.ceil(n_targets * 0.15)
    assert counts["_silence_"] == math.ceil(n_targets * 0.10)
    train_paths = {c.path for c in resplit if c.split == "training"}
    for example in task.examples:
        if example.label == ds.SILENCE:
            assert example.path.parent.name == ds.BACKGROUND_NOISE
            assert 0.0 <= example.gain < 1.0
        else:
            assert example.path in train_paths  # nothing leaks in from other splits
        if example.label == ds.UNKNOWN:
            assert example.path.parent.name not in ds.COMMANDS

    again = ds.build_task(resplit, "12", "training", root=real_data, silence_share=0.1, unknown_share=0.15, seed=3)
    assert again.examples == task.examples
    other = ds.build_task(resplit, "12", "training", root=real_data, silence_share=0.1, unknown_share=0.15, seed=4)
    assert other.examples != task.examples


def test_a_per_word_draw_takes_as_many_clips_of_each_other_word(real_data, resplit):
    def unknown_words(draw, share):
        task = ds.build_task(resplit, "12", "training", root=real_data, unknown_share=share, seed=3, unknown_draw=draw)
        return collections.Counter(e.path.parent.name for e in task.examples if e.label == ds.UNKNOWN)

    pool = collections.Counter(c.word for c in resplit if c.split == "training" and c.word not in ds.COMMANDS)
    for share in (0.15, 1.0):
        drawn = unknown_words("per-word", share)
        assert set(drawn) == set(pool)  # every other word is heard, however few clips it has
        assert max(drawn.values()) - min(drawn.values()) <= 1
        assert sum(drawn.values()) == sum(unknown_words("random", share).values())
    # a word with fewer clips than its quota has each of them repeated
    assert min(pool.values()) < max(drawn.values())
    assert unknown_words("random", 1.0) == pool


def test_a_recipe_composes_a_run_split_by_split(real_data, tmp_path):
    recipe = RunRecipe(split=SplitRule("speaker", "tasks", 0.1, 0.1), seed=5)
    splits = {s: recipe.task_split(real_data, s) for s in ds.SPLITS}
    clips = ds.split_by_speaker(ds.index_dataset(real_data), 0.1, 0.1, "tasks")
    for name, task in splits.items():
        # the same as composing it by hand with the split's own seed: the run's for training,
        # the default's for the splits every run is scored on
        seed = (5 if name == "training" else RunRecipe().seed) + ds.SPLIT_SEED_OFFSET[name]
        by_hand = ds.build_task(clips, "12", name, root=real_data, seed=seed)
        assert task.examples == by_hand.examples and task.examples
        indexed_once = recipe.task_split(real_data, name, clips=ds.index_dataset(real_data))
        assert indexed_once.examples == task.examples
    speakers = [{e.speaker for e in t.examples if e.label != ds.SILENCE} for t in splits.values()]
    assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])

    extra = tmp_path / "extra"
    (extra / "yes").mkdir(parents=True)
    wav = next((real_data / "yes").glob("*.wav"))
    (extra / "yes" / "synth0001_nohash_0.wav").write_bytes(wav.read_bytes())
    with_extra = dataclasses.replace(recipe, extra_training=[extra])
    with_extra = {s: with_extra.task_split(real_data, s) for s in ds.SPLITS}
    added = [e for e in with_extra["training"].examples if e.path.parent.parent == extra]
    assert len(added) == 1 and added[0].label == "yes"
    assert with_extra["validation"].examples == splits["validation"].examples
    assert with_extra["testing"].examples == splits["testing"].examples
    with pytest.raises(ds.DatasetError, match="unknown split"):
        recipe.task_split(real_data, "train")


def test_partial_word_examples_are_moved_command_clips_labelled_unknown(real_data, resplit):
    plain = ds.build_task(resplit, "12", "training", root=real_data, seed=3)
    task = ds.build_task(resplit, "12", "training", root=real_data, seed=3, partial_share=0.25)
    assert task.examples[: len(plain.examples)] == plain.examples  # the other draws do not move
    partial = task.examples[len(plain.examples):]
    n_targets = sum(1 for e in plain.examples if e.label in ds.COMMANDS)
    assert len(partial) == math.ceil(0.25 * n_targets)
    assert len({e.path for e in partial}) == len(partial)
    low, high = (ms * 16 for ms in ds.PARTIAL_OFFSET_MS)
    for e in partial:
        assert e.label == ds.UNKNOWN and e.path.parent.name in ds.COMMANDS and low <= abs(e.offset) <= high
    assert {e.offset > 0 for e in partial} == {True, False}  # words slide in and out
    example = partial[0]
    whole = ds.load_example(dataclasses.replace(example, offset=0))
    moved = ds.load_example(example)
    if example.offset > 0:
        assert np.array_equal(moved[example.offset:], whole[: -example.offset]) and not moved[: example.offset].any()
    else:
        assert np.array_equal(moved[: example.offset], whole[-example.offset:]) and not moved[example.offset:].any()


def test_partial_words_join_the_training_split_only(real_data):
    recipe = RunRecipe(split=SplitRule("speaker", "tasks", 0.1, 0.1), seed=5)
    partial = dataclasses.replace(recipe, partial_share=0.1)
    assert RunRecipe.from_dict(partial.to_dict()) == partial
    for split in ds.SPLITS:
        added = len(partial.task_split(real_data, split).examples) - len(recipe.task_split(real_data, split).examples)
        assert (added > 0) == (split == "training"), split


def test_given_silence_clips_are_kept_and_none_drawn(real_data, real_clips):
    clips = ds.split_by_speaker(real_clips, 0.1, 0.1, salt="tasks")
    task = ds.build_task(clips, "12", "training", root=real_data, silence_share=0.5)
    silence = [e for e in task.examples if e.label == ds.SILENCE]
    expected = sorted(c.path for c in clips if c.split == "training" and c.word == ds.SILENCE)
    assert sorted(e.path for e in silence) == expected and expected
    assert all(e.start == 0 and e.gain == 1.0 for e in silence)


def test_silence_example_is_a_scaled_window_of_background_noise(real_data, resplit):
    task = ds.build_task(resplit, "12", "validation", root=real_data, seed=0)
    silence = [e for e in task.examples if e.label == ds.SILENCE]
    assert silence
    for example in silence[:3]:
        noise = read_audio(example.path, max_seconds=600)
        assert 0 <= example.start <= len(noise) - 16000
        audio = ds.load_example(example)
        assert audio.shape == (16000,) and audio.dtype == np.float32
        np.testing.assert_allclose(audio, noise[example.start : example.start + 16000] * example.gain, atol=1e-6)


def test_word_examples_load_as_fixed_length_clips(resplit, real_data):
    task = ds.build_task(resplit, "12", "testing", root=real_data, seed=0)
    example = next(e for e in task.examples if e.label == "yes")
    audio = ds.load_example(example)
    assert audio.shape == (16000,) and audio.dtype == np.float32 and np.abs(audio).max() > 0.01
    assert task.label_index(example) == ds.LABELS_12.index("yes")


def test_thirty_five_class_task_uses_every_word(resplit):
    task = ds.build_task(resplit, "35", "training")
    assert len(task.labels) == 35 and set(task.labels) == set(ds.LABELS_35)
    assert len(task.examples) == sum(1 for c in resplit if c.split == "training" and c.word in ds.LABELS_35)
    assert {e.label for e in task.examples} <= set(ds.LABELS_35)
    assert ds.SILENCE not in task.counts() and ds.UNKNOWN not in task.counts()


def test_silence_without_background_noise_is_a_clear_error(tmp_path, resplit):
    with pytest.raises(ds.DatasetError, match="background noise"):
        ds.build_task(resplit, "12", "training", root=tmp_path)
    # Asking for no silence needs no noise.
    task = ds.build_task(resplit, "12", "training", root=None, silence_share=0)
    assert task.counts()["_silence_"] == 0


def test_bad_task_arguments(resplit):
    with pytest.raises(ds.DatasetError, match="unknown task"):
        ds.build_task(resplit, "10")
    with pytest.raises(ds.DatasetError, match="unknown split"):
        ds.build_task(resplit, "12", "train")
    with pytest.raises(ds.DatasetError, match="unknown_share"):
        ds.build_task(resplit, "12", unknown_share=-0.05)
    with pytest.raises(ds.DatasetError, match="unknown_draw 'even'"):
        ds.build_task(resplit, "12", unknown_draw="even")


def test_background_noise_is_read_at_16k(real_data):
    noise = ds.background_noise(real_data)
    assert len(noise) == 6
    assert all(a.dtype == np.float32 and a.ndim == 1 and len(a) > 60 * 16000 - 1 for a in noise)


# --- stats --------------------------------------------------------------------------------


def test_describe_dataset_counts_the_real_sample(real_data, real_clips):
    report = ds.describe_dataset(real_data)
    assert report["clips"] == len(real_clips)
    assert sum(report["splits"].values()) == len(real_clips)
    assert report["words"]["yes"]["testing"] == sum(1 for c in real_clips if c.word == "yes" and c.split == "testing")
    assert report["speakers"]["total"] == 206
    assert report["sample_rates"] == {"16000": len(real_clips)}
    assert len(report["background_noise"]) == 6
    assert report["problems"] == []


def test_describe_dataset_finds_problems(tmp_path):
    root = tmp_path / "root"
    write_wav(root / "yes/aaaa0001_nohash_0.wav")
    write_wav(root / "yes/aaaa0001_nohash_1.wav")
    write_wav(root / "no/bbbb0002_nohash_0.wav", rate=8000)
    write_wav(root / "no/cccc0003_nohash_0.wav", seconds=2.0)
    write_wav(root / "up/dddd0004_nohash_0.wav", channels=2)
    write_wav(root / "up/eeee0005_nohash_0.wav", value=0.0)
    write_wav(root / "up/no-speaker.wav")
    (root / "go").mkdir()
    (root / "go/ffff0006_nohash_0.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (root / "validation_list.txt").write_text("yes/aaaa0001_nohash_0.wav\ngo/missing_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("")
    report = ds.describe_dataset(root)
    problems = {(p["path"], p["problem"].split(":")[0].split(" ")[0]) for p in report["problems"]}
    text = "\n".join(f"{p['path']}: {p['problem']}" for p in report["problems"])
    assert "no/bbbb0002_nohash_0.wav: sample rate 8000 Hz" in text
    assert "no/cccc0003_nohash_0.wav: 2.000 s long" in text
    assert "up/dddd0004_nohash_0.wav: 2 channels" in text
    assert "up/eeee0005_nohash_0.wav: digital silence" in text
    assert "up/no-speaker.wav: name has no _nohash_" in text
    assert ("go/ffff0006_nohash_0.wav", "unreadable") in problems
    assert "go/missing_nohash_0.wav: in validation_list.txt but the file does not exist" in text
    assert "aaaa0001: speaker appears in several splits: training, validation" in text
    assert report["split_source"].startswith("validation_list.txt")

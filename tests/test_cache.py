"""The decoded-audio cache and the batch loader over it."""

import dataclasses
import os
import threading

import numpy as np
import pytest
import soundfile
import torch

from kws_runtime.features import log_mel
from kws_runtime.spec import FeatureSpec
from kws_train.cache import BatchLoader, CacheError, balanced_weights, build_cache, fingerprint, open_cache
from kws_train.dataset import Example, build_task, index_dataset, load_example, split_by_speaker
from kws_train.frontend import LogMel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPEC = FeatureSpec()
LABELS = ("yes", "no", "up")
COUNTS = {"yes": 12, "no": 4, "up": 2}


def tagged_dataset(root):
    """18 one-second 16-bit clips; clip ``i`` holds the constant sample value ``i + 1``, so
    a row of the cache tells which example it came from."""
    examples = []
    i = 0
    for word, count in COUNTS.items():
        (root / word).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            path = root / word / f"spk{n % 3}_nohash_{n}.wav"
            soundfile.write(path, np.full(16000, i + 1, dtype=np.int16), 16000, subtype="PCM_16")
            examples.append(Example(path, word, f"spk{n % 3}"))
            i += 1
    return examples


def tag_of(audio):
    """Which example a float batch row came from."""
    return np.rint(audio[:, 0] * 32768).astype(int) - 1


def test_cache_holds_exactly_what_load_example_returns(real_data, tmp_path):
    clips = split_by_speaker(index_dataset(real_data), 0.1, 0.1, salt="cache")
    clips = [c for c in clips if c.word != "_silence_"]  # so silence is cut from the noise recordings
    task = build_task(clips, "12", "validation", root=real_data, silence_share=0.1, seed=1)
    words = [e for e in task.examples if e.label != "_silence_"][:40]
    silence = [e for e in task.examples if e.label == "_silence_"][:8]
    assert silence and all(e.start > 0 or e.gain != 1.0 for e in silence)
    examples = words + silence
    cached = build_cache(examples, tmp_path, "validation", labels=task.labels, workers=2)
    assert cached.audio.shape == (len(examples), SPEC.clip_samples) and cached.audio.dtype == np.int16
    assert [cached.labels[t] for t in cached.targets] == [e.label for e in examples]
    decoded = np.stack([load_example(e, SPEC) for e in examples])
    got = cached.waveforms(np.arange(len(examples)))
    np.testing.assert_array_equal(got[: len(words)], decoded[: len(words)])  # 16-bit sources: lossless
    assert np.abs(got - decoded).max() <= 0.5 / 32768 + 1e-9  # scaled silence windows: rounded to 16 bits
    feats = LogMel(SPEC).to(DEVICE)(torch.from_numpy(got[: len(words)]).to(DEVICE)).cpu().numpy()
    assert np.abs(feats - log_mel(decoded[: len(words)], SPEC)).max() <= (1e-3 if DEVICE.type == "cpu" else 3e-3)


def test_reused_until_the_data_change(tmp_path):
    examples = tagged_dataset(tmp_path / "data")
    first = build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    np.testing.assert_array_equal(tag_of(first.waveforms(range(len(first)))), np.arange(len(examples)))
    stamp = os.stat(first.path / "audio.npy").st_mtime_ns
    again = build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    assert again.path == first.path and os.stat(again.path / "audio.npy").st_mtime_ns == stamp

    base = fingerprint(examples, SPEC, LABELS)
    assert fingerprint(examples, SPEC, LABELS[::-1]) != base
    assert fingerprint(examples, dataclasses.replace(SPEC, clip_samples=8000), LABELS) != base
    assert fingerprint(examples[:-1], SPEC, LABELS) != base
    assert fingerprint([dataclasses.replace(examples[0], gain=0.5)] + examples[1:], SPEC, LABELS) != base
    assert fingerprint([dataclasses.replace(examples[0], label="no")] + examples[1:], SPEC, LABELS) != base
    assert fingerprint([dataclasses.replace(examples[0], offset=160)] + examples[1:], SPEC, LABELS) != base

    # re-record one clip: new content, new mtime -> a new cache with the new audio
    soundfile.write(examples[3].path, np.full(16000, 999, dtype=np.int16), 16000, subtype="PCM_16")
    st = os.stat(examples[3].path)
    os.utime(examples[3].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    assert changed.path != first.path and changed.fingerprint != first.fingerprint
    assert tag_of(changed.waveforms([3]))[0] == 998
    assert open_cache(first.path).fingerprint == first.fingerprint  # the old one is left intact


def test_a_bad_clip_leaves_no_cache_behind(tmp_path):
    examples = tagged_dataset(tmp_path / "data")
    examples[5].path.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(CacheError, match=examples[5].path.name):
        build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    assert list((tmp_path / "cache").iterdir()) == []
    examples[6].path.unlink()
    with pytest.raises(CacheError, match=examples[6].path.name):
        build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    with pytest.raises(CacheError, match="not in labels"):
        build_cache(examples[:3], tmp_path / "cache", "training", labels=("no",))
    with pytest.raises(CacheError, match="cache name"):
        build_cache(examples[:3], tmp_path / "cache", "../escape", labels=LABELS)


def test_a_damaged_cache_is_refused_and_rebuilt(tmp_path):
    examples = tagged_dataset(tmp_path / "data")
    cached = build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    path = cached.path
    del cached
    with open(path / "audio.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CacheError, match="delete it to rebuild"):
        open_cache(path)
    rebuilt = build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    assert rebuilt.path == path
    np.testing.assert_array_equal(tag_of(rebuilt.waveforms(range(len(rebuilt)))), np.arange(len(examples)))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]


@pytest.fixture()
def cached(tmp_path):
    return build_cache(tagged_dataset(tmp_path / "data"), tmp_path / "cache", "training", labels=LABELS)


def drain(loader):
    tags, targets = [], []
    for audio, target in loader:
        assert audio.device.type == DEVICE.type and audio.dtype == torch.float32
        assert target.device.type == DEVICE.type and target.dtype == torch.int64
        tags.append(tag_of(audio.cpu().numpy()))
        targets.append(target.cpu().numpy())
    return tags, targets


def test_batches_are_aligned_shuffled_by_seed_and_epoch(cached):
    truth = cached.targets
    loader = BatchLoader(cached, 5, shuffle=True, seed=3, device=DEVICE)
    assert len(loader) == 4
    tags, targets = drain(loader)
    assert [len(t) for t in tags] == [5, 5, 5, 3]
    for t, y in zip(tags, targets):
        np.testing.assert_array_equal(truth[t], y)  # each row arrives with its own label
    flat = np.concatenate(tags)
    assert sorted(flat) == list(range(len(cached)))
    assert not np.array_equal(np.sort(flat), flat)
    again, _ = drain(BatchLoader(cached, 5, shuffle=True, seed=3, device=DEVICE, prefetch=0))
    assert all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(tags, again))
    loader.set_epoch(1)
    other, _ = drain(loader)
    assert not all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(tags, other))
    plain, _ = drain(BatchLoader(cached, 5, drop_last=True, device=DEVICE))
    assert [len(t) for t in plain] == [5, 5, 5] and list(np.concatenate(plain)) == list(range(15))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_rows_travel_with_their_examples(cached, prefetch):
    rows = np.stack([np.arange(len(cached)), -np.arange(len(cached))], axis=1) * 0.5
    loader = BatchLoader(cached, 4, shuffle=True, seed=1, device=DEVICE, prefetch=prefetch, rows=rows)
    seen = []
    for audio, target, row in loader:
        assert row.device.type == DEVICE.type and row.dtype == torch.float32 and row.shape == (len(target), 2)
        np.testing.assert_array_equal(row.cpu().numpy(), rows[tag_of(audio.cpu().numpy())])
        seen += list(row[:, 0].cpu().numpy())
    assert sorted(seen) == list(np.arange(len(cached)) * 0.5)
    with pytest.raises(ValueError, match="one entry per example"):
        BatchLoader(cached, 4, rows=rows[:-1])


def test_balanced_sampling_evens_out_the_classes(cached):
    counts = cached.counts()
    assert list(counts) == [12, 4, 2]
    weights = balanced_weights(cached.targets)
    np.testing.assert_allclose(np.bincount(cached.targets, weights=weights), [1.0, 1.0, 1.0])
    loader = BatchLoader(cached, 100, sample_weights="balanced", num_samples=1500, seed=0, device=DEVICE)
    assert len(loader) == 15
    _, targets = drain(loader)
    drawn = np.bincount(np.concatenate(targets), minlength=3) / 1500
    assert np.all(np.abs(drawn - 1 / 3) < 0.05)
    with pytest.raises(ValueError, match="sample_weights"):
        BatchLoader(cached, 4, sample_weights=np.ones(3))


def test_distributed_shares_cover_the_epoch_once(cached):
    shares = [BatchLoader(cached, 4, shuffle=True, seed=11, rank=r, world_size=4).indices() for r in range(4)]
    assert {len(s) for s in shares} == {5}  # 18 padded to 20
    union = np.concatenate(shares)
    assert set(union) == set(range(len(cached))) and len(union) == 20
    tags, _ = drain(BatchLoader(cached, 4, shuffle=True, seed=11, rank=2, world_size=4, device=DEVICE))
    assert sorted(np.concatenate(tags)) == sorted(shares[2])


def test_stopping_early_ends_the_background_thread(cached):
    before = threading.active_count()
    for _ in BatchLoader(cached, 2, shuffle=True, prefetch=2, device=DEVICE):
        break
    assert threading.active_count() == before


def test_a_builder_that_finishes_second_keeps_the_first_cache(tmp_path, monkeypatch):
    """Runs started together each build the same cache: the one finishing second must use
    the first one's folder, not swap its own in while others already read the first."""
    import kws_train.cache as cache_module

    examples = tagged_dataset(tmp_path / "data")
    decoded, release = threading.Event(), threading.Event()
    real_decode = cache_module._decode_all

    def decode_then_wait_in_the_second_builder(*args, **kwargs):
        real_decode(*args, **kwargs)
        if threading.current_thread().name == "second":
            decoded.set()
            assert release.wait(30)

    monkeypatch.setattr(cache_module, "_decode_all", decode_then_wait_in_the_second_builder)
    results = {}
    second = threading.Thread(name="second", target=lambda: results.update(
        second=build_cache(examples, tmp_path / "cache", "training", labels=LABELS)))
    second.start()
    assert decoded.wait(30)
    first = build_cache(examples, tmp_path / "cache", "training", labels=LABELS)
    inode = os.stat(first.path).st_ino
    release.set()
    second.join(30)
    assert results["second"].path == first.path
    assert os.stat(first.path).st_ino == inode, "the second builder replaced the first one's cache"
    np.testing.assert_array_equal(tag_of(first.waveforms(range(len(first)))), np.arange(len(examples)))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.path.name]

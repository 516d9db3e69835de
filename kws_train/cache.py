"""Decode a dataset split once into an int16 array on disk, then feed raw-audio batches.

`build_cache` decodes every example with `kws_train.dataset.load_example` into
``<cache_dir>/<name>-<fingerprint>/audio.npy`` (int16, ``(examples, clip_samples)``, read
back memory-mapped) plus ``targets.npy`` and ``meta.json``. The fingerprint covers every
example (path, size, mtime, label, start, gain), the label order and the sample rate and
clip length, so a change to the data makes a new cache instead of silently reusing an old
one. `BatchLoader` turns a cache into batches of float32 waveforms on the device; the
features and augmentation then run there on whole batches (`kws_train.frontend`).

Int16 is lossless for 16-bit recordings (``load_example`` returns ``int / 32768``); other
sources (24-bit, resampled, silence windows scaled by a gain) are rounded to 16 bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from kws_runtime.spec import FeatureSpec
from kws_runtime.files import make_shareable

from .dataset import Example, TaskSplit, load_example

__all__ = [
    "CACHE_VERSION", "CacheError", "CachedSplit", "BatchLoader",
    "fingerprint", "build_cache", "open_cache", "balanced_weights",
]  # fmt: skip

CACHE_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FINGERPRINT_LEN = 16


class CacheError(ValueError):
    """A cache that cannot be built or read; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class CachedSplit:
    """A decoded split. Row ``i`` of ``audio`` is example ``i`` of the list it was built from.

    Attributes:
        path: the cache folder.
        audio: int16 ``(examples, clip_samples)``, memory-mapped read-only; ``/ 32768`` gives [-1, 1).
        targets: int64 ``(examples,)``, indices into ``labels``.
        labels: class names in model output order.
        fingerprint: hex digest of what the cache was built from.
        sample_rate: Hz.
    """

    path: Path
    audio: np.ndarray
    targets: np.ndarray
    labels: tuple
    fingerprint: str
    sample_rate: int

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def clip_samples(self) -> int:
        return int(self.audio.shape[1])

    def waveforms(self, indices) -> np.ndarray:
        """Float32 waveforms ``(len(indices), clip_samples)`` in [-1, 1)."""
        return self.audio[np.asarray(indices)].astype(np.float32) / np.float32(32768.0)

    def counts(self) -> np.ndarray:
        """Examples per class, ``(len(labels),)``."""
        return np.bincount(self.targets, minlength=len(self.labels))


def _examples_and_labels(data, labels) -> Tuple[list, tuple]:
    if isinstance(data, TaskSplit):
        return list(data.examples), tuple(labels if labels is not None else data.labels)
    examples = list(data)
    if labels is None:
        labels = sorted({e.label for e in examples})
    return examples, tuple(labels)


def fingerprint(examples: Sequence[Example], spec: FeatureSpec, labels: Sequence[str]) -> str:
    """SHA-256 (hex) of the example list, the label order, and the spec's rate and clip length.

    Each example contributes its path, file size and mtime (ns), label, start, gain and offset.

    Raises:
        CacheError: an example's file is missing.
    """
    h = hashlib.sha256()
    head = {"version": CACHE_VERSION, "sample_rate": spec.sample_rate, "clip_samples": spec.clip_samples, "labels": list(labels)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for e in examples:
        try:
            st = os.stat(e.path)
        except OSError as exc:
            raise CacheError(f"{e.path}: cannot read ({exc.strerror}); re-index the dataset") from None
        line = f"\n{os.fspath(e.path)}\t{st.st_size}\t{st.st_mtime_ns}\t{e.label}\t{e.start}\t{float(e.gain)!r}"
        # an offset joined the example later: caches of examples without one keep their key
        h.update((line + (f"\t{e.offset}" if e.offset else "")).encode())
    return h.hexdigest()


def build_cache(
    data: Union[TaskSplit, Sequence[Example]],
    cache_dir,
    name: str,
    spec: FeatureSpec = FeatureSpec(),
    labels: Optional[Sequence[str]] = None,
    workers: int = 1,
    progress: bool = False,
) -> CachedSplit:
    """The cache of a split: opened if one with the same fingerprint exists, else built.

    Built into a temporary folder beside the final one and renamed into place, so a
    crash or a concurrent builder never leaves a half-written cache under the final name
    (if two processes build the same cache, the first rename wins and the other's copy is
    dropped). Older caches with the same ``name`` are left alone.

    Args:
        data: a `TaskSplit` (its labels give the targets) or a list of `Example`.
        cache_dir: folder for caches (created if missing).
        name: the split's name, e.g. ``"training"``; letters, digits, ``_ . -``.
        spec: sample rate and clip length.
        labels: class order; defaults to the TaskSplit's labels (or the sorted labels seen).
        workers: decoding threads (decoding is mostly in libsndfile/soxr, outside the GIL).
        progress: show a tqdm bar.

    Raises:
        CacheError: bad name, empty split, an example that does not decode, a label not in ``labels``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CacheError(f"cache name {name!r} must be letters, digits, '_', '.' or '-' (e.g. 'training')")
    examples, labels = _examples_and_labels(data, labels)
    if not examples:
        raise CacheError(f"split {name!r} has no examples to cache")
    index = {label: i for i, label in enumerate(labels)}
    missing = sorted({e.label for e in examples} - set(index))
    if missing:
        raise CacheError(f"split {name!r} has examples labelled {', '.join(missing)}, not in labels {list(labels)}")
    digest = fingerprint(examples, spec, labels)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{digest[:_FINGERPRINT_LEN]}"
    cached = _open_if_current(final, digest)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=cache_dir))
    make_shareable(tmp, folder=True)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        targets = np.array([index[e.label] for e in examples], dtype=np.int64)
        _decode_all(examples, spec, tmp / "audio.npy", workers, progress, name)
        np.save(tmp / "targets.npy", targets)
        meta = {
            "format": "kws-audio-cache",
            "version": CACHE_VERSION,
            "name": name,
            "fingerprint": digest,
            "labels": list(labels),
            "examples": len(examples),
            "sample_rate": spec.sample_rate,
            "clip_samples": spec.clip_samples,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        # A concurrent builder may have finished first: its cache is kept, since moving it
        # aside would pull it from under the processes already reading it.
        cached = _open_if_current(final, digest)
        if cached is not None:
            return cached
        if final.is_dir():
            # an unreadable cache under this name: move it aside before the rename
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".stale", dir=cache_dir))
            try:
                os.replace(final, stale / "old")
            except FileNotFoundError:
                pass  # another builder moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # another process finished the same cache first; use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)


def _open_if_current(path: Path, digest: str) -> Optional[CachedSplit]:
    """The cache at ``path`` if it is readable and built from ``digest``, else None."""
    if not path.is_dir():
        return None
    try:
        cached = open_cache(path)
    except CacheError:
        return None  # unreadable: rebuilt and swapped in
    return cached if cached.fingerprint == digest else None


def _decode_all(examples, spec: FeatureSpec, path: Path, workers: int, progress: bool, name: str) -> None:
    audio = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(len(examples), spec.clip_samples))

    def decode(i: int) -> None:
        e = examples[i]
        try:
            wave = load_example(e, spec)
        except ValueError as exc:  # AudioError, DatasetError
            raise CacheError(f"cannot cache split {name!r}: {exc}") from None
        if wave.shape != (spec.clip_samples,):
            raise CacheError(f"cannot cache split {name!r}: {e.path} gave {wave.shape} samples, expected ({spec.clip_samples},)")
        audio[i] = np.clip(np.rint(wave * np.float32(32768.0)), -32768, 32767).astype(np.int16)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc=f"caching {name}", unit="clip")
    try:
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(decode, range(len(examples))):
                    bar is not None and bar.update()
        else:
            for i in range(len(examples)):
                decode(i)
                bar is not None and bar.update()
    finally:
        if bar is not None:
            bar.close()
    audio.flush()
    del audio


def open_cache(path) -> CachedSplit:
    """Open a cache folder written by `build_cache` (audio memory-mapped read-only).

    Raises:
        CacheError: missing files, unknown version, or arrays that do not match meta.json.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: not a readable audio cache ({exc}); delete it to rebuild") from None
    if not isinstance(meta, dict) or meta.get("format") != "kws-audio-cache" or meta.get("version") != CACHE_VERSION:
        found = meta.get("version") if isinstance(meta, dict) else None
        raise CacheError(f"{path}: cache format {found!r} is not version {CACHE_VERSION}; delete it to rebuild")
    try:
        audio = np.load(path / "audio.npy", mmap_mode="r")
        targets = np.load(path / "targets.npy")
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: cannot read cached arrays ({exc}); delete it to rebuild") from None
    try:
        n, length, labels = int(meta["examples"]), int(meta["clip_samples"]), tuple(meta["labels"])
        digest, sample_rate = str(meta["fingerprint"]), int(meta["sample_rate"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{path}: meta.json lacks or garbles {exc}; delete it to rebuild") from None
    if audio.dtype != np.int16 or audio.shape != (n, length) or targets.shape != (n,):
        raise CacheError(
            f"{path}: arrays {audio.shape}/{targets.shape} do not match meta.json ({n} x {length}); delete it to rebuild"
        )
    if n and (targets.min() < 0 or targets.max() >= len(labels)):
        raise CacheError(f"{path}: targets outside the {len(labels)} labels; delete it to rebuild")
    return CachedSplit(path, audio, targets.astype(np.int64, copy=False), labels, digest, sample_rate)


def balanced_weights(targets: np.ndarray) -> np.ndarray:
    """Per-example sampling weights ``1 / count(class)``: every class is drawn equally often."""
    targets = np.asarray(targets)
    counts = np.bincount(targets)
    return 1.0 / counts[targets]


class BatchLoader:
    """Batches of raw audio from a `CachedSplit`, on the device, ready for the front end.

    Yields ``(audio, targets)``: float32 ``(B, clip_samples)`` in [-1, 1) and int64 ``(B,)``
    on ``device``; with ``rows``, ``(audio, targets, rows)``, the batch's rows as float32.
    Clips are gathered from the memory map in a background thread (pinned when the device is
    CUDA) and sent as int16, half the bytes of float32; the scaling to float runs on the device.

    Order: with ``sample_weights`` (an array, or ``"balanced"`` for `balanced_weights`),
    ``num_samples`` indices are drawn with replacement in proportion to the weights; else
    with ``shuffle`` a permutation, else the cache order. Draws depend only on ``seed`` and
    the epoch (`set_epoch`), so every DDP rank computes the same order and takes its own
    share (``rank``, ``world_size``; padded by wrapping so all ranks get the same number
    of batches, as DistributedSampler does).

    Args:
        split: the cache.
        batch_size: clips per batch (per rank).
        shuffle: permute each epoch.
        seed: base seed of the order.
        sample_weights: None, ``"balanced"``, or non-negative weights ``(len(split),)``.
        num_samples: draws per epoch with weights (default ``len(split)``).
        drop_last: drop the last incomplete batch.
        device: where batches go (default CPU).
        pin_memory: pin host batches; default true for CUDA devices.
        rank, world_size: the share of a distributed run.
        prefetch: batches prepared ahead in the background thread (0: none, synchronous).
        rows: per-example values ``(len(split), ...)`` that travel with the examples
            (e.g. a teacher's soft targets, `kws_train.distill.bundle_soft_targets`).
    """

    def __init__(
        self,
        split: CachedSplit,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        sample_weights=None,
        num_samples: Optional[int] = None,
        drop_last: bool = False,
        device=None,
        pin_memory: Optional[bool] = None,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        rows: Optional[np.ndarray] = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if len(split) == 0:
            raise ValueError(f"{split.path}: the cache is empty")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.device = torch.device(device if device is not None else "cpu")
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.rank, self.world_size = rank, world_size
        self.prefetch = int(prefetch)
        self.epoch = 0
        if isinstance(sample_weights, str):
            if sample_weights != "balanced":
                raise ValueError(f"sample_weights must be None, 'balanced' or an array, got {sample_weights!r}")
            sample_weights = balanced_weights(split.targets)
        if sample_weights is not None:
            w = np.asarray(sample_weights, dtype=np.float64)
            if w.shape != (len(split),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"sample_weights must be {len(split)} finite non-negative numbers with a positive sum")
            sample_weights = w / w.sum()
        self.sample_weights = sample_weights
        if rows is not None and len(rows) != len(split):
            raise ValueError(f"rows must have one entry per example ({len(split)}), got {len(rows)}")
        self.rows = None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.float32))
        self.num_samples = len(split) if num_samples is None else int(num_samples)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples!r}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (call before iterating each epoch)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        """This rank's example indices for the current epoch, in batch order."""
        n = len(self.split)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.sample_weights is not None:
            order = rng.choice(n, size=self.num_samples, replace=True, p=self.sample_weights)
        elif self.shuffle:
            order = rng.permutation(n)
        else:
            order = np.arange(n)
        if self.world_size > 1:
            per_rank = -(-len(order) // self.world_size)
            order = np.resize(order, per_rank * self.world_size)  # wraps around
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        total = len(self.split) if self.sample_weights is None else self.num_samples
        per_rank = -(-total // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _host_batch(self, idx: np.ndarray):
        # sorted reads are sequential in the memory map; the pairs stay aligned
        idx = np.sort(idx)
        audio = torch.from_numpy(self.split.audio[idx])
        targets = torch.from_numpy(self.split.targets[idx])
        batch = (audio, targets) if self.rows is None else (audio, targets, self.rows[torch.from_numpy(idx)])
        return tuple(t.pin_memory() for t in batch) if self.pin_memory else batch

    def _to_device(self, audio: torch.Tensor, *others: torch.Tensor):
        non_blocking = self.pin_memory
        audio = audio.to(self.device, non_blocking=non_blocking).float().div_(32768.0)
        return (audio, *(t.to(self.device, non_blocking=non_blocking) for t in others))

    def _batches(self):
        order = self.indices()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        if self.prefetch <= 0:
            for idx in self._batches():
                yield self._to_device(*self._host_batch(idx))
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = threading.Event()
        end = object()

        def produce():
            try:
                for idx in self._batches():
                    item = self._host_batch(idx)
                    while not done.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if done.is_set():
                        return
                q.put(end)
            except BaseException as exc:  # handed to the consumer, raised there
                q.put(exc)

        worker = threading.Thread(target=produce, name="kws-batch-loader", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._to_device(*item)
        finally:
            done.set()
            while worker.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.05)

"""Training data pipeline throughput: cached audio + batched device features vs librosa per clip.

Measures, in one run on the same clips:

* baseline: a torch DataLoader with worker processes whose ``__getitem__`` loads a WAV with
  librosa and computes ``melspectrogram`` + ``power_to_db`` for that one clip;
* this toolkit: the split decoded once into an int16 cache (`kws_train.cache`), batches of
  raw audio sent to the device (`BatchLoader`), augmentation and log-mel on whole batches
  there (`kws_train.augment.build_frontend`).

Usage: python tools/bench_data.py [--data ../shared/data/speech_commands_real] [--preset seed]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import librosa  # imported before the workers fork, so they do not each pay for it
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands_real"


class LibrosaPerClip(torch.utils.data.Dataset):
    """The original approach: decode and featurize one clip per item, inside the workers."""

    def __init__(self, paths, labels, spec):
        self.paths, self.labels, self.spec = paths, labels, spec

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        s = self.spec
        y, _ = librosa.load(self.paths[i], sr=s.sample_rate)
        y = librosa.util.fix_length(y, size=s.clip_samples)
        mel = librosa.feature.melspectrogram(
            y=y, sr=s.sample_rate, n_fft=s.n_fft, win_length=s.win_length, hop_length=s.hop_length,
            n_mels=s.n_mels, center=s.center, pad_mode=s.pad_mode, power=s.power,
        )  # fmt: skip
        return torch.from_numpy(librosa.power_to_db(mel, ref=np.max, amin=s.amin, top_db=s.top_db)), self.labels[i]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds():
    """CPU time of this process and its reaped children (the DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def bench_baseline(paths, labels, spec, batch_size, workers):
    dataset = LibrosaPerClip(paths, labels, spec)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    start, cpu = time.perf_counter(), cpu_seconds()
    n = 0
    for feats, _ in loader:
        n += len(feats)
    del loader  # the workers exit and are reaped, so their CPU time is counted
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n


def bench_epoch(loader, frontend, device, epoch):
    loader.set_epoch(epoch)
    sync(device)
    start, cpu = time.perf_counter(), cpu_seconds()
    n = 0
    with torch.no_grad():
        for audio, _ in loader:
            feats = frontend(audio)
            n += len(feats)
    sync(device)
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n


def best(runs):
    """The fastest run (wall clock) of several: the least disturbed by other load."""
    return max(runs, key=lambda r: r[0])


def measure_pipeline(data, preset, *, batch_size=128, workers=2, cache_threads=2, epochs=3, limit=None,
                     device=torch.device("cpu"), threads=1, log=lambda line: None) -> list:
    """``[(pipeline, clips per second, CPU seconds per clip), ...]``, the librosa baseline first.

    Raises:
        SpecError, DatasetError, CacheError: a bad preset, data folder or cache;
        ValueError: a folder without ``_background_noise_/`` recordings.
    """
    from kws_runtime.spec import FeatureSpec
    from kws_train.augment import AugmentConfig, build_frontend
    from kws_train.cache import BatchLoader, build_cache
    from kws_train.dataset import Example, background_noise, index_dataset

    spec = FeatureSpec.preset(preset)
    clips = index_dataset(data)[:limit]
    noise = background_noise(data, spec.sample_rate)
    if not noise:
        raise ValueError(f"{data} has no _background_noise_/ recordings for the augmentation")
    labels = sorted({c.word for c in clips})
    examples = [Example(c.path, c.word, c.speaker) for c in clips]
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    log(f"{len(examples)} clips from {data}, preset {preset} ({'x'.join(map(str, spec.shape))}), batch {batch_size}, "
        f"device {where}")
    rows = []
    paths, targets = [str(e.path) for e in examples], [labels.index(e.label) for e in examples]
    base, base_cpu = bench_baseline(paths, targets, spec, batch_size, workers)
    rows.append((f"librosa per clip, DataLoader {workers} workers (baseline)", base, base_cpu))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="kws-bench-") as tmp:
            start, cpu = time.perf_counter(), cpu_seconds()
            cached = build_cache(examples, tmp, "bench", spec, labels=labels, workers=cache_threads)
            build_s, build_cpu = time.perf_counter() - start, cpu_seconds() - cpu
            loader = BatchLoader(cached, batch_size, shuffle=True, seed=0, device=device)
            plain = build_frontend(spec, None).to(device).eval()
            augmented = build_frontend(spec, AugmentConfig(), noise, seed=0).to(device).train()
            bench_epoch(loader, augmented, device, epochs)  # warm-up: allocator, FFT plans
            eval_rate, eval_cpu = best([bench_epoch(loader, plain, device, e) for e in range(epochs)])
            train_rate, train_cpu = best([bench_epoch(loader, augmented, device, e) for e in range(epochs)])
            del loader, cached
    finally:
        torch.set_num_threads(previous)
    n = len(examples)
    rows.append((f"cache build, once per data change ({cache_threads} threads)", n / build_s, build_cpu / n))
    rows.append(("cached batches -> log-mel (evaluation)", eval_rate, eval_cpu))
    rows.append(("cached batches -> shift+noise+gain -> log-mel -> SpecAugment", train_rate, train_cpu))
    rows.append(("  same, first epoch including the cache build", n / (build_s + n / train_rate), build_cpu / n + train_cpu))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (default: %(default)s)")
    parser.add_argument("--preset", default="librosa", help="feature preset: librosa or fine (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers (default: %(default)s)")
    parser.add_argument("--cache-threads", type=int, default=2, help="decoding threads for the cache (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of the cached pipeline; the best is reported")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N clips")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads for the cached pipeline (default: %(default)s; the baseline's "
        "workers are single-threaded processes, and the batch loader adds a thread)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads < 1 or args.workers < 0 or args.epochs < 1 or args.batch_size < 1:
        print("bench_data: --threads, --epochs and --batch-size must be >= 1, --workers >= 0", file=sys.stderr)
        return 2

    from kws_runtime.spec import SpecError
    from kws_train.cache import CacheError
    from kws_train.dataset import DatasetError

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        rows = measure_pipeline(args.data, args.preset, batch_size=args.batch_size, workers=args.workers,
                                cache_threads=args.cache_threads, epochs=args.epochs, limit=args.limit, device=device,
                                threads=args.threads, log=print)
    except (SpecError, DatasetError, CacheError, RuntimeError, ValueError) as exc:
        print(f"bench_data: {exc}", file=sys.stderr)
        return 2
    base = rows[0][1]
    width = max(len(name) for name, _, _ in rows)
    print(f"\n| {'pipeline':<{width}} | {'clips/s':>8} | {'vs baseline':>11} | {'CPU ms/clip':>11} |")
    print(f"|{'-' * (width + 2)}|{'-' * 10}|{'-' * 13}|{'-' * 13}|")
    for name, rate, cpu in rows:
        print(f"| {name:<{width}} | {rate:8.0f} | {rate / base:10.1f}x | {cpu * 1000:11.2f} |")
    print(
        f"\n(baseline: {args.workers} single-threaded worker processes; cached pipeline: "
        f"{args.threads} torch thread(s) + the loader's thread; best of {args.epochs} epochs)"
    )
    speedup = rows[3][1] / base  # the augmented training pipeline
    print(f"\ntraining pipeline (augmented) vs baseline: {speedup:.1f}x ({'meets' if speedup >= 5 else 'misses'} the 5x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

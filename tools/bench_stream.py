"""Streaming cost: real-time factor of the detector, its overhead beyond the model run, and the
peak memory of `kws stream` on a one-hour recording.

    python tools/bench_stream.py pretrained/shufflenet-v2-0.5x [--minutes 2] [--hour]

One thread. The detector's time per hop is split into its model runs (onnxruntime's ``run``,
timed inside the stream) and everything else (ring buffer, incremental features, softmax,
smoothing): the overhead is the rest as a fraction of the model's time. The model is also
timed alone, back to back on the same windows' features, taking turns with the detector: the
detector's total against that also counts what running the features costs the model
run that follows. A second line per bundle says why the detector's part costs more in the
stream than alone (`features_cold`). `--hour` also writes a one-hour WAV and runs `kws stream`
on it in a child process, reporting its peak resident memory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kws_runtime.stream import Detector, DetectorConfig  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands_real"


def stream_audio(minutes: float, seed: int = 0) -> np.ndarray:
    from kws_runtime.stream_eval import build_stream

    audio, _ = build_stream(REAL, 60 * minutes, 10.0, seed)
    return audio


class _TimedSession:
    """An onnxruntime session that adds up the time spent in its ``run``."""

    def __init__(self, session):
        self.session, self.seconds = session, 0.0

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def detector_cost(bundle: str, audio: np.ndarray, repeats: int = 3) -> dict:
    detector = Detector(bundle, DetectorConfig(), threads=1)
    timed = detector.predictor._session = _TimedSession(detector.predictor._session)
    totals, models, in_stream = [], [], []
    for _ in range(repeats):
        detector.reset()
        # the detector, whole, with the time of its model runs
        timed.seconds = 0.0
        start = time.perf_counter()
        detector.feed(audio)
        totals.append(time.perf_counter() - start)
        in_stream.append(timed.seconds)
        # the model alone, on the features of the same windows
        hop, clip = detector.hop, detector.spec.clip_samples
        padded = np.concatenate([np.zeros(clip, np.float32), audio])
        features = [detector.features(padded[end - clip : end], end - 2 * clip)
                    for end in range(clip + hop, len(padded) + 1, hop)]
        start = time.perf_counter()
        for f in features:
            detector.predictor.probabilities_of_features(f[None])
        models.append(time.perf_counter() - start)
    # the detector with the model replaced by a constant: its own work, without the model
    # evicting its data between hops
    constant = np.full((1, len(detector.labels)), 1 / len(detector.labels), dtype=np.float32)
    scored = detector.predictor.probabilities_of_features
    detector.predictor.probabilities_of_features = lambda features: constant
    alone = []
    for _ in range(repeats):
        detector.reset()
        start = time.perf_counter()
        detector.feed(audio)
        alone.append(time.perf_counter() - start)
    detector.predictor.probabilities_of_features = scored
    seconds = len(audio) / detector.spec.sample_rate
    best = int(np.argmin(totals))
    total, model, run_in_stream = totals[best], min(models), in_stream[best]
    return {"audio_s": seconds, "hops": len(features), "real_time_factor": total / seconds,
            "ms_per_hop": 1e3 * total / len(features), "model_ms_per_hop": 1e3 * model / len(features),
            "model_in_stream_ms_per_hop": 1e3 * run_in_stream / len(features),
            "detector_alone_ms_per_hop": 1e3 * min(alone) / len(features),
            "overhead_vs_model": (total - run_in_stream) / run_in_stream,
            "overhead_vs_model_alone": (total - model) / model, "incremental": detector.incremental}


def features_cold(bundle: str, audio: np.ndarray, hops: int = 400) -> dict:
    """Why the detector's part costs more in the stream than alone: the median time of one
    hop's features (us) warm, right after a model run, and right after reading 8 MB (as much
    data as the model run touches, and more); if the sweep costs nothing and the model run does,
    the slowdown is not data evicted from the caches but the state the model run leaves the
    core in (its code caches and predictors, or its clock after heavy vector code: this does not
    tell which)."""
    detector = Detector(bundle, DetectorConfig(), threads=1)
    windows = detector.features
    clip, hop = detector.spec.clip_samples, detector.hop
    features = np.zeros((1, *detector.spec.shape), dtype=np.float32)
    sweep = np.ones(1 << 20)
    before = {"warm": lambda: None, "after_model": lambda: detector.predictor.probabilities_of_features(features),
              "after_8mb_read": sweep.sum}
    result = {}
    for name, step in before.items():
        windows.reset()
        times = []
        for end in range(clip, min(len(audio), clip + hops * hop) + 1, hop):
            step()
            start = time.perf_counter()
            windows(audio[end - clip : end], end - clip)
            times.append(time.perf_counter() - start)
        result[name] = 1e6 * float(np.median(times[1:]))  # the first window is computed whole
    return result


def hour_memory(bundle: str) -> dict:
    import soundfile

    piece = stream_audio(5.0, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hour.wav"
        with soundfile.SoundFile(str(path), "w", 16000, 1, subtype="PCM_16") as f:
            for _ in range(12):
                f.write(piece)
        # A small launcher forks kws stream: a child forked from this (large) process would
        # count the pages it shares with it in its own peak.
        launcher = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                    "print(done.returncode, len(done.stdout.splitlines()), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-m", "kws_runtime.cli", "stream", bundle,
                               str(path), "--threads", "1"], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    code, events, peak_kb = map(int, done.stdout.split())
    return {"exit": code, "events": events, "seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--minutes", type=float, default=2.0, help="stream length for the timing (default 2)")
    parser.add_argument("--hour", action="store_true", help="also measure kws stream's memory on a one-hour file")
    args = parser.parse_args()
    audio = stream_audio(args.minutes)
    for bundle in args.bundles:
        r = detector_cost(bundle, audio)
        print(f"{Path(bundle).name}: real-time factor {r['real_time_factor']:.4f} ({r['ms_per_hop']:.2f} ms per 100 ms hop), "
              f"model {r['model_in_stream_ms_per_hop']:.2f} ms in the stream ({r['model_ms_per_hop']:.2f} alone), "
              f"overhead {100 * r['overhead_vs_model']:.1f} % of the model's time "
              f"({100 * r['overhead_vs_model_alone']:.1f} % against the model alone; the detector's own work with no "
              f"model {1e3 * r['detector_alone_ms_per_hop']:.0f} us), "
              f"incremental features: {r['incremental']}")
        c = features_cold(bundle, audio)
        print(f"  one hop's features: {c['warm']:.0f} us warm, {c['after_model']:.0f} us right after a model run, "
              f"{c['after_8mb_read']:.0f} us right after reading 8 MB")
        if args.hour:
            m = hour_memory(bundle)
            print(f"  kws stream on a 1-hour file: {m['seconds']:.0f} s, {m['events']} events, peak RSS {m['peak_rss_mb']:.0f} MB "
                  f"(exit {m['exit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the torch-free runtime on this machine, on one thread.

    python tools/bench_runtime.py                   # everything, real clips if the sample is there
    python tools/bench_runtime.py --clips 64 --repeats 50
    python tools/bench_runtime.py --bundle bundles/resnet18   # RSS of `kws predict` on a real bundle

Prints, for the "librosa" (40 x 32) and "fine" (40 x 101) feature presets, `log_mel` against
librosa on 1 s clips: one clip at a time, and a batch of clips (librosa one call per clip, and
librosa given the whole batch as channels), as microseconds per clip, speed-up and the largest
difference in dB. Then the time of ``import kws_runtime`` beside ``import torch`` (fresh
interpreters, best of several) and the peak resident memory of a ``kws predict`` process.

Timings are the best CPU time (one thread, so CPU time is the time the code takes when it has a
core) of several repeats, alternating the contenders so that load from other work on the
machine hits both alike; the 1-minute load average is printed with them.
"""

from __future__ import annotations

import os

# One thread everywhere, before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kws_runtime import FeatureSpec, load_audio, log_mel  # noqa: E402
from kws_runtime.audio import is_audio_file  # noqa: E402

REAL_DATA = REPO.parent / "shared" / "data" / "speech_commands_real"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=256, help="clips in the batched measurement (default 256)")
    parser.add_argument("--repeats", type=int, default=200, help="repeats of the single-clip timing (best is kept)")
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="folder of 1 s clips (default: the real sample)")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle for the memory measurement (default: one built here)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["features", "import", "memory"], help="parts to skip")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}; one thread; load average {os.getloadavg()[0]:.2f}")
    if "features" not in args.skip:
        clips, source = _clips(args.data, args.clips)
        print(f"\nlog_mel vs librosa on {len(clips)} clips ({source})")
        print("| preset | shape | mode | kws_runtime us/clip | librosa us/clip | speed-up | max diff dB |")
        print("|---|---|---|---:|---:|---:|---:|")
        floors = []
        for preset in ("librosa", "fine"):
            for r in bench_features(FeatureSpec.preset(preset), clips, args.repeats):
                print(f"| {r['preset']} | {r['shape']} | {r['mode']} | {r['kws_runtime_us']:.0f} | {r['librosa_us']:.0f} "
                      f"| {r['speedup']:.1f}x | {r['max_diff_db']:.1e} |")
            floors.append(f"{preset} {fft_floor_us(FeatureSpec.preset(preset), args.repeats):.0f} us")
        print(f"numpy's rfft of one clip's windowed frames alone (the floor for an exact STFT): {', '.join(floors)}")
        print(f"(load average now {os.getloadavg()[0]:.2f})")
    if "import" not in args.skip:
        print("\nimport time, fresh interpreter, best of 5")
        for module in ("kws_runtime", "onnxruntime", "torch"):
            seconds = import_seconds(module)
            print(f"  import {module:<12} {'not installed' if seconds is None else f'{seconds:.3f} s'}")
    if "memory" not in args.skip:
        print("\npeak resident memory of `kws predict` (one process, maxrss)")
        with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
            bundle = args.bundle or build_bundle(Path(tmp) / "bundle")
            files = clip_files(args.data, 64) or _write_clips(Path(tmp) / "clips", 64)
            for artifact in (None, "onnx_fp32"):
                try:
                    rss, seconds, size = predict_peak_rss(bundle, files, artifact)
                except RuntimeError as exc:
                    print(f"  {artifact}: failed: {exc}")
                    continue
                print(f"  {artifact or 'default artifact':<16} model {size / 1e6:5.1f} MB, {len(files)} files: "
                      f"peak RSS {rss / 1e6:.0f} MB, {seconds:.2f} s")
    return 0


# ------------------------------------------------------------------------------------ features


def bench_features(spec: FeatureSpec, clips: np.ndarray, repeats: int) -> list:
    """`log_mel` against librosa on one clip and on a batch: one dict per mode (times per clip)."""
    import librosa

    def reference(y):
        mel = librosa.feature.melspectrogram(
            y=y, sr=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length, hop_length=spec.hop_length,
            n_mels=spec.n_mels, center=spec.center, pad_mode=spec.pad_mode,
        )
        return librosa.power_to_db(mel, ref=np.max, top_db=spec.top_db)

    def reference_channels(batch):
        # librosa takes the batch as channels; power_to_db per clip keeps ref=max per clip.
        mel = librosa.feature.melspectrogram(
            y=batch, sr=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length, hop_length=spec.hop_length,
            n_mels=spec.n_mels, center=spec.center, pad_mode=spec.pad_mode,
        )
        return np.stack([librosa.power_to_db(m, ref=np.max, top_db=spec.top_db) for m in mel])

    one = clips[0]
    ours_1, theirs_1 = best_cpu_times([lambda: log_mel(one, spec), lambda: reference(one)], repeats)
    diff_1 = np.abs(log_mel(one, spec) - reference(one)).max()

    batch_repeats = max(3, repeats // 40)
    ours_b, loop_b, chan_b = best_cpu_times(
        [lambda: log_mel(clips, spec), lambda: [reference(y) for y in clips], lambda: reference_channels(clips)],
        batch_repeats,
    )
    ours = log_mel(clips, spec)
    diff_b = max(np.abs(ours[i] - reference(clips[i])).max() for i in range(len(clips)))
    diff_c = np.abs(ours - reference_channels(clips)).max()
    n = len(clips)
    shape = f"{spec.n_mels}x{spec.n_frames}"
    name = next(k for k in ("librosa", "fine") if FeatureSpec.preset(k) == spec)

    def row(mode, mine, theirs, diff):
        return {"preset": name, "shape": shape, "mode": mode, "kws_runtime_us": mine * 1e6, "librosa_us": theirs * 1e6,
                "speedup": theirs / mine, "max_diff_db": float(diff)}

    return [
        row("1 clip", ours_1, theirs_1, diff_1),
        row(f"batch of {n}, librosa per clip", ours_b / n, loop_b / n, diff_b),
        row(f"batch of {n}, librosa channels", ours_b / n, chan_b / n, diff_c),
    ]


def fft_floor_us(spec: FeatureSpec, repeats: int) -> float:
    """CPU time of numpy's float64 rfft over one clip's frames: what any exact STFT here pays."""
    frames = np.random.default_rng(0).standard_normal((spec.n_frames, spec.n_fft))
    return best_cpu_times([lambda: np.fft.rfft(frames, axis=-1)], repeats)[0] * 1e6


def best_cpu_times(functions, repeats: int) -> list:
    """Best CPU time of each function. CPU time, not wall time: on a shared machine a long
    call waits for a core now and then, and that wait is not the code's."""
    for f in functions:
        f()  # warm-up: plans, caches, librosa's first-call compilation
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, f in enumerate(functions):
            start = time.process_time()
            f()
            best[i] = min(best[i], time.process_time() - start)
    return best


def clip_files(folder: Path, n: int) -> list:
    """Up to ``n`` audio files of a Speech Commands folder, taking the words in turn."""
    if not folder.is_dir():
        return []
    words = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_"))
    per_word = [sorted(f for f in w.iterdir() if is_audio_file(f)) for w in words]
    files = [f for group in itertools.zip_longest(*per_word) for f in group if f is not None]  # round-robin
    return files[:n]


def _clips(folder: Path, n: int) -> tuple:
    files = clip_files(folder, n)
    if len(files) == n:
        return np.stack([load_audio(f) for f in files]), f"real recordings from {folder.name}"
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal((n, 16000))).astype(np.float32), "white noise; real sample not found"


def _write_clips(folder: Path, n: int) -> list:
    import soundfile

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        files.append(folder / f"clip{i}.wav")
        soundfile.write(files[-1], 0.1 * rng.standard_normal(16000), 16000, subtype="PCM_16")
    return files


# -------------------------------------------------------------------------------- import, memory


def import_seconds(module: str, runs: int = 5):
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    best = None
    for _ in range(runs):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return None
        seconds = float(result.stdout.strip())
        best = seconds if best is None else min(best, seconds)
    return best


def peak_rss(argv: list) -> tuple:
    """(peak RSS bytes, wall seconds) of one process running ``argv``; RuntimeError if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Measured in a child of a fresh helper process, so that no earlier child (the import
    # timings) is counted in RUSAGE_CHILDREN's maximum.
    helper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, r.returncode); "
        "sys.stderr.write(r.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", helper, *argv], capture_output=True, text=True, env=env)
    kib, seconds, code = result.stdout.split()
    if int(code) != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {code}")
    return int(kib) * 1024, float(seconds)


def predict_peak_rss(bundle: Path, files: list, artifact=None) -> tuple:
    """(peak RSS bytes, wall seconds, model bytes) of one ``kws predict`` process."""
    from kws_runtime import load_bundle
    from kws_runtime.predict import choose_artifact

    size = choose_artifact(load_bundle(bundle), artifact).size
    argv = [sys.executable, "-m", "kws_runtime.cli", "predict", str(bundle), *map(str, files), "--threads", "1"]
    if artifact:
        argv += ["--artifact", artifact]
    return (*peak_rss(argv), size)


def build_bundle(folder: Path) -> Path:
    """A bundle with a model of about ResNet-18's size (9M weights) over the seed features:
    an MLP 1280-2048-2048-1024-12, fp32 and quantized to int8 (QDQ) by onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from kws_runtime import file_sha256, write_manifest

    spec = FeatureSpec()
    sizes = [spec.n_mels * spec.n_frames, 2048, 2048, 1024, 12]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    nodes, inits, x = [helper.make_node("Flatten", ["log_mel"], ["h0"], axis=1)], [], "h0"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"))
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], ["logits" if last else f"m{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]))
            x = f"h{i + 1}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, ["batch", 1, spec.n_mels, spec.n_frames])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 12])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))

    class Calibration(CalibrationDataReader):
        def __init__(self):
            noise = (0.1 * rng.standard_normal((16, spec.clip_samples))).astype(np.float32)
            self.batches = iter([{"log_mel": log_mel(noise, spec)[:, None]}])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs advice about pre-processing at WARNING
    try:
        quantize_static(str(folder / "model.onnx"), str(folder / "model.int8.onnx"), Calibration(),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)

    def entry(name, precision):
        return {
            "file": name, "format": "onnx", "precision": precision,
            "input": {"name": "log_mel", "kind": "log_mel", "shape": ["batch", 1, spec.n_mels, spec.n_frames]},
            "output": {"name": "logits", "kind": "logits", "shape": ["batch", 12]},
            "sha256": file_sha256(folder / name), "size": (folder / name).stat().st_size, "metrics": {}, "notes": {},
        }

    labels = ["_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
    write_manifest(folder, {
        "format": "kws-bundle", "format_version": 1,
        "model": {"name": "bench-mlp", "architecture": "mlp", "variant": "bench"},
        "labels": labels, "feature_spec": spec.to_dict(),
        "artifacts": {"onnx_fp32": entry("model.onnx", "fp32"), "onnx_int8": entry("model.int8.onnx", "int8")},
    })
    return folder


if __name__ == "__main__":
    sys.exit(main())

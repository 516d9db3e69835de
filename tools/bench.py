"""The benchmark suite: every area measured on this machine in one run, written as one table.

    python tools/bench.py                      # everything: about 10-15 minutes on 2 cores
    python tools/bench.py --quick              # a subset in about a minute (CI checks its structure)
    python tools/bench.py --bundles pretrained/shufflenet-v2-0.5x bundles/mine

Areas: the machine; features (`log_mel` against librosa and against numpy's bare rfft of the
same frames); inference of every artifact of each bundle (batch 1 latency, batch 64
throughput, one thread); end to end, file to label (the runtime against the seed's path:
librosa + eager torch fp32 on the same model and features, and the seed's original 40 x 32
configuration); streaming (real-time factor, detector overhead); the browser page (time per
hop in onnxruntime-web against `kws stream`, download size); footprint (import time, peak
memory of a prediction process, installed size); the training data pipeline; GPU rows when a
GPU is there. Contenders take turns so load from other work hits them alike. Each area's
measurement lives in its own script (`bench_runtime.py`, `bench_stream.py`, `bench_data.py`,
`bench_train.py`, `bench_browser.py`); this one calls them and adds the end-to-end comparison.

Writes ``--json`` (every raw timing) and ``--markdown`` (default docs/benchmarks.md: one table
per area, the machine line on top, the command that regenerated it).
"""

from __future__ import annotations

import os

# One thread everywhere, before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path[:0] = [str(REPO), str(TOOLS)]

import bench_runtime  # noqa: E402
from kws_runtime import FeatureSpec, Predictor, load_audio, load_bundle, log_mel  # noqa: E402
from kws_runtime.files import write_json_atomic, write_text_atomic  # noqa: E402

REAL_DATA = REPO.parent / "shared" / "data" / "speech_commands_real"
PRETRAINED = sorted(p for p in (REPO / "pretrained").iterdir() if (p / "manifest.json").is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset with few repeats, about a minute")
    parser.add_argument("--bundles", nargs="+", type=Path, default=PRETRAINED, help="bundles to measure (default: pretrained/*)")
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="folder of real 1 s clips (default: the real sample)")
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "bench" / "bench.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if not (args.data / "yes").is_dir():
        parser.error(f"{args.data} holds no Speech Commands clips (pass --data)")
    command = "python tools/bench.py" + (" --quick" if args.quick else "")
    results = {"command": command, "date": datetime.date.today().isoformat(), "quick": args.quick, "machine": machine()}
    files = bench_runtime.clip_files(args.data, 64 if args.quick else 256)
    areas = (("features", lambda: features(files, args.quick)),
             ("inference", lambda: inference(args.bundles, files, args.quick)),
             ("end_to_end", lambda: end_to_end(args.bundles, files, args.quick)),
             ("streaming", lambda: streaming(args.bundles, args.quick)),
             ("browser", lambda: browser(args.bundles, args.quick)),
             ("footprint", lambda: footprint(args.bundles[0], files, args.quick)),
             ("training_data", lambda: training_data(args.data, args.quick)),
             ("gpu", gpu))
    for name, measure in areas:
        start = time.perf_counter()
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = measure()
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    results["machine"]["load_after"] = round(os.getloadavg()[0], 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, results)
    write_text_atomic(args.markdown, markdown(results))
    print(f"wrote {args.json} and {args.markdown}")
    return 0


# ------------------------------------------------------------------------------------ machine


def machine() -> dict:
    """CPU model, cores, the instruction sets that decide the fast paths, load, library versions."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flag_line = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", info, re.M)  # x86 / ARM spelling
    flags = set(flag_line.group(1).split()) if flag_line else set()
    versions = {}
    for package in ("numpy", "onnxruntime", "soundfile", "soxr", "librosa", "torch", "executorch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "arch": platform.machine(), "cores": os.cpu_count(),
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "neon", "asimd", "asimddp") if f in flags],
        "load_before": round(os.getloadavg()[0], 2), "python": platform.python_version(), "versions": versions,
    }


# ----------------------------------------------------------------------------------- features


def features(files: list, quick: bool) -> dict:
    clips = np.stack([load_audio(f) for f in files])
    repeats = 20 if quick else 200
    rows = []
    for preset in ("librosa", "fine"):
        spec = FeatureSpec.preset(preset)
        floor = bench_runtime.fft_floor_us(spec, repeats)
        for row in bench_runtime.bench_features(spec, clips, repeats):
            rows.append({**row, "rfft_floor_us": floor, "vs_floor": row["kws_runtime_us"] / floor if row["mode"] == "1 clip" else None})
    return {"rows": rows}


# ---------------------------------------------------------------------------------- inference


def _runner(artifact):
    """A scorecard runner for any artifact, or None with the reason (torch or ExecuTorch absent)."""
    from kws_export import scorecard  # torch: the TorchScript and ExecuTorch runners need it

    if artifact.format == "onnx":
        return scorecard.onnx_runner(artifact.path, artifact.input_kind, artifact.output_kind)
    if artifact.format.startswith("torchscript"):
        engine = "qnnpack" if artifact.precision == "int8" else None
        return scorecard.torchscript_runner(artifact.path, lite=artifact.format == "torchscript-lite", engine=engine)
    from kws_export.executorch_export import missing_reason, pte_runner

    return pte_runner(artifact.path) if missing_reason() is None else None


def inference(bundles: list, files: list, quick: bool) -> dict:
    from kws_export.scorecard import EvalSet, median_latencies_ms

    rows = []
    for path in bundles:
        bundle = load_bundle(path)
        runners = {name: r for name, a in bundle.artifacts.items() if (r := _runner(a)) is not None}
        data = EvalSet(files, [0] * len(files), bundle.spec, lambda f, spec: load_audio(f, spec))
        latency = median_latencies_ms(runners, data, runs=20 if quick else 100)
        for name, runner in runners.items():
            batch = data.waveforms(0, 64) if runner.input_kind == "waveform" else data.features()[:64]
            (seconds,) = bench_runtime.best_cpu_times([lambda: runner(batch)], 2 if quick else 5)
            artifact = bundle.artifacts[name]
            rows.append({"bundle": path.name, "artifact": name, "format": artifact.format, "precision": artifact.precision,
                         "size_mb": artifact.size / 1e6, "latency_ms": latency[name], "batch": len(batch),
                         "throughput_clips_per_s": len(batch) / seconds})
    return {"rows": rows, "note": "latency: median wall time per clip at batch 1, one thread, artifacts taking turns; "
                                  "throughput: best CPU time of a batch of 64 (ExecuTorch programs run it clip by clip)"}


# --------------------------------------------------------------------------------- end to end


def _seed_steps(architecture: str, variant: str, spec: FeatureSpec, labels: list) -> tuple:
    """The seed's way from a file to a label, step by step: ``(load, featurize, classify)``.

    librosa's load and features, eager torch fp32. The model has random weights: its cost is
    the trained model's, and that is all this measures.
    """
    import librosa
    import torch

    from kws_train.models import build_model

    model = build_model(architecture, len(labels), variant).eval()

    def load(path):
        y, _ = librosa.load(path, sr=spec.sample_rate)
        return librosa.util.fix_length(y, size=spec.clip_samples)

    def featurize(y):
        mel = librosa.feature.melspectrogram(y=y, sr=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length,
                                             hop_length=spec.hop_length, n_mels=spec.n_mels)
        return torch.from_numpy(librosa.power_to_db(mel, ref=np.max, top_db=spec.top_db)[None, None].astype(np.float32))

    def classify(x):
        with torch.no_grad():
            return labels[int(model(x).argmax())]

    return load, featurize, classify


def _seed_path(architecture: str, variant: str, spec: FeatureSpec, labels: list):
    """`_seed_steps` as one function of a path."""
    load, featurize, classify = _seed_steps(architecture, variant, spec, labels)
    return lambda path: classify(featurize(load(path)))


def _speed_bundle(architecture: str, data: Path, folder: Path) -> Path:
    """An ONNX fp32 + int8 bundle of an untrained ``architecture`` (batch norm statistics from
    real clips): the cost of a trained one, for architectures no shipped bundle has."""
    import torch

    from kws_export import export_bundle
    from kws_train.checkpoint import save_checkpoint
    from kws_train.models import build_model
    from kws_train.recipe import TASK_LABELS
    from kws_train.config import TrainConfig

    spec, labels = FeatureSpec.preset("fine"), list(TASK_LABELS["12"])
    model = build_model(architecture, len(labels)).train()
    clips = np.stack([load_audio(f, spec) for f in bench_runtime.clip_files(data, 64)])
    with torch.no_grad():
        model(torch.from_numpy(log_mel(clips, spec)[:, None]))
    config = TrainConfig(data=str(data), architecture=architecture, features="fine").to_dict()
    ckpt = save_checkpoint(folder / "untrained.pt", model.eval(), architecture=architecture, variant="default",
                           labels=labels, spec=spec, config=config)
    export_bundle(ckpt, folder / architecture, data, None, ["onnx_fp32", "onnx_int8"], calib_clips=64,
                  select_quantization=False, latency_runs=0, threads=1)
    return folder / architecture


def _session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def end_to_end(bundles: list, files: list, quick: bool) -> dict:
    import torch

    from kws_train.models import model_variants

    torch.set_num_threads(1)
    files = [str(f) for f in files[:16 if quick else 64]]
    repeats = 3 if quick else 10
    rows = []
    with tempfile.TemporaryDirectory(prefix="kws-bench-") as tmp:
        extra = [] if quick else [_speed_bundle("resnet18", REAL_DATA, Path(tmp))]
        for path in list(bundles) + extra:
            bundle = load_bundle(path)
            if "onnx_int8" not in bundle.artifacts:
                continue
            predictor = Predictor(bundle, artifact="onnx_int8", threads=1)
            session, spec = _session(bundle.artifacts["onnx_int8"].path), bundle.spec
            architecture = bundle.model["architecture"]
            name = f"{architecture} (untrained)" if path in extra else path.name
            audio = [load_audio(f, spec) for f in files]
            feats = [log_mel(y, spec)[None, None] for y in audio]
            seed_load, seed_featurize, seed_classify = _seed_steps(architecture, bundle.model["variant"], spec,
                                                                   list(bundle.labels))
            seed_audio = [seed_load(f) for f in files]
            seed_feats = [seed_featurize(y) for y in seed_audio]
            # the seed's 40 x 32 features and its ImageNet layouts (BC-ResNet has only its own)
            layout = "imagenet" if "imagenet" in model_variants(architecture) else "default"
            original = _seed_path(architecture, layout, FeatureSpec.preset("librosa"), list(bundle.labels))
            contenders = {
                "runtime": lambda: [predictor.predict(f) for f in files],
                # the same three steps per file, without the Predictor: what it adds is the difference
                "steps": lambda: [session.run(None, {"log_mel": log_mel(load_audio(f, spec), spec)[None, None]})
                                  for f in files],
                "load": lambda: [load_audio(f, spec) for f in files],
                "features": lambda: [log_mel(y, spec) for y in audio],
                "model": lambda: [session.run(None, {"log_mel": x}) for x in feats],
                "seed_path": lambda: [seed_classify(seed_featurize(seed_load(f))) for f in files],
                "seed_load": lambda: [seed_load(f) for f in files],
                "seed_features": lambda: [seed_featurize(y) for y in seed_audio],
                "seed_model": lambda: [seed_classify(x) for x in seed_feats],
                "seed_original": lambda: [original(f) for f in files],
            }
            times = dict(zip(contenders, bench_runtime.best_cpu_times(list(contenders.values()), repeats)))
            ms = {k: 1e3 * v / len(files) for k, v in times.items()}
            rows.append({"model": name, "artifact": "onnx_int8", **{f"{k}_ms": v for k, v in ms.items()},
                         "parts_ms": ms["load"] + ms["features"] + ms["model"], "overhead": ms["runtime"] / ms["steps"] - 1,
                         "vs_seed_path": ms["seed_path"] / ms["runtime"], "vs_seed_original": ms["seed_original"] / ms["runtime"]})
    return {"rows": rows, "note": "CPU ms per file, one thread, best of several rounds; overhead: `Predictor.predict` "
                                  "against load + log_mel + onnxruntime run in one loop per file (the parts timed "
                                  "each in its own loop add up to less: the three no longer evict each other's data "
                                  "from the caches); seed path: librosa.load + "
                                  "melspectrogram + power_to_db + eager torch fp32 of the same architecture and features; "
                                  "seed original: the same path with 40 x 32 features and the imagenet layout (BC-ResNet: its own)"}


# ---------------------------------------------------------------------------------- streaming


def streaming(bundles: list, quick: bool) -> dict:
    import bench_stream

    audio = bench_stream.stream_audio(0.5 if quick else 2.0)
    rows = [{"bundle": Path(b).name, **bench_stream.detector_cost(str(b), audio, repeats=1 if quick else 3),
             "features_us": bench_stream.features_cold(str(b), audio, hops=100 if quick else 400)} for b in bundles]
    return {"rows": rows, "note": "100 ms hop, one thread; overhead: the detector's time beyond its model runs (timed inside "
                                  "the stream), over them; also against the model run alone on the same features; one "
                                  "hop's features (median) warm, right after a model run and right after reading 8 MB: "
                                  "a slowdown after the model run that the 8 MB read does not cause is the core's state "
                                  "after the model, not data evicted from the caches"}


def browser(bundles: list, quick: bool) -> dict:
    import bench_browser

    served = [b for b in bundles if "onnx_e2e_int8" in load_bundle(b).artifacts]
    if not served:
        return {"absent": "no bundle has an onnx_e2e_int8 artifact"}
    bundle = served[-1]  # the cheapest of the shipped ones
    if quick:
        return bench_browser.measure(str(bundle), 3.0, thread_counts=(1,), artifacts=("onnx_e2e_int8",))
    return bench_browser.measure(str(bundle), 30.0)


# ---------------------------------------------------------------------------------- footprint


def _installed_mb(requirement_names: list) -> dict:
    """Bytes on disk of distributions and everything they require, from this environment's metadata."""
    seen, todo = set(), [n.lower() for n in requirement_names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
    total = 0
    for name in seen:
        for f in importlib.metadata.distribution(name).files or []:
            try:
                total += f.locate().stat().st_size
            except OSError:
                pass
    return {"packages": len(seen), "mb": total / 1e6}


# The seed's path as its own process, for its memory: librosa features and eager torch fp32.
TORCH_PATH = """
import sys
sys.path[:0] = [{tools!r}, {repo!r}]
import bench
import torch
from kws_runtime import FeatureSpec
from kws_train.recipe import TASK_LABELS
torch.set_num_threads(1)
run = bench._seed_path(sys.argv[1], sys.argv[2], FeatureSpec.preset("fine"), list(TASK_LABELS["12"]))
for path in sys.argv[3:]:
    run(path)
""".format(tools=str(TOOLS), repo=str(REPO))


def footprint(bundle: Path, files: list, quick: bool) -> dict:
    runs = 2 if quick else 5
    imports = {m: bench_runtime.import_seconds(m, runs) for m in ("kws_runtime", "onnxruntime", "torch")}
    rss, seconds, _ = bench_runtime.predict_peak_rss(bundle, files[:64])
    manifest = load_bundle(bundle).model
    torch_rss, torch_seconds = bench_runtime.peak_rss([sys.executable, "-c", TORCH_PATH, manifest["architecture"],
                                                        manifest["variant"], *map(str, files[:64])])
    if quick:
        runtime = ["numpy", "onnxruntime", "soundfile", "soxr"]
        training = runtime + ["torch", "librosa", "onnx", "onnxscript", "thop", "tqdm", "matplotlib", "espeakng-loader"]
        installed = {"runtime": _installed_mb(runtime), "training": _installed_mb(training)}
        note = "the files of the runtime's and of the training install's distributions in this environment"
    else:
        installed = {"runtime": _venv_install_mb(["."]), "training": _venv_install_mb(["-r", "requirements-ci.txt", ".[train]"])}
        note = "two fresh virtualenvs, `pip install .` and `pip install -r requirements-ci.txt '.[train]'`, their size beyond an empty one's"
    return {"import_s": imports, "predict_peak_rss_mb": rss / 1e6, "predict_seconds": seconds, "predict_files": len(files[:64]),
            "torch_path_peak_rss_mb": torch_rss / 1e6, "torch_path_seconds": torch_seconds, "installed": installed, "note": note}


def _venv_install_mb(pip_args: list) -> dict:
    """Size of what ``pip install PIP_ARGS`` (run in the repository) puts into a new virtualenv."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")

        def listed() -> int:
            out = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
            return len(json.loads(out.stdout))

        empty, empty_packages = _tree_bytes(venv), listed()
        start = time.perf_counter()
        subprocess.run([python, "-m", "pip", "install", "-q", *pip_args], cwd=REPO, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        return {"packages": listed() - empty_packages, "mb": (_tree_bytes(venv) - empty) / 1e6, "install_s": seconds}


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


# ------------------------------------------------------------------------------ training data


def training_data(data: Path, quick: bool) -> dict:
    import bench_data

    limit = 256 if quick else 1024
    rows = bench_data.measure_pipeline(data, "fine", batch_size=64, workers=2, epochs=1 if quick else 3, limit=limit)
    base = rows[0][1]
    return {"rows": [{"pipeline": n, "clips_per_s": r, "cpu_ms_per_clip": 1e3 * c, "vs_baseline": r / base} for n, r, c in rows],
            "note": f"fine preset (the training default), the first {limit} clips, batch 64, CPU; the cached pipeline "
                    "on one torch thread, best of its epochs; the baseline's 2 worker processes use both cores"}


# ---------------------------------------------------------------------------------------- GPU


def gpu() -> dict:
    import onnxruntime
    import torch

    if not torch.cuda.is_available():
        return {"rows": [], "absent": "no CUDA device on this machine"}
    import bench_train

    from kws_train.dataset import background_noise

    noise = background_noise(REAL_DATA) or [np.zeros(16000, np.float32)]
    rows = [{"card": torch.cuda.get_device_name(), "model": a, "train_clips_per_s": bench_train.bench_one(
        a, "default", FeatureSpec.preset("fine"), noise, batch=128, steps=10, warmup=3, device="cuda", amp="auto",
        channels_last=True)} for a in ("resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "bc_resnet_3")]
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return {"rows": rows, "onnxruntime_cuda": cuda or "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"}


# ---------------------------------------------------------------------------------- the table


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _where_time_goes(x: dict) -> str:
    model_share = x["model_ms"] / (x["load_ms"] + x["features_ms"] + x["model_ms"])
    return (f"- {x['model']}: onnxruntime's int8 run is {100 * model_share:.0f} % of the runtime's steps "
            f"({x['model_ms']:.2f} ms; decoding {x['load_ms']:.2f}, log-mel {x['features_ms']:.2f}); the seed path spends "
            f"{x['seed_model_ms']:.2f} ms in eager torch, {x['seed_load_ms']:.2f} in librosa.load and "
            f"{x['seed_features_ms']:.2f} in librosa's features. With decoding and features free the runtime could be "
            f"at most {x['seed_path_ms'] / x['model_ms']:.1f}x faster than the seed path: the model run bounds the ratio.")


def _browser_lines(b: dict) -> list:
    if "absent" in b:
        return [f"Absent: {b['absent']}."]
    d = b["download"]
    lines = [f"{b['bundle']}, the page's file picker over {b['audio_s']:g} s of audio in headless Chromium; model time per "
             f"100 ms hop (`session.run`), against `kws stream`'s detector on the same artifact, one thread, taking turns.", ""]
    lines += _table(["artifact", "browser threads", "browser ms per hop (median)", "p90", "kws stream ms per hop", "browser / kws stream",
                     "page ready s"],
                    [[x["artifact"], x["threads"], f"{x['median_ms']:.2f}", f"{x['p90_ms']:.2f}", f"{x['kws_stream_ms']:.2f}",
                      f"{x['median_ms'] / x['kws_stream_ms']:.1f}x", f"{x['ready_s']:.1f}"] for x in b["rows"]])
    files = ", ".join(f"{name} {size / 1e6:.2f}" for name, size in d["files"].items())
    return lines + ["", f"`kws stream`'s default (onnx_int8 on incremental features): {b['kws_stream_default_ms']:.2f} ms per hop. "
                        f"Page download {d['total_mb']:.1f} MB uncompressed (MB: {files}); the WebAssembly file is "
                        f"{d['wasm_gzip_mb']:.1f} MB gzipped. Same events in every browser run: {b['same_events_every_run']}."]


def markdown(r: dict) -> str:
    m = r["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    out = [f"# Benchmarks ({'quick subset' if r['quick'] else 'full run'}, {r['date']})", "",
           f"Regenerate with `{r['command']}`. Machine: {m['cpu']} ({m['arch']}), {m['cores']} cores, "
           f"ISA {' '.join(m['isa']) or 'none of note'}; load average {m['load_before']} before, {m['load_after']} after; "
           f"Python {m['python']}, {versions}.", "", "## Features: `log_mel` against librosa and the rfft floor", ""]
    out += _table(["preset", "shape", "mode", "kws_runtime us/clip", "librosa us/clip", "speed-up", "max diff dB", "rfft floor us",
                   "log_mel / floor"],
                  [[x["preset"], x["shape"], x["mode"], f"{x['kws_runtime_us']:.0f}", f"{x['librosa_us']:.0f}", f"{x['speedup']:.1f}x",
                    f"{x['max_diff_db']:.1e}", f"{x['rfft_floor_us']:.0f}", f"{x['vs_floor']:.2f}" if x["vs_floor"] else ""]
                   for x in r["features"]["rows"]])
    out += ["", "## Inference per artifact", "", r["inference"]["note"] + ".", ""]
    out += _table(["bundle", "artifact", "format", "precision", "size MB", "latency ms", "clips/s at batch 64"],
                  [[x["bundle"], x["artifact"], x["format"], x["precision"], f"{x['size_mb']:.2f}", f"{x['latency_ms']:.3f}",
                    f"{x['throughput_clips_per_s']:.0f}"] for x in r["inference"]["rows"]])
    out += ["", "## End to end: file to label", "", r["end_to_end"]["note"] + ".", ""]
    out += _table(["model", "runtime ms", "steps in one loop ms", "overhead", "seed path ms", "vs seed path",
                   "seed original ms", "vs seed original", "load / features / model ms, each alone",
                   "seed: load / features / model ms"],
                  [[x["model"], f"{x['runtime_ms']:.2f}", f"{x['steps_ms']:.2f}", f"{100 * x['overhead']:+.1f}%",
                    f"{x['seed_path_ms']:.2f}", f"{x['vs_seed_path']:.1f}x", f"{x['seed_original_ms']:.2f}",
                    f"{x['vs_seed_original']:.1f}x", f"{x['load_ms']:.2f} / {x['features_ms']:.2f} / {x['model_ms']:.2f}",
                    f"{x['seed_load_ms']:.2f} / {x['seed_features_ms']:.2f} / {x['seed_model_ms']:.2f}"]
                   for x in r["end_to_end"]["rows"]])
    out += ["", "Where the time goes:", ""] + [_where_time_goes(x) for x in r["end_to_end"]["rows"]]
    out += ["", "## Streaming", "", r["streaming"]["note"] + ".", ""]
    out += _table(["bundle", "real-time factor", "ms per hop", "model ms per hop, in the stream / alone", "overhead",
                   "against the model alone", "detector alone us per hop",
                   "features us per hop: warm / after the model / after 8 MB", "incremental features"],
                  [[x["bundle"], f"{x['real_time_factor']:.4f}", f"{x['ms_per_hop']:.2f}",
                    f"{x['model_in_stream_ms_per_hop']:.2f} / {x['model_ms_per_hop']:.2f}",
                    f"{100 * x['overhead_vs_model']:.1f}%", f"{100 * x['overhead_vs_model_alone']:.1f}%",
                    f"{1e3 * x['detector_alone_ms_per_hop']:.0f}",
                    " / ".join(f"{x['features_us'][k]:.0f}" for k in ("warm", "after_model", "after_8mb_read")),
                    x["incremental"]]
                   for x in r["streaming"]["rows"]])
    out += ["", "## In the browser (`kws serve`)", ""] + _browser_lines(r["browser"])
    f = r["footprint"]
    imports = ", ".join(f"`import {k}` {v:.3f} s" if v is not None else f"`import {k}` not installed" for k, v in f["import_s"].items())
    out += ["", "## Footprint", "", f"Import time (fresh interpreter, best of several): {imports}.", "",
            f"On {f['predict_files']} files: `kws predict` peak RSS {f['predict_peak_rss_mb']:.0f} MB, {f['predict_seconds']:.2f} s; "
            f"the seed's path (librosa + eager torch, same model) {f['torch_path_peak_rss_mb']:.0f} MB, {f['torch_path_seconds']:.2f} s.", "",
            f"Installed size, measured as {f['note']}: runtime {f['installed']['runtime']['mb']:.0f} MB in {f['installed']['runtime']['packages']} "
            f"distributions, training {f['installed']['training']['mb']:.0f} MB in {f['installed']['training']['packages']}.",
            "", "## Training data pipeline", "", r["training_data"]["note"] + ".", ""]
    out += _table(["pipeline", "clips/s", "vs baseline", "CPU ms/clip"],
                  [[x["pipeline"], f"{x['clips_per_s']:.0f}", f"{x['vs_baseline']:.1f}x", f"{x['cpu_ms_per_clip']:.2f}"]
                   for x in r["training_data"]["rows"]])
    out += ["", "## GPU", ""]
    out += [f"Absent: {r['gpu']['absent']}."] if "absent" in r["gpu"] else _table(
        ["card", "model", "training clips/s (mixed precision)"],
        [[x["card"], x["model"], f"{x['train_clips_per_s']:.0f}"] for x in r["gpu"]["rows"]])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())

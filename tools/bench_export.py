"""Compare ONNX int8 settings of one checkpoint: accuracy, agreement, size and latency.

    python tools/bench_export.py runs/NAME/best.pt --data ../speech_commands_real
    python tools/bench_export.py best.pt --data DATA --activations int8 uint8 --granularity per-channel per-tensor

Each setting is exported with `export.export_bundle` (formats onnx_fp32 and onnx_int8, no
automatic selection) into a folder under --out; then every model is timed at batch 1 on one
thread with the models taking turns, so that load on a shared machine affects them alike.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="dataset root (calibration: training split, scoring: testing split)")
    p.add_argument("--out", default="runs/bench_export", help="folder for the bundles (default runs/bench_export)")
    p.add_argument("--activations", nargs="+", default=["uint8", "int8"], choices=["uint8", "int8"])
    p.add_argument("--granularity", nargs="+", default=["per-channel"], choices=["per-channel", "per-tensor"])
    p.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--calib-clips", type=int, default=500)
    p.add_argument("--test-clips", type=int)
    p.add_argument("--runs", type=int, default=200, help="timed runs per model")
    args = p.parse_args(argv)

    import torch

    from kws_export import OnnxQuantConfig, export_bundle
    from kws_export.scorecard import EvalSet, median_latencies_ms, onnx_runner

    torch.set_num_threads(1)
    rows, runners, test = [], {}, None
    for activations, granularity in itertools.product(args.activations, args.granularity):
        name = f"{activations}-{granularity}"
        config = OnnxQuantConfig(method=args.method, per_channel=granularity == "per-channel", activations=activations)
        print(f"{name}: exporting", file=sys.stderr, flush=True)
        report = export_bundle(
            args.checkpoint, Path(args.out) / name, args.data, args.data, ["onnx_fp32", "onnx_int8"],
            calib_clips=args.calib_clips, test_clips=args.test_clips, onnx_quant=config,
            select_quantization=False, latency_runs=0, force=True, threads=1,
        )
        if not report.ok:
            print(f"{name}: failed: {report.failed}", file=sys.stderr)
            continue
        for row in report.scorecard:
            if row["artifact"] == "onnx_fp32" and "fp32" in runners:
                continue
            key = "fp32" if row["artifact"] == "onnx_fp32" else name
            runners[key] = onnx_runner(Path(args.out) / name / row["file"])
            rows.append((key, row))
        if test is None:
            from kws_runtime.bundle import load_bundle

            spec = load_bundle(Path(args.out) / name).spec
            from kws_runtime import load_audio

            files = sorted(Path(args.data).glob("*/*_nohash_*.wav"))[::50][:50]
            test = EvalSet(files, [0] * len(files), spec, load_audio)
    if not runners:
        return 1
    latency = median_latencies_ms(runners, test, runs=args.runs)
    fp32_ms = latency["fp32"]
    fp32_size = next(r["size"] for k, r in rows if k == "fp32")
    print("| ONNX model | accuracy | agreement with fp32 | size vs fp32 | latency (ms) | speed-up vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, row in rows:
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
        agree = "-" if row["agreement"] is None else f"{100 * row['agreement']:.2f}%"
        print(f"| {key} | {acc} | {agree} | {row['size'] / fp32_size:.3f}x | {latency[key]:.3f} | {fp32_ms / latency[key]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

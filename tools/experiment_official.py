"""The official protocol as one command: train, export, score on clips and on streams.

Trains on the training split of `speech_commands_more` (choosing the epoch on its validation
split), exports ONNX fp32 and int8 (calibrated on its training split), scores both on every
clip of `speech_commands_real` (206 speakers of the official test set, none heard in
training) and, with ``--stream-minutes``, runs `kws evaluate-stream` on streams built from
the same speakers. Everything after ``--`` goes to ``kws-train``; an interrupted run is
resumed, a finished one is not repeated.

    python tools/experiment_official.py shufflenet-partial20 --stream-minutes 15 -- -m shufflenet -e 12 --lr 1e-2 --partial-share 0.2
    python tools/experiment_official.py bcresnet3 -- -m bcresnet3
    python tools/experiment_official.py bcresnet8 -- -m bcresnet8 -g    # on the GPU (-g, as for kws-train)

Writes runs/official/NAME (the run), runs/eval-bundles/NAME (the bundle) and
runs/streams/NAME (the streams and report.json), and prints one row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_bundles import correct, test_clips  # noqa: E402
from kws_export import cli as export_cli  # noqa: E402
from kws_runtime import Predictor  # noqa: E402
from kws_runtime.stream_eval import evaluate  # noqa: E402
from kws_train import cli as train_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRAIN_DATA, TEST_DATA = SHARED / "speech_commands_more", SHARED / "speech_commands_real"


def train(run: Path, options: list) -> None:
    summary = run / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("finished"):
        return
    resume = ["--resume"] if (run / "last.pt").is_file() else []
    status = train_cli.main(["-d", str(TRAIN_DATA), "-t", "--out", str(run), "--threads", "1", *resume, *options])
    if status:
        raise SystemExit(status)


def score(bundle: Path) -> dict:
    """Accuracy of a bundle's ``onnx_fp32`` and ``onnx_int8`` on the 2,975 test examples every
    run shares."""
    accuracy = {}
    for name in ("onnx_fp32", "onnx_int8"):
        predictor = Predictor(bundle, artifact=name, threads=1)
        accuracy[name] = float(correct(predictor, *test_clips(predictor.spec, TEST_DATA)).mean())
    return accuracy


def export(run: Path, bundle: Path) -> dict:
    """Export (unless the bundle is newer than best.pt) and `score` the bundle."""
    manifest = bundle / "manifest.json"
    if not manifest.is_file() or manifest.stat().st_mtime < (run / "best.pt").stat().st_mtime:
        status = export_cli.main([str(run / "best.pt"), "--out", str(bundle), "--calib", str(TRAIN_DATA), "--test",
                                  str(TEST_DATA), "--test-all", "--formats", "onnx_fp32", "onnx_int8", "--threads",
                                  "1", "--force", "-q"])
        if status:
            raise SystemExit(status)
    return score(bundle)


def streams(bundle: Path, out: Path, minutes: float) -> dict:
    """At 10 dB: hits and false alarms per hour at the default threshold, and the best hit
    rate at or under 2 false alarms per hour."""
    at_10 = evaluate(bundle, TEST_DATA, out, minutes=minutes, log=lambda line: print(line, file=sys.stderr))["snr"]["10"]
    within = [r for r in at_10["sweep"] if r["false_alarms_per_hour"] <= 2.0]
    best = max(within, key=lambda r: r["hit_rate"]) if within else None
    return {"default": at_10["default"], "best_at_2_fa_per_hour": best}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s NAME [--stream-minutes M] -- KWS_TRAIN_OPTIONS")
    p.add_argument("name", help="the run's name (folder under runs/official, runs/eval-bundles, runs/streams)")
    p.add_argument("--stream-minutes", type=float, help="also score the bundle on streams this long per SNR")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, options = p.parse_args(argv[:cut]), argv[cut + 1:]
    run, bundle = REPO / "runs" / "official" / args.name, REPO / "runs" / "eval-bundles" / args.name
    train(run, options)
    accuracy = export(run, bundle)
    row = f"{args.name}: clips fp32 {100 * accuracy['onnx_fp32']:.1f} %, int8 {100 * accuracy['onnx_int8']:.1f} %"
    if args.stream_minutes:
        found = streams(bundle, REPO / "runs" / "streams" / args.name, args.stream_minutes)
        default, best = found["default"], found["best_at_2_fa_per_hour"]
        row += (f"; 10 dB at threshold {default['threshold']:g}: hits {100 * default['hit_rate']:.0f} %, "
                f"{default['false_alarms_per_hour']:.0f} FA/h")
        row += (f"; at <= 2 FA/h: {100 * best['hit_rate']:.0f} % (threshold {best['threshold']:g})" if best
                else "; never at or under 2 FA/h")
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

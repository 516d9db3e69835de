"""Accuracy of each model, variant and feature preset on held-out real speakers (12-class task).

The real Speech Commands sample beside the checkout (3,216 clips, 206 speakers, all from the
official test set) is re-split by speaker with `kws_train.dataset.split_by_speaker`
(salt ``kws-real-1``, 10% validation, 10% test speakers: 2,416 / 243 / 316 examples of the
12-class task), so no speaker is in two splits. Optionally synthetic speech from
``kws-data synth`` joins the training split only (validation and test stay real).

    python tools/experiment_accuracy.py --runs resnet18:default:fine resnet18:imagenet:fine
    python tools/experiment_accuracy.py --runs resnet18:default:fine --synth runs/synth-commands runs/synth-others
    python tools/experiment_accuracy.py --report          # table of every finished run

Each run trains with `kws_train.trainer.train` into ``<out>/<model>-<variant>-<features>[-synth]``
and resumes from its last.pt if it was interrupted; a finished run is not repeated. The report
reads the runs' summary.json files: best validation epoch, validation and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kws_runtime.spec import PRESETS, canonical_preset  # noqa: E402
from kws_train.models import ARCHITECTURES, canonical_architecture, canonical_variant, model_variants  # noqa: E402
from kws_train.config import TrainConfig  # noqa: E402
from kws_train.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "speech_commands_real"
SALT = "kws-real-1"


def run_name(architecture: str, variant: str, features: str, synth: bool, seed: int = 0) -> str:
    return f"{architecture}-{variant}-{features}" + ("-synth" if synth else "") + (f"-seed{seed}" if seed else "")


def parse_run(text: str):
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL:VARIANT:FEATURES, e.g. resnet18:default:fine")
    architecture, variant, features = parts
    try:
        return canonical_architecture(architecture), canonical_variant(variant), canonical_preset(features)
    except ValueError as error:  # names the choices
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def report(out: Path) -> str:
    rows = []
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        rows.append((
            s["architecture"], s["variant"], s["features"], "real+synth" if "-synth" in path.parent.name else "real",
            str(s.get("seed", 0)),
            f"{s['epochs_run']}{'' if s['finished'] else '*'}", str(s["best_epoch"]),
            f"{100 * s['best_val_accuracy']:.1f}", "-" if not s["test"] else f"{100 * s['test']['accuracy']:.1f}",
            "-" if not s["test"] else str(s["test"]["count"]),
            "-" if s.get("train_samples_per_s") is None else f"{s['train_samples_per_s']:.0f}",
        ))
    header = ("model", "variant", "features", "train data", "seed", "epochs", "best", "val %", "test %", "test clips", "clips/s")
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + ("\n(* stopped before its last epoch)" if any(r[5].endswith("*") for r in rows) else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[],
                        help="MODEL:VARIANT:FEATURES triples (default: every model and variant on both presets)")
    parser.add_argument("--data", default=str(REAL_DATA), help="real Speech Commands root (default: the shared sample)")
    parser.add_argument("--synth", nargs="+", metavar="DIR",
                        help="also train on these synthetic datasets (kws-data synth output)")
    parser.add_argument("--out", default=str(REPO / "runs" / "accuracy"), help="parent folder of the runs")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    parser.add_argument("--report", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report:
        print(report(out))
        return 0
    runs = args.runs or [(a, v, f) for f in PRESETS for a in ARCHITECTURES for v in model_variants(a)]
    for architecture, variant, features in runs:
        name = run_name(architecture, variant, features, bool(args.synth), args.seed)
        folder = out / name
        summary = folder / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("finished"):
            print(f"{name}: done", flush=True)
            continue
        config = TrainConfig(
            data=args.data, out=str(folder), architecture=architecture, variant=variant, task="12",
            features=features, epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed,
            split="speaker", split_salt=SALT, validation_fraction=0.1, testing_fraction=0.1,
            # the draw these runs were measured with, before the per-word draw became the default
            unknown_share=0.1, unknown_draw="random",
            extra_train=args.synth or [], cache_dir=str(out / "cache"),
            threads=args.threads, resume=(folder / "last.pt").is_file(), quiet=False,
        )
        tick = time.time()
        print(f"{name}: training ({json.dumps({k: v for k, v in config.to_dict().items() if k in ('epochs', 'batch_size', 'lr')})})", flush=True)
        result = train(config)
        test = result.test.accuracy if result.test else float("nan")
        print(f"{name}: best epoch {result.best_epoch}, val {100 * result.best_val_accuracy:.2f}%, "
              f"test {100 * test:.2f}% ({(time.time() - tick) / 60:.1f} min)", flush=True)
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

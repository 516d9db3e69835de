"""A learning curve on the official protocol: how accuracy on unseen speakers grows with the
number of training speakers, and how much data a target accuracy would take.

Trains one recipe on nested shares of the training speakers of `speech_commands_more`
(``kws-train --training-speakers``; a smaller share's speakers are a subset of a larger
one's), scores each on the same 2,975 examples of `speech_commands_real`, and fits the usual
power law to the error, ``error = a * examples ** -b`` (a straight line in log-log; Hestness
et al. 2017, "Deep Learning Scaling is Predictable, Empirically", arXiv:1712.00409).

    python tools/learning_curve.py bcresnet3 --shares 0.25 0.5 1 -- -m bcresnet3 -e 40
    python tools/learning_curve.py bcresnet3 --full pretrained/bc-resnet-3 -- -m bcresnet3 -e 40

Each share is an official-protocol run (`experiment_official.py`): share 1 is the run NAME
itself (an existing one is reused), or ``--full BUNDLE``, a bundle trained with the same
recipe on every training speaker; share S is the run NAME-speakersPP (PP = 100 S). Every run
keeps the recipe's epochs, so a smaller share also takes fewer optimizer steps: if that leaves
it short of training, the fitted slope is too steep and the data a target needs is
underestimated, never overestimated.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_official import REPO, TRAIN_DATA, export, score, train  # noqa: E402
from kws_runtime.spec import FeatureSpec  # noqa: E402
from kws_train.dataset import SILENCE, UNKNOWN, speaker_of  # noqa: E402
from kws_train.recipe import RunRecipe  # noqa: E402


def run_name(name: str, share: float) -> str:
    return name if share == 1 else f"{name}-speakers{round(100 * share):02d}"


def training_set(share: float) -> tuple:
    """(examples, speakers) of the training split at ``share`` (the default task composition)."""
    recipe = RunRecipe(spec=FeatureSpec.preset("fine"), training_speakers=share)
    examples = recipe.task_split(TRAIN_DATA, "training").examples
    return len(examples), len({speaker_of(e.path) for e in examples if e.label not in (SILENCE, UNKNOWN)})


def fit_power_law(examples: list, errors: list) -> tuple:
    """``(a, b)`` of ``error = a * examples ** -b``, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(examples), np.log(errors), 1)
    return math.exp(intercept), -slope


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s NAME [--shares S ...] [--targets A ...] -- KWS_TRAIN_OPTIONS")
    p.add_argument("name", help="the full run's name; the shares' runs are NAME-speakersPP")
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="shares of the training speakers, each in (0, 1] (default 0.25 0.5 1)")
    p.add_argument("--full", type=Path, metavar="BUNDLE",
                   help="share 1: this bundle, trained with the same recipe on every training speaker")
    p.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.96],
                   help="accuracies to find the training-set size for (default 0.95 0.96)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, options = p.parse_args(argv[:cut]), argv[cut + 1:]
    if len(set(args.shares)) < 2 or not all(0 < s <= 1 for s in args.shares):
        p.error("--shares needs at least two different shares in (0, 1]")
    if args.full is not None and not (args.full / "manifest.json").is_file():
        p.error(f"--full {args.full}: not a bundle (no manifest.json)")
    rows = []
    for share in sorted(set(args.shares)):
        name = run_name(args.name, share)
        if share == 1 and args.full is not None:
            name, accuracy = str(args.full), score(args.full)
        else:
            run, bundle = REPO / "runs" / "official" / name, REPO / "runs" / "eval-bundles" / name
            train(run, options if share == 1 else [*options, "--training-speakers", f"{share:g}"])
            accuracy = export(run, bundle)
        examples, speakers = training_set(share)
        rows.append((share, name, speakers, examples, accuracy["onnx_fp32"], accuracy["onnx_int8"]))
        print(f"{name}: {speakers} speakers, {examples} examples: fp32 {100 * accuracy['onnx_fp32']:.1f} %, "
              f"int8 {100 * accuracy['onnx_int8']:.1f} %", flush=True)
    a, b = fit_power_law([r[3] for r in rows], [1 - r[4] for r in rows])
    print(f"\n| share | run | speakers | training examples | fp32 | int8 | fit (fp32) |\n|---:|---|---:|---:|---:|---:|---:|")
    for share, name, speakers, examples, fp32, int8 in rows:
        print(f"| {share:g} | {name} | {speakers:,} | {examples:,} | {100 * fp32:.1f} % | {100 * int8:.1f} % "
              f"| {100 * (1 - a * examples ** -b):.1f} % |")
    full = max(r[3] for r in rows)
    print(f"\nfp32 error = {a:.3g} * examples ^ -{b:.3f}: each doubling of the data removes "
          f"{100 * (1 - 2 ** -b):.0f} % of the errors")
    for target in args.targets:
        needed = (a / (1 - target)) ** (1 / b)
        print(f"{100 * target:g} % needs about {needed:,.0f} training examples, {needed / full:.1f} times the largest run's")
    return 0


if __name__ == "__main__":
    sys.exit(main())

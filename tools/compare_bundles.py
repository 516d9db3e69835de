"""Paired comparison of bundles on the same clips: accuracy, the clips each fixed and broke
against the first bundle, and an exact sign test on those.

Two models scored on the same 2,975 clips differ by much less noise than two independent
accuracies suggest: only the clips one gets right and the other wrong carry information
(McNemar's test; with few such clips, the exact binomial sign test used here).

    python tools/compare_bundles.py pretrained/shufflenet-v2-0.5x runs/eval-bundles/shufflenet-30ep
    python tools/compare_bundles.py BASE OTHER... --artifact onnx_fp32 --data ../shared/data/speech_commands_real
    python tools/compare_bundles.py pretrained/bc-resnet-3 pretrained/shufflenet-v2-0.5x --ensemble

``--ensemble`` adds a row for the average of every bundle's probabilities (bundles with the
same labels), compared against the first. ``--by-word`` adds each bundle's `_unknown_` recall
for every word that feeds the class: which other words a model takes for commands.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kws_runtime import Predictor  # noqa: E402
from kws_runtime.spec import FeatureSpec  # noqa: E402
from kws_train.dataset import UNKNOWN, load_example  # noqa: E402
from kws_train.recipe import RunRecipe  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands_real"


def test_clips(spec: FeatureSpec, data: Path) -> tuple:
    """Every example of the 12-class task of ``data``: ``(clips (n, samples), labels)``."""
    examples = RunRecipe(spec=spec).task_split(data, "all").examples
    return np.stack([load_example(e, spec) for e in examples]), [e.label for e in examples]


def source_words(spec: FeatureSpec, data: Path) -> list:
    """The word folder of every example of `test_clips` (``_background_noise_`` for silence)."""
    return [Path(e.path).parent.name for e in RunRecipe(spec=spec).task_split(data, "all").examples]


def probabilities(predictor: Predictor, clips: np.ndarray, batch: int = 64) -> np.ndarray:
    """``(n, labels)`` for ``clips`` ``(n, samples)``."""
    return np.concatenate([predictor.probabilities(clips[i : i + batch]) for i in range(0, len(clips), batch)])


def correct(predictor: Predictor, clips: np.ndarray, labels: list, scores: np.ndarray = None) -> np.ndarray:
    """Which clips ``predictor`` (or ``scores``, probabilities in its label order) labels right: bool ``(n,)``."""
    scores = probabilities(predictor, clips) if scores is None else scores
    return np.array(predictor.labels)[scores.argmax(axis=1)] == np.array(labels)


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact binomial p-value of ``fixed`` against ``broken`` changed clips."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", help="the first is the baseline")
    p.add_argument("--artifact", default="onnx_int8", help="artifact of every bundle to score (default onnx_int8)")
    p.add_argument("--data", type=Path, default=REAL, help="a Speech Commands folder of unseen speakers")
    p.add_argument("--ensemble", action="store_true", help="also score the average of the bundles' probabilities")
    p.add_argument("--by-word", action="store_true", help="also print _unknown_ recall for each word that feeds it")
    args = p.parse_args()
    rows, names = [], None  # (bundle, which clips it gets right, its probabilities); the labels
    loaded = {}  # bundles with the same features score the same clips: load them once
    for bundle in args.bundles:
        predictor = Predictor(bundle, artifact=args.artifact, threads=1)
        names = list(predictor.labels) if names is None else names
        if list(predictor.labels) != names:
            raise SystemExit(f"{bundle}: its labels differ from {args.bundles[0]}'s")
        if predictor.spec not in loaded:
            loaded[predictor.spec] = test_clips(predictor.spec, args.data)
        clips, labels = loaded[predictor.spec]
        scores = probabilities(predictor, clips)
        if rows and len(scores) != len(rows[0][2]):
            raise SystemExit(f"{bundle}: scored {len(scores)} clips, the baseline {len(rows[0][2])}: other features or data")
        rows.append((bundle, correct(predictor, clips, labels, scores), scores))
    if args.ensemble:
        average = sum(scores for _, _, scores in rows) / len(rows)
        rows.append(("ensemble (average of the above)", correct(predictor, clips, labels, average), average))
    base = rows[0][1]
    print(f"{'bundle':<40} {'accuracy':>9} {'change':>7} {'fixed':>6} {'broken':>6} {'p':>7}")
    print(f"{rows[0][0]:<40} {100 * base.mean():8.2f}%")
    for name, right, _ in rows[1:]:
        fixed, broken = int((right & ~base).sum()), int((base & ~right).sum())
        print(f"{name:<40} {100 * right.mean():8.2f}% {100 * (right.mean() - base.mean()):+6.2f} {fixed:6d} {broken:6d} "
              f"{sign_test(fixed, broken):7.3f}")
    if args.by_word:
        print_unknown_recall_by_word(rows, labels, source_words(predictor.spec, args.data))
    return 0


def print_unknown_recall_by_word(rows: list, labels: list, words: list) -> None:
    """One line per word whose clips are labelled `_unknown_`: its clip count and each row's recall."""
    words, unknown = np.array(words), np.array(labels) == UNKNOWN
    print(f"\n_unknown_ recall by word ({unknown.sum()} clips); columns as the rows above")
    for word in sorted(set(words[unknown])):
        mask = unknown & (words == word)
        recalls = " ".join(f"{100 * right[mask].mean():6.1f}%" for _, right, _ in rows)
        print(f"{word:<10} {mask.sum():4d}  {recalls}")


if __name__ == "__main__":
    sys.exit(main())

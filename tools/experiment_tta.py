"""Test-time shift averaging: its accuracy gain on unseen speakers beside its cost.

Each clip of the 12-class task of a test folder is scored as recorded and moved earlier and
later by the given shifts (zero-filled, as training's time shift does); the class
probabilities of the views are averaged. The cost is one model run per view.

    python tools/experiment_tta.py pretrained/bc-resnet-3 pretrained/shufflenet-v2-0.5x
    python tools/experiment_tta.py BUNDLE --shifts-ms 50 100 --data ../shared/data/speech_commands_real
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_bundles import probabilities as probabilities_of, test_clips  # noqa: E402
from kws_runtime import Predictor  # noqa: E402
from kws_train.dataset import moved  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands_real"


def view_probabilities(predictor: Predictor, clips: np.ndarray, shifts_ms) -> dict:
    """``{shift ms: probabilities (n, labels)}`` and the seconds each view took."""
    rate = predictor.spec.sample_rate
    probabilities, seconds = {}, {}
    for ms in shifts_ms:
        start = time.perf_counter()
        probabilities[ms] = probabilities_of(predictor, moved(clips, int(round(ms * rate / 1000))))
        seconds[ms] = time.perf_counter() - start
    return probabilities, seconds


def report(bundle: str, data: Path, shifts_ms) -> list:
    predictor = Predictor(bundle, threads=1)
    clips, names = test_clips(predictor.spec, data)
    truth = np.array([list(predictor.labels).index(name) for name in names])
    views = sorted({0.0} | {s for ms in shifts_ms for s in (-ms, ms)})
    probabilities, seconds = view_probabilities(predictor, clips, views)
    alone = probabilities[0.0].argmax(1) == truth
    rows = []
    for k in range(len(shifts_ms) + 1):
        for chosen in itertools.combinations(shifts_ms, k):
            used = sorted({0.0} | {s for ms in chosen for s in (-ms, ms)})
            right = np.mean([probabilities[v] for v in used], axis=0).argmax(1) == truth
            cost = sum(seconds[v] for v in used) / seconds[0.0]
            # the clips the averaging fixed and broke: what a paired comparison rests on
            rows.append((Path(bundle).name, " ".join(f"{v:+g}" for v in used), float(right.mean()), len(truth),
                         int((right & ~alone).sum()), int((alone & ~right).sum()), cost))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--data", type=Path, default=REAL, help="a Speech Commands folder of unseen speakers")
    p.add_argument("--shifts-ms", type=float, nargs="+", default=[50.0, 100.0],
                   help="each adds two views, this far earlier and later")
    args = p.parse_args()
    print(f"{'bundle':<22} {'views (ms)':<24} {'accuracy':>9} {'95% +-':>7} {'fixed':>6} {'broken':>6} {'cost':>6}")
    for bundle in args.bundles:
        for name, views, accuracy, n, fixed, broken, cost in report(bundle, args.data, args.shifts_ms):
            half_width = 1.96 * math.sqrt(accuracy * (1 - accuracy) / n)
            print(f"{name:<22} {views:<24} {100 * accuracy:8.2f}% {100 * half_width:6.2f} {fixed:6d} {broken:6d} "
                  f"{cost:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

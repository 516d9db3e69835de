"""`tools/compare_bundles.py`: the paired table every accuracy figure in the docs comes from.

The table is checked against the shipped bundles scored here clip by clip, on a small folder of
real recordings (a few clips of each word, linked, not copied)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import compare_bundles  # noqa: E402
from kws_runtime import Predictor  # noqa: E402

BASE, OTHER = REPO / "pretrained" / "shufflenet-v2-0.5x", REPO / "pretrained" / "bc-resnet-3"
CLIPS_PER_WORD = 20


def test_sign_test_gives_exact_two_sided_binomial_tails():
    assert compare_bundles.sign_test(0, 0) == 1.0
    assert compare_bundles.sign_test(5, 0) == pytest.approx(2 / 32)
    assert compare_bundles.sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert compare_bundles.sign_test(8, 2) == compare_bundles.sign_test(2, 8)
    assert compare_bundles.sign_test(1, 1) == 1.0  # capped: both tails overlap at the middle
    assert compare_bundles.sign_test(64, 51) == pytest.approx(0.26, abs=0.005)  # a pair docs/accuracy.md reports


@pytest.fixture(scope="module")
def small_real(real_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-real")
    for folder in sorted(p for p in real_data.iterdir() if p.is_dir() and p.name != "_silence_"):
        (root / folder.name).mkdir()
        files = sorted(folder.iterdir())
        for f in files if folder.name == "_background_noise_" else files[:CLIPS_PER_WORD]:
            (root / folder.name / f.name).symlink_to(f)
    return root


def run_tool(*args) -> list:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "compare_bundles.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_the_table_matches_each_bundle_scored_clip_by_clip(small_real):
    lines = run_tool(BASE, OTHER, "--artifact", "onnx_fp32", "--data", small_real, "--ensemble", "--by-word")
    base, other = (Predictor(b, artifact="onnx_fp32", threads=1) for b in (BASE, OTHER))
    clips, labels = compare_bundles.test_clips(base.spec, small_real)
    scores = [compare_bundles.probabilities(p, clips) for p in (base, other)]
    right = [compare_bundles.correct(base, clips, labels, s) for s in scores]
    ensemble = compare_bundles.correct(base, clips, labels, (scores[0] + scores[1]) / 2)
    assert 0 < right[0].mean() < 1 and (right[0] != right[1]).any()  # a comparison with something to count

    rows = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert rows[str(BASE)] == [f"{100 * right[0].mean():.2f}%"]
    for name, mine in ((str(OTHER), right[1]), ("ensemble", ensemble)):
        values = rows[name][-5:]
        fixed, broken = int((mine & ~right[0]).sum()), int((right[0] & ~mine).sum())
        assert values[0] == f"{100 * mine.mean():.2f}%", name
        assert (int(values[2]), int(values[3])) == (fixed, broken), name
        assert float(values[4]) == pytest.approx(compare_bundles.sign_test(fixed, broken), abs=5e-4), name

    words = np.array(compare_bundles.source_words(base.spec, small_real))
    unknown = np.array(labels) == "_unknown_"
    header = next(i for i, line in enumerate(lines) if line.startswith("_unknown_ recall by word"))
    assert f"({unknown.sum()} clips)" in lines[header]
    by_word = {line.split()[0]: line.split()[1:] for line in lines[header + 1:]}
    assert set(by_word) == set(words[unknown]) and len(by_word) >= 2
    for word, values in by_word.items():
        mask = unknown & (words == word)
        assert int(values[0]) == mask.sum(), word
        expected = [f"{100 * r[mask].mean():.1f}%" for r in (*right, ensemble)]
        assert values[1:] == expected, word

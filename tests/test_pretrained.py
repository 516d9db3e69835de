"""The bundles shipped in pretrained/: valid manifests, matching checksums, a model card, and
right answers on real recordings of speakers they never heard."""

from pathlib import Path

import numpy as np
import pytest

from kws_runtime import Predictor, load_bundle
from kws_runtime.bundle import low_agreement

from bundle_builders import int8_weight_range

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
BUNDLES = sorted(p for p in PRETRAINED.iterdir() if (p / "manifest.json").is_file())
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def test_there_are_bundles_and_they_fit_in_git():
    assert BUNDLES
    total = sum(f.stat().st_size for f in PRETRAINED.rglob("*") if f.is_file())
    assert total < 25e6, f"pretrained/ holds {total / 1e6:.1f} MB"


@pytest.mark.parametrize("path", BUNDLES, ids=[p.name for p in BUNDLES])
def test_bundle_loads_verified_with_a_model_card(path):
    bundle = load_bundle(path)  # every sha256 and size
    assert {"onnx_fp32", "onnx_int8", "onnx_e2e"} <= set(bundle.artifacts)
    card = (path / "MODEL_CARD.md").read_text()
    for needed in ("speech_commands_more", "speech_commands_real", "CC-BY-4.0", "Warden", "kws-train", "kws-export"):
        assert needed in card, needed
    fp32 = bundle.artifacts["onnx_fp32"].metrics["accuracy"]
    for name, artifact in bundle.artifacts.items():
        assert low_agreement(artifact) is None, name
        assert f"{100 * artifact.metrics['accuracy']:.1f}" in card, name  # the card states what was measured
        if artifact.precision == "int8":
            assert artifact.metrics["accuracy"] >= fp32 - 0.003, name  # within 0.3 points of fp32


@pytest.mark.parametrize("path", BUNDLES, ids=[p.name for p in BUNDLES])
def test_bundle_recognises_real_speakers(path, real_data):
    clips = [sorted((real_data / word).glob("*.wav"))[:4] for word in WORDS]
    files = [f for per_word in clips for f in per_word]
    for artifact in ("onnx_int8", "onnx_e2e"):
        predictions = Predictor(path, artifact=artifact, threads=1).predict(files)
        right = np.mean([p.label == f.parent.name for p, f in zip(predictions, files)])
        assert right >= 0.8, f"{artifact}: {right:.0%} of {len(files)} real clips"


@pytest.mark.parametrize("path", BUNDLES, ids=[p.name for p in BUNDLES])
def test_int8_artifacts_decide_as_fp32_does_on_this_cpu(path, real_data):
    # Full-range int8 weights saturate in onnxruntime's kernels on x86 CPUs without VNNI, so a
    # bundle measured on one CPU could lose points on another: 7-bit weights cannot.
    files = [f for word in WORDS for f in sorted((real_data / word).glob("*.wav"))[4:28]]
    fp32 = [p.label for p in Predictor(path, artifact="onnx_fp32", threads=1).predict(files)]
    for artifact in ("onnx_int8", "onnx_e2e_int8"):
        assert int8_weight_range(path / load_bundle(path).artifacts[artifact].file) <= 64, artifact
        int8 = [p.label for p in Predictor(path, artifact=artifact, threads=1).predict(files)]
        assert np.mean(np.array(int8) == np.array(fp32)) >= 0.97, artifact

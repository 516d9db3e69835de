"""ExecuTorch artifacts: every architecture briefly trained, exported to .pte (fp32 and int8,
XNNPACK), then loaded back through ExecuTorch's own runtime and checked against the eager model.

Needs the ``mobile`` extra (``pip install -e ".[mobile]"``); without it the export tests skip
and only the test of kws-export's behaviour without ExecuTorch runs.
"""

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from kws_export import export_bundle
from kws_runtime import log_mel
from kws_runtime.bundle import load_bundle
from kws_train.checkpoint import load_checkpoint
from kws_train.dataset import build_task, index_dataset, load_example, split_by_speaker
from trained_models import SALT, SPEC, train_checkpoint, training_batch

NEEDS_EXECUTORCH = "ExecuTorch is not installed: pip install -e '.[mobile]' to run the .pte export tests"
PTE = ["executorch_fp32", "executorch_int8"]
# Lowering to XNNPACK takes a minute or more per program here, so no architecture is lowered
# twice in the suite: ShuffleNetV2's two programs are made and verified by the README's
# every-artifact export (test_readme.py), and BC-ResNet, whose many small operators make its
# lowering the slowest, goes through the same code.
ARCHITECTURES = ["resnet18", "mobilenet_v2"]


@pytest.fixture(scope="module")
def runtime():
    pytest.importorskip("executorch", reason=NEEDS_EXECUTORCH)
    with warnings.catch_warnings():  # on import: deprecations inside ExecuTorch, its experimental Python API
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="This API is experimental")
        from executorch.runtime import Runtime

    return Runtime.get()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request, runtime, real_data, tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp(request.param)
        ckpt = train_checkpoint(request.param, training_batch(real_data), tmp / "best.pt", real_data)
        report = export_bundle(ckpt, tmp / "bundle", real_data, real_data, PTE, calib_clips=48, selection_clips=24,
                               test_clips=36, latency_runs=3, threads=1)
    finally:
        torch.set_num_threads(previous)
    return ckpt, tmp / "bundle", report


@pytest.fixture(scope="module")
def test_features(real_data):
    clips = split_by_speaker(index_dataset(real_data), 0.1, 0.1, SALT)
    examples = build_task(clips, "12", "testing", root=real_data, spec=SPEC, seed=2).examples[::20][:12]
    return log_mel(np.stack([load_example(e, SPEC) for e in examples]), SPEC)[:, None]


def _run(runtime, path, x):
    method = runtime.load_program(path).load_method("forward")
    return np.concatenate([method.execute((torch.from_numpy(clip[None]),))[0].numpy() for clip in x])


def test_both_programs_are_written_listed_and_scored(exported):
    ckpt, out, report = exported
    assert report.ok, report.failed
    bundle = load_bundle(out)  # checks the sha256 of each
    assert list(bundle.artifacts) == PTE
    for name, artifact in bundle.artifacts.items():
        assert artifact.format == "executorch" and artifact.path.read_bytes()[4:8] == b"ET12"  # the .pte identifier
        assert artifact.input_shape == (1, 1, *SPEC.shape) and artifact.output_shape == (1, 12)
        assert artifact.metrics["test_clips"] == 36 and artifact.metrics["latency_ms"] > 0
        assert artifact.notes["backend"] == "XNNPACK"
    assert {row["artifact"] for row in bundle.scorecard} == set(PTE)
    assert bundle.artifacts["executorch_fp32"].metrics["verification"]["max_abs_diff"] <= 1e-4


def test_fp32_program_matches_the_eager_model(exported, runtime, test_features):
    ckpt, out, _ = exported
    got = _run(runtime, out / "model.pte", test_features)
    with torch.no_grad():
        want = load_checkpoint(ckpt).model(torch.from_numpy(test_features)).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


def test_int8_program_is_quantized_and_follows_fp32(exported, runtime, test_features):
    ckpt, out, _ = exported
    entry = load_bundle(out).artifacts["executorch_int8"]
    assert entry.precision == "int8" and entry.notes["calibration_split"] == "training"
    assert sum(entry.notes["calibration_per_class"].values()) == 48
    tried = [c["config"] for c in entry.notes["candidates"]]
    assert tried[0]["per_channel"] is True and entry.notes["quantization"] in tried  # per-channel first
    assert entry.size < (out / "model.pte").stat().st_size
    got = _run(runtime, out / "model.int8.pte", test_features)
    fp32 = _run(runtime, out / "model.pte", test_features)
    assert np.isfinite(got).all() and np.abs(got - fp32).max() > 0  # really another model
    assert np.mean(got.argmax(1) == fp32.argmax(1)) >= 0.5


def test_programs_take_one_clip_at_a_time(exported, runtime, test_features):
    _, out, _ = exported
    method = runtime.load_program(out / "model.int8.pte").load_method("forward")
    with pytest.raises(RuntimeError):
        method.execute((torch.from_numpy(test_features[:2]),))


WITHOUT_EXECUTORCH = textwrap.dedent(
    """
    import sys

    sys.modules["executorch"] = None  # what the import system sees when it is not installed
    from kws_export.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def test_without_executorch_the_rest_is_written_and_the_reason_said_once(real_data, tmp_path):
    ckpt = train_checkpoint("bc_resnet_1", training_batch(real_data), tmp_path / "best.pt", real_data)
    common = ["--test", str(real_data), "--test-clips", "8", "--latency-runs", "0", "--threads", "1", "-q"]

    def export(out, *formats):
        return subprocess.run([sys.executable, "-c", WITHOUT_EXECUTORCH, str(ckpt), "--out", str(tmp_path / out),
                               "--formats", *formats, *common], capture_output=True, text=True, timeout=300)

    result = export("b", "onnx_fp32", "executorch")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "ExecuTorch" in line]
    assert said == ["warning: executorch_fp32, executorch_int8 not made: ExecuTorch is not installed "
                    "(pip install 'kws-toolkit[mobile]')"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert list(manifest["artifacts"]) == ["onnx_fp32"]

    result = export("c", "executorch_int8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "kws-export: error: nothing to make: ExecuTorch is not installed (pip install 'kws-toolkit[mobile]')"
    ]

"""Export of briefly trained models into bundles, checked artifact by artifact.

Each architecture is trained for a few steps on real clips, saved with `save_checkpoint`,
and exported once (module-scoped fixture) with small calibration and test sets; the tests
then check the files themselves with onnx, onnxruntime, a torch-only interpreter and the
runtime's own CLI, independently of what the manifest claims.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
import torch.backends.xnnpack

from kws_export import FORMATS as ALL_FORMATS
from kws_export import ExportError, LogMelGraph, LogMelReader, export_bundle
from kws_export.cli import main as export_main
from kws_runtime import FeatureSpec, log_mel
from kws_runtime.bundle import load_bundle
from kws_runtime.files import current_umask
from kws_train.checkpoint import load_checkpoint
from kws_train.dataset import build_task, index_dataset, load_example, split_by_speaker
from kws_train.models import ARCHITECTURES
from bundle_builders import int8_weight_range
from trained_models import SALT, SPEC, train_checkpoint, training_batch

# Every kind but ExecuTorch's, which test_executorch.py checks (its export takes far longer).
FORMATS = tuple(f for f in ALL_FORMATS if not f.startswith("executorch"))
KW = dict(calib_clips=48, selection_clips=24, test_clips=36, latency_runs=3, select_quantization=False, threads=1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Small batches gain nothing from a second thread, and on a busy machine two threads
    # waiting on each other can be ten times slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def train_batch(real_data):
    return training_batch(real_data)


class Bundles:
    """Each architecture trained and exported once, on first use: ``bundles[arch] -> (arch, checkpoint, folder, report)``."""

    def __init__(self, tmp_path_factory, train_batch, real_data):
        self.tmp_path_factory, self.train_batch, self.real_data = tmp_path_factory, train_batch, real_data
        self.made = {}

    def __getitem__(self, arch):
        if arch not in self.made:
            tmp = self.tmp_path_factory.mktemp(arch)
            ckpt = train_checkpoint(arch, self.train_batch, tmp / "best.pt", self.real_data)
            report = export_bundle(ckpt, tmp / "bundle", self.real_data, self.real_data, formats=FORMATS, **KW)
            self.made[arch] = (arch, ckpt, tmp / "bundle", report)
        return self.made[arch]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, train_batch, real_data):
    return Bundles(tmp_path_factory, train_batch, real_data)


# One width of BC-ResNet and of MobileNetV2: the widths share every line of code.
EXPORTED = [a for a in ARCHITECTURES if a not in ("bc_resnet_3", "bc_resnet_8", "mobilenet_v2_x0_5")]


@pytest.fixture(params=EXPORTED)
def exported(request, bundles):
    return bundles[request.param]


@pytest.fixture
def small(bundles):
    """The cheapest bundle, for checks that do not depend on the architecture."""
    return bundles["shufflenet_v2_x0_5"]


@pytest.fixture(scope="module")
def test_inputs(real_data):
    """Waveforms, features and targets of 24 test-split clips."""
    clips = split_by_speaker(index_dataset(real_data), 0.1, 0.1, SALT)
    task = build_task(clips, "12", "testing", root=real_data, spec=SPEC, seed=2)
    examples = task.examples[::max(1, len(task.examples) // 24)][:24]
    audio = np.stack([load_example(e, SPEC) for e in examples])
    return audio, log_mel(audio, SPEC)[:, None], np.array([task.labels.index(e.label) for e in examples])


def _eager(ckpt, x):
    with torch.no_grad():
        return load_checkpoint(ckpt).model(torch.from_numpy(x)).numpy()


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------ the bundle


def test_every_artifact_is_written_verified_and_listed(exported):
    arch, ckpt, out, report = exported
    assert report.ok, report.failed
    bundle = load_bundle(out)  # checks every sha256
    assert list(bundle.artifacts) == list(FORMATS)
    assert bundle.model["architecture"] == arch
    assert bundle.spec == SPEC
    assert list(bundle.labels) == load_checkpoint(ckpt).labels
    for name, artifact in bundle.artifacts.items():
        assert artifact.path.stat().st_size == artifact.size
        assert artifact.metrics["test_clips"] == 36
        assert 0.0 <= artifact.metrics["accuracy"] <= 1.0
        assert artifact.metrics["latency_ms"] > 0
    assert {row["artifact"] for row in bundle.scorecard} == set(FORMATS)
    assert (out / "scorecard.md").read_text().count("|") > 20
    assert (out / "scorecard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a bundle is copied and shared: every file readable by others (0644 under the usual umask)
    usual = 0o666 & ~current_umask()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: usual for p in out.iterdir()}


def test_onnx_fp32_matches_the_eager_model(exported, test_inputs):
    arch, ckpt, out, report = exported
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert not (out / "model.onnx.data").exists() and len(list(out.glob("*.data"))) == 0
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    _, x, _ = test_inputs
    session = _session(out / "model.onnx")
    got = np.concatenate([session.run(None, {"log_mel": x[:1]})[0], session.run(None, {"log_mel": x[1:]})[0]])
    want = _eager(ckpt, x)
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


def _activation_types(model):
    inits = {i.name: i for i in model.graph.initializer}
    return {inits[n.input[2]].data_type for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


def test_onnx_int8_is_qdq_per_channel_and_small(exported, test_inputs):
    arch, ckpt, out, report = exported
    model = onnx.load(str(out / "model.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: i for i in model.graph.initializer}
    assert _activation_types(model) == {onnx.TensorProto.UINT8}  # the default: x86's fast path
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq, "no int8 convolution weights"
    per_channel = [n for n in weight_dq if len(inits[n.input[1]].dims) == 1]
    assert per_channel, "weights are not quantized per channel"
    float_inits = onnx.load(str(out / "model.onnx")).graph.initializer
    conv_weights = sum(int(np.prod(i.dims)) for i in float_inits if len(i.dims) == 4)
    assert sum(int(np.prod(inits[n.input[0]].dims)) for n in weight_dq) == conv_weights  # all of them in 8 bits
    assert int8_weight_range(out / "model.int8.onnx") <= 64  # 7 bits: no saturation on x86 CPUs without VNNI
    int8_size, fp32_size = (out / "model.int8.onnx").stat().st_size, (out / "model.onnx").stat().st_size
    # Below ~100 k parameters (BC-ResNet-1 has 9 k) the graph, not the weights, is most of the file.
    assert int8_size <= (0.3 if conv_weights > 100_000 else 0.6) * fp32_size
    entry = load_bundle(out).artifacts["onnx_int8"]
    assert entry.notes["quantization"]["activations"] == "uint8" and entry.notes["quantization"]["per_channel"]
    counts = list(entry.notes["calibration_per_class"].values())
    assert sum(counts) == 48 and max(counts) - min(counts) <= 1  # balanced across classes
    _, x, _ = test_inputs
    got = _session(out / "model.int8.onnx").run(None, {"log_mel": x})[0]
    assert np.isfinite(got).all() and got.shape == (len(x), 12)
    assert np.mean(got.argmax(1) == _eager(ckpt, x).argmax(1)) >= 0.5


def test_end_to_end_onnx_equals_runtime_features_plus_model(exported, test_inputs):
    arch, ckpt, out, report = exported
    audio, x, _ = test_inputs
    session = _session(out / "model.e2e.onnx")
    assert session.get_inputs()[0].name == "waveform"
    got = session.run(None, {"waveform": audio})[0]
    logits = _eager(ckpt, x)
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert np.abs(got - want).max() < 1e-4
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)


def test_int8_end_to_end_onnx_is_the_float_front_end_before_the_int8_network(exported, test_inputs):
    arch, ckpt, out, report = exported
    audio, x, _ = test_inputs
    model = onnx.load(str(out / "model.e2e.int8.onnx"))
    ops = [node.op_type for node in model.graph.node]
    # the DFT convolution is a float Conv ahead of the first QuantizeLinear
    assert ops.index("Conv") < ops.index("QuantizeLinear") and ops[-1] == "Softmax"
    got = _session(out / "model.e2e.int8.onnx").run(None, {"waveform": audio})[0]
    logits = _session(out / "model.int8.onnx").run(None, {"log_mel": x})[0]
    assert np.array_equal(got.argmax(1), logits.argmax(1))
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)
    artifact = load_bundle(out).artifacts["onnx_e2e_int8"]
    assert artifact.precision == "int8" and artifact.input_kind == "waveform"
    assert artifact.metrics["verification"]["agreement_int8_network"] >= 0.995


def test_int8_end_to_end_alone_quantizes_its_network_aside(small, real_data, tmp_path):
    arch, ckpt, out, report = small
    target = tmp_path / "e2e-int8"
    export_bundle(ckpt, target, real_data, real_data, formats=("onnx_e2e_int8",), **KW)
    assert list(load_bundle(target).artifacts) == ["onnx_e2e_int8"]
    assert sorted(p.name for p in target.iterdir() if p.suffix == ".onnx") == ["model.e2e.int8.onnx"]


TORCH_ONLY = textwrap.dedent(
    """
    import sys, torch
    from torch.jit.mobile import _load_for_lite_interpreter
    folder, x = sys.argv[1], torch.load(sys.argv[2])
    out = {}
    for name in ("model.pt", "model.ptl", "model.int8.pt", "model.int8.ptl"):
        if ".int8." in name:
            torch.backends.quantized.engine = "qnnpack"
        path = folder + "/" + name
        module = _load_for_lite_interpreter(path) if name.endswith(".ptl") else torch.jit.load(path)
        with torch.no_grad():
            out[name] = module(x)
    project = sorted(m for m in sys.modules if m.split(".")[0] in ("kws_train", "kws_runtime", "export"))
    assert not project, project
    torch.save(out, sys.argv[3])
    """
)


def test_torchscript_files_load_with_torch_alone(exported, test_inputs, tmp_path):
    arch, ckpt, out, report = exported
    _, x, _ = test_inputs
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    script = tmp_path / "run.py"
    script.write_text(TORCH_ONLY)
    # -I: isolated mode, neither the working directory nor PYTHONPATH is on sys.path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-I", str(script), str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    outputs = torch.load(tmp_path / "y.pt")
    want = _eager(ckpt, x)
    for name in ("model.pt", "model.ptl"):
        assert np.abs(outputs[name].numpy() - want).max() < 1e-4
    int8 = outputs["model.int8.pt"].numpy()
    assert np.array_equal(int8, outputs["model.int8.ptl"].numpy())
    assert np.mean(int8.argmax(1) == want.argmax(1)) >= 0.5
    entries = load_bundle(out).artifacts
    assert entries["torchscript_int8"].notes["engine"] == "qnnpack"
    assert entries["torchscript_int8"].notes["quantization"]["engine"] == "qnnpack"
    lite = entries["torchscript_lite"].notes
    assert lite["optimized_for_mobile"] == bool(torch.backends.xnnpack.enabled)
    if not lite["optimized_for_mobile"]:
        assert "XNNPACK" in lite["reason"]
        assert any("XNNPACK" in w for w in report.warnings)


def test_calibration_below_500_clips_is_warned_about(exported):
    arch, ckpt, out, report = exported
    assert any("fewer than the recommended 500" in w for w in report.warnings)
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("500" in w for w in manifest["export"]["warnings"])


# ------------------------------------------------------------------ runtime on the bundle


def _kws(*args):
    return subprocess.run([sys.executable, "-m", "kws_runtime.cli", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_kws_predict_uses_the_bundle_and_refuses_a_tampered_file(small, real_data, tmp_path):
    arch, ckpt, out, report = small
    clip = sorted((real_data / "yes").glob("*.wav"))[0]
    proc = _kws("predict", out, clip)
    assert proc.returncode == 0, proc.stderr
    labels = load_checkpoint(ckpt).labels
    assert proc.stdout.split()[1] in labels
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    proc = _kws("predict", copy, clip)
    assert proc.returncode != 0
    assert "model.int8.onnx" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------- settings and failures


def test_int8_settings_are_chosen_on_validation_clips(small, real_data, tmp_path):
    arch, ckpt, out, _ = small
    report = export_bundle(
        ckpt, tmp_path / "b", real_data, None, ["onnx_int8", "torchscript_int8"],
        calib_clips=24, selection_clips=24, latency_runs=0, try_all=True, threads=1,
    )
    assert report.ok, report.failed
    for name, method_key in (("onnx_int8", "calibration_method"), ("torchscript_int8", "observer")):
        notes = report.artifacts[name].entry["notes"]
        tried = notes["candidates"]
        settings = {(c["config"]["per_channel"], c["config"]["reduce_range"]) for c in tried}
        if name == "onnx_int8":  # 7-bit weights first, and never full range (it saturates on some x86 CPUs)
            assert settings == {(True, True), (False, True)}
        else:  # per-channel first, then the others
            assert settings == {(True, False), (False, False), (True, True)}
        assert len({c["config"][method_key] for c in tried}) > 1
        assert [c["config"]["float_layers"] for c in tried][-1] == "first convolution, classifier"
        assert len({round(c["selection_kl"], 12) for c in tried}) == len(tried)  # different models
        chosen = [c for c in tried if c["config"] == notes["quantization"]]
        assert len(chosen) == 1 and chosen[0]["selection_kl"] == min(c["selection_kl"] for c in tried)
    # no test data: verified on validation clips, no accuracy on the scorecard
    assert all(row["accuracy"] is None for row in report.scorecard)


def test_float_ends_keep_the_first_convolution_and_the_classifier_in_float(small, real_data, test_inputs, tmp_path):
    from kws_export import OnnxQuantConfig, TorchQuantConfig, quantize_onnx
    from kws_export.torchscript import quantize_qnnpack, quantized_engine, trace

    arch, ckpt, out, _ = small
    reader = LogMelReader(sorted((real_data / "up").glob("*.wav"))[:16], SPEC, batch_size=16)
    _, x, _ = test_inputs
    fp32 = _eager(ckpt, x)

    # onnxruntime: the two nodes read float weights, every other Conv reads dequantized ones
    path = quantize_onnx(out / "model.onnx", tmp_path / "q.onnx", reader, OnnxQuantConfig(float_ends=True))
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm")]
    float_weights = [w for w in weights if w in inits and inits[w].data_type == onnx.TensorProto.FLOAT]
    assert len(float_weights) == 2 and weights.index(float_weights[0]) == 0 and weights.index(float_weights[1]) == len(weights) - 1
    got = _session(path).run(None, {"log_mel": x})[0]
    assert np.mean(got.argmax(1) == fp32.argmax(1)) >= 0.5

    # torch: the first conv unit and fc stay float modules inside the quantized model
    model = load_checkpoint(ckpt).model.eval()
    q = quantize_qnnpack(model, [torch.from_numpy(reader.features())], TorchQuantConfig(float_ends=True))
    quantized = [name for name, m in q.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
                 and type(m).__name__.startswith("Conv")]
    floats = [name for name, m in q.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert quantized and len(floats) == 2 and floats[-1].endswith("fc.module")
    with quantized_engine("qnnpack"), torch.no_grad():
        traced = trace(q, torch.from_numpy(x[:2]))
        got = traced(torch.from_numpy(x)).numpy()
    assert np.isfinite(got).all() and np.mean(got.argmax(1) == fp32.argmax(1)) >= 0.5


def test_entropy_calibration_searches_thresholds(real_data, tmp_path):
    # onnxruntime's quantize_static runs its entropy calibrator with a single candidate
    # threshold, so its "entropy" ranges are MinMax's; ours must differ.
    from onnx import numpy_helper

    from kws_export import OnnxQuantConfig, export_onnx, quantize_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 12),
    ).eval()
    export_onnx(model, tmp_path / "m.onnx", (1, 1, *SPEC.shape))
    reader = LogMelReader(sorted((real_data / "yes").glob("*.wav"))[:32], SPEC, batch_size=16)
    scales = {}
    for method in ("minmax", "entropy"):
        path = quantize_onnx(tmp_path / "m.onnx", tmp_path / f"{method}.onnx", reader, OnnxQuantConfig(method=method))
        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        scales[method] = np.array([float(inits[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"])
    assert scales["minmax"].shape == scales["entropy"].shape
    assert not np.allclose(scales["entropy"], scales["minmax"], rtol=1e-3)


def test_compact_qdq_shrinks_the_graph_and_keeps_its_outputs(small, real_data, test_inputs, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from kws_export.quantize import compact_qdq

    arch, ckpt, out, report = small
    reader = LogMelReader(sorted((real_data / "no").glob("*.wav"))[:16], SPEC, batch_size=16)
    quantize_static(str(out / "model.onnx"), str(tmp_path / "raw.onnx"), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    # 7-bit weights, as exported: full-range ones saturate on x86 CPUs without VNNI, where two
                    # equivalent graphs may then round differently
                    reduce_range=True)
    model = onnx.load(str(tmp_path / "raw.onnx"))
    compact_qdq(model)
    onnx.save(model, str(tmp_path / "compact.onnx"))
    assert (tmp_path / "compact.onnx").stat().st_size < 0.8 * (tmp_path / "raw.onnx").stat().st_size
    inits = {i.name: i for i in model.graph.initializer}
    constants = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    kinds = {inits[n.input[0]].data_type for n in constants}
    assert {onnx.TensorProto.INT8, onnx.TensorProto.INT32} <= kinds  # weights and biases
    assert all(len(n.input) == 2 for n in constants)  # their all-zero zero points are gone
    _, x, _ = test_inputs
    raw = _session(tmp_path / "raw.onnx").run(None, {"log_mel": x})[0]
    np.testing.assert_array_equal(_session(tmp_path / "compact.onnx").run(None, {"log_mel": x})[0], raw)


@pytest.mark.parametrize("method", ["percentile"])
def test_other_calibration_methods(small, real_data, test_inputs, tmp_path, method):
    from kws_export import OnnxQuantConfig, quantize_onnx

    arch, ckpt, out, report = small
    clips = split_by_speaker(index_dataset(real_data), 0.1, 0.1, SALT)
    examples = build_task(clips, "12", "training", root=real_data, spec=SPEC).examples[::40][:32]
    reader = LogMelReader(examples, SPEC, load_example, batch_size=16)
    config = OnnxQuantConfig(method=method, activations="int8")
    path = quantize_onnx(out / "model.onnx", tmp_path / "q.onnx", reader, config)
    assert _activation_types(onnx.load(str(path))) == {onnx.TensorProto.INT8}  # signed, for ARM
    _, x, _ = test_inputs
    got = _session(path).run(None, {"log_mel": x})[0]
    assert np.isfinite(got).all()
    assert np.mean(got.argmax(1) == _eager(ckpt, x).argmax(1)) >= 0.5


def test_a_failed_artifact_leaves_the_others_in_the_bundle(small, real_data, tmp_path, capsys):
    arch, ckpt, out, report = small
    target = tmp_path / "partial"
    # int8 without calibration data fails; fp32 is still written and listed
    rc = export_main([str(ckpt), "--out", str(target), "--test", str(real_data), "--formats", "onnx_fp32", "onnx_int8",
                      "--test-clips", "12", "--latency-runs", "0", "--threads", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "onnx_int8" in captured.err and "--calib" in captured.out + captured.err
    bundle = load_bundle(target)
    assert list(bundle.artifacts) == ["onnx_fp32"]
    assert not (target / "model.int8.onnx").exists()
    assert "onnx_int8" in bundle.manifest["export"]["failed"]


def test_cli_errors_are_one_line(small, real_data, tmp_path, capsys):
    arch, ckpt, out, report = small
    cases = [
        [str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a")],
        [str(ckpt), "--out", str(out)],  # an existing bundle, no --force
        [str(ckpt), "--out", str(tmp_path / "b"), "--data", str(real_data), "--calib-clips", "10"],
        [str(ckpt), "--out", str(tmp_path / "c"), "--formats", "onnx_fp64"],
    ]
    for argv in cases:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("kws-export: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(ExportError, match="already holds a bundle"):
        export_bundle(ckpt, out)


def test_cli_writes_a_bundle(small, real_data, tmp_path, capsys):
    arch, ckpt, out, report = small
    target = tmp_path / "cli"
    rc = export_main([str(ckpt), "--out", str(target), "--data", str(real_data), "--formats", "onnx",
                      "--calib-clips", "24", "--allow-few-calib", "--selection-clips", "12", "--no-select",
                      "--test-clips", "12", "--latency-runs", "2", "--threads", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert set(load_bundle(target).artifacts) == {"onnx_fp32", "onnx_int8", "onnx_e2e", "onnx_e2e_int8"}
    assert "manifest.json" in captured.out


def test_requantize_makes_a_bundles_full_range_int8_files_portable_in_place(small, real_data, tmp_path, capsys):
    arch, ckpt, out, report = small
    target = tmp_path / "full-range"
    few = ["--calib-clips", "24", "--allow-few-calib", "--selection-clips", "12"]
    assert export_main([str(ckpt), "--out", str(target), "--data", str(real_data), "--formats", "onnx", "--no-select",
                        "--full-range-weights", *few, "--test-clips", "12", "--latency-runs", "0", "--threads", "1",
                        "-q"]) == 0
    assert int8_weight_range(target / "model.int8.onnx") > 64  # what bundles held before 7-bit weights
    before = load_bundle(target).manifest
    capsys.readouterr()

    again = ["requantize", str(target), "--calib", str(real_data), "--test", str(real_data), *few, "-q"]
    assert export_main([*again, "--test-clips", "20", "--latency-runs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kws-export: error: ") and "counts 12 test clips" in err and err.count("\n") == 1
    assert load_bundle(target).manifest == before  # refused before anything changed

    assert export_main([*again, "--test-clips", "12", "--latency-runs", "2"]) == 0, capsys.readouterr().err
    after = load_bundle(target)
    assert after.artifacts["onnx_int8"].notes["quantization"]["reduce_range"]
    for name in ("onnx_int8", "onnx_e2e_int8"):
        assert int8_weight_range(target / after.artifacts[name].file) <= 64, name
        assert after.artifacts[name].sha256 != before["artifacts"][name]["sha256"], name
    for name in ("onnx_fp32", "onnx_e2e"):
        assert after.artifacts[name].sha256 == before["artifacts"][name]["sha256"], name
    assert after.manifest["export"]["requantized"]["artifacts"] == ["onnx_int8", "onnx_e2e_int8"]
    rows = after.manifest["scorecard"]
    assert [r["artifact"] for r in rows] == [r["artifact"] for r in before["scorecard"]]
    assert all(r["clips"] == 12 and r["latency_ms"] > 0 for r in rows)  # every artifact timed again, together
    assert "onnx_int8" in (target / "scorecard.md").read_text()
    assert not [p.name for p in target.iterdir() if p.name.startswith(".")]

    int8_only = tmp_path / "int8-only"
    assert export_main([str(ckpt), "--out", str(int8_only), "--data", str(real_data), "--formats", "onnx_int8",
                        "--no-select", *few, "--latency-runs", "0", "--threads", "1", "-q"]) == 0
    assert export_main(["requantize", str(int8_only), "--calib", str(real_data), *few]) == 2
    assert "has no onnx_fp32 artifact" in capsys.readouterr().err


# ---------------------------------------------------------------------------- components


@pytest.mark.parametrize(
    "spec",
    [SPEC, FeatureSpec.preset("fine"), FeatureSpec(pad_mode="reflect", power=1.0, ref=1.0, top_db=None)],
    ids=["seed", "fine", "reflect-magnitude-fixed-ref"],
)
def test_graph_log_mel_equals_the_runtime(real_data, spec):
    files = [sorted((real_data / w).glob("*.wav"))[i] for w in ("yes", "stop", "_silence_") for i in (0, 1)]
    from kws_runtime import load_audio

    audio = np.stack([load_audio(f, spec) for f in files])
    got = LogMelGraph(spec)(torch.from_numpy(audio)).numpy()
    assert got.shape == (len(files), *spec.shape)
    assert np.abs(got - log_mel(audio, spec)).max() < 2e-3


def test_calibration_reader_streams_log_mel_batches(real_data):
    files = sorted((real_data / "no").glob("*.wav"))[:5]
    from kws_runtime import load_audio

    reader = LogMelReader(files, SPEC, batch_size=3)
    assert len(reader) == 5  # equal batches: 5 clips go one by one, not as 3 + 2
    assert len(LogMelReader(files[:4], SPEC, batch_size=3)) == 2
    batches = list(iter(reader.get_next, None))
    assert [b["log_mel"].shape[0] for b in batches] == [1] * 5
    assert batches[0]["log_mel"].shape[1:] == (1, *SPEC.shape)
    assert reader.get_next() is None
    reader.rewind()
    want = log_mel(np.stack([load_audio(f, SPEC) for f in files]), SPEC)[:, None]
    assert np.array_equal(reader.features(), want)
    with pytest.raises(ValueError):
        LogMelReader([], SPEC)


def test_float_ends_find_a_convolutional_classifier():
    # BC-ResNet classifies with a 1x1 convolution, not a linear layer
    from kws_export import TorchQuantConfig
    from kws_export.torchscript import _FloatIsland, quantize_qnnpack, quantized_engine
    from kws_train.models import build_model

    torch.manual_seed(0)
    model = build_model("bc_resnet_1", 12).eval()
    x = torch.randn(4, 1, *SPEC.shape)
    q = quantize_qnnpack(model, [x], TorchQuantConfig(float_ends=True))
    assert isinstance(q.classifier, _FloatIsland) and isinstance(q.stem[0], _FloatIsland)  # the fused conv-relu
    assert type(q.classifier.module) is torch.nn.Conv2d  # still float
    with quantized_engine("qnnpack"), torch.no_grad():
        assert q(x).shape == (4, 12)


def test_float_check_lets_rounding_break_a_tie_but_not_move_outputs():
    from kws_export.checks import VerificationError, compare_float

    want = np.array([[1.0, 0.99995, 0.0], [0.0, 1.0, 0.5]], np.float32)
    tie_broken = want + np.array([[-3e-5, 3e-5, 0.0], [0.0, 0.0, 0.0]], np.float32)
    assert compare_float("model", tie_broken, want, atol=1e-4) == {
        "max_abs_diff": pytest.approx(3e-5, rel=0.01), "top1_identical": False}
    assert compare_float("model", want, want, atol=1e-4)["top1_identical"] is True
    moved = want.copy()
    moved[1] = [0.0, 0.49, 0.5]
    with pytest.raises(VerificationError, match="up to 0.51"):
        compare_float("model", moved, want, atol=1e-4)
    with pytest.raises(VerificationError):
        compare_float("model", np.full_like(want, np.nan), want, atol=1e-4)


def test_int8_checks_judge_only_clips_the_reference_decides():
    from kws_export.checks import VerificationError, check_int8, check_same_network, decided

    # an untrained model: every clip's top two logits tie to within 1e-5, so int8 rounding
    # may pick either on every clip, and no decision tells a broken file from a sound one
    rng = np.random.default_rng(0)
    tied = np.tile([0.3, 0.3, -0.1], (10, 1)) + rng.normal(0, 1e-5, (10, 3))
    flipped = tied[:, [1, 0, 2]]
    assert not decided(tied, 1.0).any()
    figures = check_int8("int8", flipped, tied)
    assert figures["decided_clips_fp32"] == 0 and "agreement_fp32_decided" not in figures

    # a trained model: three clips decided, one close call; flipping the close call passes,
    # flipping two decided clips of three is a broken quantization
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.8, 0.0]])
    assert decided(logits, 1.0).tolist() == [True, True, True, False]
    close_call = logits.copy()
    close_call[3] = [0.8, 1.0, 0.0]
    assert check_int8("int8", close_call, logits) == {
        "agreement_fp32": 0.75, "decided_clips_fp32": 3, "agreement_fp32_decided": 1.0}
    broken = logits[:, [1, 2, 0]]
    broken[0] = logits[0]
    with pytest.raises(VerificationError, match=r"33.3% of the 3 clips"):
        check_int8("int8", broken, logits)

    # two paths to one int8 network: a 0.02 probability step may flip a near tie, not a clear decision
    probs = np.array([[0.50, 0.49, 0.01], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    step = probs + np.array([[-0.02, 0.02, 0.0], [0, 0, 0], [0, 0, 0]])
    figures = check_same_network("e2e int8", step, probs)
    assert figures["decided_clips_int8_network"] == 2 and figures["agreement_int8_network_decided"] == 1.0
    moved = probs.copy()
    moved[2] = [0.8, 0.1, 0.1]
    with pytest.raises(VerificationError, match="differs on 50.00% of the 2 clips"):
        check_same_network("e2e int8", moved, probs)


def test_unfolded_batch_norm_scales_are_quantized_per_tensor_without_a_warning(real_data, tmp_path, caplog):
    # BC-ResNet's sub-spectral norm is a BatchNormalization no convolution absorbs; onnxruntime's
    # default per-channel axis does not exist on its 1-D scale.
    import logging

    from onnx import numpy_helper

    from kws_export import OnnxQuantConfig, export_onnx, quantize_onnx
    from kws_train.models import build_model

    torch.manual_seed(0)
    export_onnx(build_model("bc_resnet_1", 12).eval(), tmp_path / "m.onnx", (1, 1, *SPEC.shape))
    reader = LogMelReader(sorted((real_data / "yes").glob("*.wav"))[:16], SPEC, batch_size=16)
    with caplog.at_level(logging.WARNING):
        path = quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", reader, OnnxQuantConfig())
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    norms = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert norms
    for norm in norms:
        dequantize = producers[norm.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        assert inits[dequantize.input[0]].dtype == np.int8 and inits[dequantize.input[1]].ndim == 0

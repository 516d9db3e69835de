"""Bundle manifests: writing, reading, validation and checksum refusal.

The small ONNX models and bundles built here (with onnx.helper, known weights) are also used
by test_predict.py, test_runtime_cli.py and test_torch_free.py until exported bundles exist.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kws_runtime import BundleError, FeatureSpec, file_sha256, load_bundle, write_manifest
from kws_runtime.bundle import validate_manifest

LABELS = ["_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SEED = FeatureSpec.preset("seed")


# ------------------------------------------------------------------------ model and bundle builders


def linear_weights(spec=SEED, n_labels=len(LABELS), seed=0):
    """Weights (features, labels) and bias with a spread large enough that the argmax is clear."""
    rng = np.random.default_rng(seed)
    n = spec.n_mels * spec.n_frames
    return (rng.standard_normal((n, n_labels)) / np.sqrt(n)).astype(np.float32), rng.standard_normal(n_labels).astype(np.float32)


def expected_logits(features, weights, bias):
    """What the linear log-mel models compute, in numpy: features (N, n_mels, frames)."""
    return features.reshape(len(features), -1).astype(np.float64) @ weights + bias


def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def linear_onnx(path, weights, bias, spec=SEED, input_name="log_mel", output_name="logits", softmax=False):
    """(batch, 1, n_mels, frames) -> Flatten -> MatMul -> Add [-> Softmax] -> (batch, labels)."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 1, spec.n_mels, spec.n_frames])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", weights.shape[1]])
    last = output_name if not softmax else "z"
    nodes = [
        helper.make_node("Flatten", [input_name], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], [last]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], [output_name], axis=1))
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")]
    _save(helper.make_graph(nodes, "linear", [x], [y], initializer=inits), path)


def int8_linear_onnx(path, weights, bias, spec=SEED):
    """The linear model with int8 weights (DequantizeLinear in front of the MatMul).

    Returns the dequantized weights, which define its expected output.
    """
    scale = np.float32(np.abs(weights).max() / 127)
    q = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
    x = helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, ["batch", 1, spec.n_mels, spec.n_frames])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weights.shape[1]])
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"]),
        helper.make_node("Flatten", ["log_mel"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(q, "Wq"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(bias, "b"),
    ]
    _save(helper.make_graph(nodes, "linear_int8", [x], [y], initializer=inits), path)
    return q.astype(np.float32) * scale


def waveform_onnx(path, weights, spec=SEED, activation="Softmax"):
    """(batch, clip_samples) waveform -> MatMul -> Softmax (or Sigmoid) -> probabilities."""
    x = helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", spec.clip_samples])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", weights.shape[1]])
    nodes = [
        helper.make_node("MatMul", ["waveform", "W"], ["z"]),
        helper.make_node(activation, ["z"], ["probabilities"], **({"axis": 1} if activation == "Softmax" else {})),
    ]
    _save(helper.make_graph(nodes, "waveform", [x], [y], initializer=[numpy_helper.from_array(weights, "W")]), path)


def artifact_entry(bundle_dir, file, *, fmt="onnx", precision="fp32", kind="log_mel", output_kind="logits",
                   spec=SEED, n_labels=len(LABELS), input_name=None, output_name=None, metrics=None):
    """A manifest entry for a file already in ``bundle_dir``, with its real size and sha256."""
    path = Path(bundle_dir) / file
    shape = ["batch", 1, spec.n_mels, spec.n_frames] if kind == "log_mel" else ["batch", spec.clip_samples]
    return {
        "file": file,
        "format": fmt,
        "precision": precision,
        "input": {"name": input_name or kind, "kind": kind, "shape": shape},
        "output": {"name": output_name or output_kind, "kind": output_kind, "shape": ["batch", n_labels]},
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        "metrics": metrics if metrics is not None else {},
        "notes": {},
    }


def manifest_for(artifacts, labels=LABELS, spec=SEED, **extra):
    return {
        "format": "kws-bundle",
        "format_version": 1,
        "model": {"name": "tiny", "architecture": "linear", "variant": "test"},
        "labels": list(labels),
        "feature_spec": spec.to_dict(),
        "artifacts": artifacts,
        **extra,
    }


def build_bundle(bundle_dir, *, fp32=True, int8=False, waveform=False, torchscript=False, seed=0, scorecard=None):
    """A bundle of small real ONNX models. Returns (path, expected) where ``expected`` maps
    artifact name -> function (waveforms (N, samples) -> probabilities (N, labels))."""
    from kws_runtime import log_mel

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    weights, bias = linear_weights(seed=seed)
    artifacts, expected = {}, {}

    def softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    if fp32:
        linear_onnx(bundle_dir / "model.onnx", weights, bias)
        artifacts["onnx_fp32"] = artifact_entry(bundle_dir, "model.onnx", metrics={"accuracy": 0.9123})
        expected["onnx_fp32"] = lambda w: softmax(expected_logits(log_mel(w), weights, bias))
    if int8:
        deq = int8_linear_onnx(bundle_dir / "model.int8.onnx", weights[:, ::-1].copy(), bias)
        artifacts["onnx_int8"] = artifact_entry(bundle_dir, "model.int8.onnx", precision="int8")
        expected["onnx_int8"] = lambda w: softmax(expected_logits(log_mel(w), deq, bias))
    if waveform:
        wave_w = (np.random.default_rng(seed + 1).standard_normal((SEED.clip_samples, len(LABELS))) / 20).astype(np.float32)
        waveform_onnx(bundle_dir / "model.e2e.onnx", wave_w)
        artifacts["onnx_e2e"] = artifact_entry(bundle_dir, "model.e2e.onnx", kind="waveform", output_kind="probabilities")
        expected["onnx_e2e"] = lambda w: softmax(w.astype(np.float64) @ wave_w)
    if torchscript:
        (bundle_dir / "model.pt").write_bytes(b"not really torchscript, but checksummed")
        artifacts["torchscript_fp32"] = artifact_entry(bundle_dir, "model.pt", fmt="torchscript")
    extra = {"scorecard": scorecard} if scorecard is not None else {}
    write_manifest(bundle_dir, manifest_for(artifacts, **extra))
    return bundle_dir, expected


def read_manifest(bundle_dir):
    return json.loads((Path(bundle_dir) / "manifest.json").read_text())


def rewrite_manifest(bundle_dir, manifest):
    """Write a manifest without validation (to test what load_bundle does with it)."""
    (Path(bundle_dir) / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------- tests


def test_load_bundle_reads_every_field(tmp_path):
    path, _ = build_bundle(tmp_path / "b", int8=True, waveform=True, torchscript=True, scorecard=[{"artifact": "onnx_fp32"}])
    bundle = load_bundle(path)
    assert bundle.path == path
    assert bundle.labels == tuple(LABELS)
    assert bundle.spec == SEED
    assert bundle.name == "tiny" and bundle.model["architecture"] == "linear"
    assert list(bundle.artifacts) == ["onnx_fp32", "onnx_int8", "onnx_e2e", "torchscript_fp32"]
    fp32 = bundle.artifacts["onnx_fp32"]
    assert fp32.path == (path / "model.onnx").absolute()
    assert fp32.input_shape == ("batch", 1, 40, 32) and fp32.output_shape == ("batch", 12)
    assert fp32.input_kind == "log_mel" and fp32.output_kind == "logits"
    assert fp32.sha256 == hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    assert fp32.metrics == {"accuracy": 0.9123}
    assert bundle.artifacts["onnx_e2e"].input_kind == "waveform"
    assert bundle.scorecard == [{"artifact": "onnx_fp32"}]
    # the manifest file itself is accepted as the path too
    assert load_bundle(path / "manifest.json").artifacts.keys() == bundle.artifacts.keys()


def test_unknown_top_level_keys_are_kept(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    manifest["export"] = {"torch": "2.13.0"}
    write_manifest(path, manifest)
    assert load_bundle(path).manifest["export"] == {"torch": "2.13.0"}


def test_write_manifest_is_atomic_and_round_trips(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    manifest["model"]["name"] = "renamed ünïcode"
    target = write_manifest(path, manifest)
    assert target == path / "manifest.json"
    assert read_manifest(path) == manifest
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]  # no temp files left


def test_write_manifest_refuses_an_invalid_manifest_and_keeps_the_old_one(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    before = (path / "manifest.json").read_bytes()
    manifest = read_manifest(path)
    manifest["labels"] = []
    with pytest.raises(BundleError, match="labels"):
        write_manifest(path, manifest)
    assert (path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]


def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk_bytes=1024) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_tampered_artifact_is_refused_with_the_file_named(tmp_path):
    path, _ = build_bundle(tmp_path / "b", int8=True)
    data = bytearray((path / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    (path / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert "model.int8.onnx" in message and "sha256" in message and "onnx_int8" in message
    assert "copy the bundle again" in message
    load_bundle(path, verify=False)  # structure alone is still fine


def test_truncated_artifact_is_refused_by_size(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    data = (path / "model.onnx").read_bytes()
    (path / "model.onnx").write_bytes(data[:-10])
    with pytest.raises(BundleError, match=rf"model\.onnx.*{len(data) - 10} bytes but the manifest says {len(data)}"):
        load_bundle(path)


def test_missing_artifact_is_refused(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    (path / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: missing"):
        load_bundle(path)


@pytest.mark.parametrize("file", ["../model.onnx", "/etc/passwd", "sub/../../model.onnx", "C:/model.onnx", "..\\model.onnx"])
def test_file_names_must_stay_inside_the_bundle(tmp_path, file):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    manifest["artifacts"]["onnx_fp32"]["file"] = file
    rewrite_manifest(path, manifest)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(path)
    with pytest.raises(BundleError, match="outside the bundle"):
        write_manifest(path, manifest)


def test_symlink_leading_outside_is_refused(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    outside = tmp_path / "outside.onnx"
    os.replace(path / "model.onnx", outside)
    os.symlink(outside, path / "model.onnx")
    with pytest.raises(BundleError, match="link leading outside"):
        load_bundle(path)


def test_artifact_in_a_subfolder_is_fine(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    (path / "models").mkdir()
    os.replace(path / "model.onnx", path / "models" / "model.onnx")
    manifest = read_manifest(path)
    manifest["artifacts"]["onnx_fp32"]["file"] = "models/model.onnx"
    write_manifest(path, manifest)
    assert load_bundle(path).artifacts["onnx_fp32"].path == (path / "models" / "model.onnx").absolute()


def _set(manifest, dotted, value):
    *parents, last = dotted.split(".")
    node = manifest
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


class _Deleted:
    def __repr__(self):  # stable test ids (pytest-xdist compares them across workers)
        return "<deleted>"


_DELETE = _Deleted()

BAD_FIELDS = [
    ("format", "onnx-bundle", "not a kws model bundle"),
    ("format_version", 2, "upgrade kws_runtime"),
    ("format_version", 0, "format_version: 0 is not supported"),
    ("format_version", "1", "format_version: must be an integer"),
    ("format_version", _DELETE, "format_version"),
    ("model", "tiny", "model: must be an object"),
    ("model.name", "", "model.name"),
    ("model.architecture", _DELETE, "model.architecture"),
    ("labels", [], "labels"),
    ("labels", ["yes", "yes"], "labels: repeat yes"),
    ("labels", ["yes", 3], r"labels\[1\]"),
    ("feature_spec.n_mels", 0, "feature_spec: FeatureSpec.n_mels=0"),
    ("feature_spec.colour", "blue", "feature_spec: .*unknown field.*colour"),
    ("feature_spec.version", 9, "feature_spec: feature spec version 9"),
    ("feature_spec", _DELETE, "feature_spec"),
    ("artifacts", {}, "artifacts: lists no model files"),
    ("artifacts.onnx_fp32", "model.onnx", "artifacts.onnx_fp32: must be an object"),
    ("artifacts.onnx_fp32.file", "", "artifacts.onnx_fp32.file"),
    ("artifacts.onnx_fp32.format", "tflite", "artifacts.onnx_fp32.format: is 'tflite'"),
    ("artifacts.onnx_fp32.precision", "fp16", "artifacts.onnx_fp32.precision"),
    ("artifacts.onnx_fp32.input", _DELETE, "artifacts.onnx_fp32.input: must be an object"),
    ("artifacts.onnx_fp32.input.kind", "mfcc", "artifacts.onnx_fp32.input.kind"),
    ("artifacts.onnx_fp32.input.name", 5, "artifacts.onnx_fp32.input.name"),
    ("artifacts.onnx_fp32.input.shape", ["batch", 1, 40, 101], "does not fit the feature spec"),
    ("artifacts.onnx_fp32.input.shape", ["batch", 1, 40], "does not fit the feature spec"),
    ("artifacts.onnx_fp32.input.shape", ["batch", 1, 40, -32], "must be a list of sizes"),
    ("artifacts.onnx_fp32.output.kind", "scores", "artifacts.onnx_fp32.output.kind"),
    ("artifacts.onnx_fp32.output.shape", ["batch", 10], "does not fit the 12 labels"),
    ("artifacts.onnx_fp32.sha256", "abc", "artifacts.onnx_fp32.sha256"),
    ("artifacts.onnx_fp32.sha256", "A" * 64, "artifacts.onnx_fp32.sha256"),
    ("artifacts.onnx_fp32.size", -1, "artifacts.onnx_fp32.size"),
    ("artifacts.onnx_fp32.size", True, "artifacts.onnx_fp32.size"),
    ("artifacts.onnx_fp32.metrics", [], "artifacts.onnx_fp32.metrics"),
    ("scorecard", {"a": 1}, "scorecard"),
]


@pytest.mark.parametrize("field, value, message", BAD_FIELDS, ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD_FIELDS])
def test_bad_manifest_fields_are_refused_with_the_field_named(tmp_path, field, value, message):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    _set(manifest, field, value)
    rewrite_manifest(path, manifest)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(path)
    assert str(path / "manifest.json") in str(info.value)
    with pytest.raises(BundleError, match=message):
        validate_manifest(manifest)


def test_manifest_that_is_not_json_or_not_an_object(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    (path / "manifest.json").write_text('{"format": "kws-bundle",')
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON \(line 1"):
        load_bundle(path)
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object, not list"):
        load_bundle(path)
    (path / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(path)


def test_not_a_bundle_folder(tmp_path):
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a bundle folder"):
        load_bundle(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path / "empty")


def test_write_manifest_refuses_values_json_cannot_hold(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    for bad in (float("nan"), np.float32(0.5), {1, 2}):
        manifest = read_manifest(path)
        manifest["artifacts"]["onnx_fp32"]["metrics"]["accuracy"] = bad
        with pytest.raises(BundleError, match="not plain JSON"):
            write_manifest(path, manifest)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]
    assert (path / "manifest.json").stat().st_mode & 0o777 == 0o644

"""Small ONNX models with known weights (onnx.helper) and the bundles and manifests built from them."""

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kws_runtime import FeatureSpec, file_sha256, write_manifest

LABELS = ["_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SEED = FeatureSpec.preset("seed")


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



def int8_weight_range(path) -> int:
    """The largest magnitude among the int8 initializers a model dequantizes (its weights)."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer if i.data_type == TensorProto.INT8}
    weights = [numpy_helper.to_array(inits[n.input[0]]) for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    if not weights:
        raise ValueError(f"{path}: no int8 weights")
    return int(max(np.abs(w.astype(np.int32)).max() for w in weights))

"""Manifest fields set to bad values (BAD_FIELDS) and set_field, which writes one into a manifest."""


def set_field(manifest, dotted, value):
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

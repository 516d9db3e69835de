"""From a training checkpoint to deployable artifacts, verified and scored, in a model bundle.

`export_bundle` writes TorchScript (float, lite, qnnpack int8), ONNX (fp32, onnxruntime int8,
end-to-end waveform model), ExecuTorch programs for XNNPACK (fp32, int8; with the ``mobile``
extra) and a manifest the torch-free runtime reads; ``kws-export`` is its command line.
`requantize_bundle` makes a bundle's int8 ONNX files again from its fp32 one.
"""

import importlib

# Where each public name lives. Loaded on first use, so that ``kws_export.console`` (the
# ``kws-export`` entry point) imports without torch and can say which extra is missing.
_MODULES = {
    ".bundle": ("ARTIFACT_FILES", "FORMATS", "MIN_CALIBRATION_CLIPS", "ArtifactResult", "ExportError", "ExportReport",
                "export_bundle"),
    ".e2e": ("LogMelGraph", "WaveformClassifier", "export_e2e"),
    ".executorch_export": ("Pt2eQuantConfig", "lower_to_pte", "pte_runner", "quantize_pt2e"),
    ".onnx_export": ("check_onnx", "export_onnx", "onnx_session"),
    ".quantize": ("LogMelReader", "OnnxQuantConfig", "QuantizationError", "quantize_onnx"),
    ".requantize": ("requantize_bundle",),
    ".torchscript": ("TorchQuantConfig", "quantize_qnnpack", "save_lite", "save_torchscript", "trace"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'kws_export' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name], __name__), name)


def __dir__():
    return sorted(list(globals()) + list(_HOME))


__all__ = sorted(_HOME)

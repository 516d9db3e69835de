"""From a training checkpoint to deployable artifacts, verified and scored, in a model bundle.

`export_bundle` writes TorchScript (float, lite, qnnpack int8), ONNX (fp32, onnxruntime int8,
end-to-end waveform model) and a manifest the torch-free runtime reads; ``kws-export`` is its
command line.
"""

from .bundle import ARTIFACT_FILES, FORMATS, MIN_CALIBRATION_CLIPS, ArtifactResult, ExportError, ExportReport, export_bundle
from .e2e import LogMelGraph, WaveformClassifier, export_e2e
from .onnx_export import check_onnx, export_onnx, onnx_session
from .quantize import LogMelReader, OnnxQuantConfig, QuantizationError, quantize_onnx
from .torchscript import TorchQuantConfig, quantize_qnnpack, save_lite, save_torchscript, trace

__all__ = [
    "ARTIFACT_FILES",
    "ArtifactResult",
    "ExportError",
    "ExportReport",
    "FORMATS",
    "LogMelGraph",
    "LogMelReader",
    "MIN_CALIBRATION_CLIPS",
    "OnnxQuantConfig",
    "QuantizationError",
    "TorchQuantConfig",
    "WaveformClassifier",
    "check_onnx",
    "export_bundle",
    "export_e2e",
    "export_onnx",
    "onnx_session",
    "quantize_onnx",
    "quantize_qnnpack",
    "save_lite",
    "save_torchscript",
    "trace",
]

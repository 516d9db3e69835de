"""Static int8 quantization of an ONNX model with onnxruntime, calibrated on real log-mel features.

The steps are onnxruntime's own: `quant_pre_process` (shape inference and graph clean-up), then
`quantize_static` in the QDQ format with int8 weights, calibrated by a `CalibrationDataReader`
that reads real clips and computes their features with `kws_runtime.log_mel` -- the features
the model is served with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from kws_runtime.audio import load_audio
from kws_runtime.features import log_mel
from kws_runtime.files import atomic_path
from kws_runtime.spec import FeatureSpec

__all__ = [
    "ACTIVATION_TYPES",
    "CALIBRATION_METHODS",
    "LogMelReader",
    "OnnxQuantConfig",
    "compact_qdq",
    "QuantizationError",
    "quantize_onnx",
]

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
ACTIVATION_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


# Calibration batches per pass of onnxruntime's calibrator. Each pass keeps every intermediate
# tensor of its batches in memory before reducing them to ranges or histograms, which merge
# across passes: over 500 clips in one pass ResNet-18 held 9 GB, one 32-clip batch a pass
# bounds that by one batch's activations.
CALIBRATION_STRIDE = 1


class QuantizationError(RuntimeError):
    """Quantization could not produce a model; the message says which step failed and why."""


@dataclasses.dataclass(frozen=True)
class OnnxQuantConfig:
    """One way of quantizing an ONNX model.

    Attributes:
        method: activation range calibration, ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        per_channel: one weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights (the default), so that the file gives the same decisions
            on every x86 CPU. Without VNNI (AVX2, and AVX-512 before it), onnxruntime's
            uint8 x int8 kernels add pairs of products in 16 bits (``vpmaddubsw``), which
            saturates with full 8-bit weights: on an AVX2 CPU the shipped ShuffleNetV2 scored
            82.6 % instead of its fp32 93.3 % (docs/export.md). 7-bit weights keep every pair
            under 2**15; a VNNI CPU, where the export may run, cannot show the difference, so
            full range is never chosen for the user (`kws_export.checks.candidates`).
        activations: ``"uint8"`` or ``"int8"`` (signed); weights are always signed int8.
            uint8 is the default because it is onnxruntime's fast path on x86: with signed
            activations (onnxruntime 1.32, AVX512-VNNI) the convolutions that read a ReLU
            output or a shared input stay in float between Dequantize/Quantize pairs, and
            ResNet-18 ran 1.27x faster than fp32 instead of 3.65x. ARM builds of onnxruntime
            favour signed activations: export for them with ``activations="int8"``.
        float_ends: keep the first convolution and the classifier (the last Gemm or MatMul)
            in float, the usual mixed-precision fallback when quantizing every layer flips
            too many decisions.
    """

    method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool = True
    activations: str = "uint8"
    float_ends: bool = False

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
        if self.activations not in ACTIVATION_TYPES:
            raise ValueError(f"unknown activation type {self.activations!r}; choose one of {', '.join(ACTIVATION_TYPES)}")

    @property
    def name(self) -> str:
        """Short description, e.g. ``"minmax, per-channel, int8 activations"``."""
        parts = [self.method, "per-channel" if self.per_channel else "per-tensor"]
        parts.append("7-bit weights" if self.reduce_range else "full-range weights")
        parts.append(f"{self.activations} activations")
        if self.float_ends:
            parts.append("first convolution and classifier in float")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {
            "quant_format": "QDQ",
            "weights": "int8",
            "activations": self.activations,
            "calibration_method": self.method,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "float_layers": "first convolution, classifier" if self.float_ends else "none",
        }


class LogMelReader(CalibrationDataReader):
    """Feeds onnxruntime's calibrator batches of log-mel features of real clips.

    Clips are read and turned into features a batch at a time, on the first pass; the
    batches are kept, so `rewind` and later passes (other calibration settings, the torch
    quantizer) cost no decoding.

    Args:
        clips: anything ``load`` turns into a waveform (paths, dataset examples).
        spec: feature spec of the model.
        load: ``load(clip, spec) -> float32 (spec.clip_samples,)``; reads an audio file by default.
        input_name: the model's input name.
        batch_size: at most this many clips per batch. Batches all have the same size (the
            largest divisor of the clip count up to ``batch_size``): onnxruntime's entropy
            and percentile calibrators stack the batches' activations into one array.

    Each batch is ``{input_name: float32 (batch, 1, n_mels, frames)}``.
    """

    def __init__(
        self,
        clips: Sequence,
        spec: FeatureSpec,
        load: Callable = load_audio,
        input_name: str = "log_mel",
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not len(clips):
            raise ValueError("no calibration clips")
        self.clips = list(clips)
        self.spec = spec
        self.load = load
        self.input_name = input_name
        self.batch_size = max(d for d in range(1, min(batch_size, len(self.clips)) + 1) if len(self.clips) % d == 0)
        self._batches: list = []
        self._next = self._end = 0
        self.rewind()

    def __len__(self) -> int:
        """Number of batches in one pass."""
        return -(-len(self.clips) // self.batch_size)

    def get_next(self) -> Optional[dict]:
        index = self._next
        if index >= self._end:
            return None
        while len(self._batches) <= index:
            start = len(self._batches) * self.batch_size
            audio = np.stack([self.load(clip, self.spec) for clip in self.clips[start : start + self.batch_size]])
            self._batches.append(log_mel(audio, self.spec)[:, None])
        self._next += 1
        return {self.input_name: self._batches[index]}

    def rewind(self) -> None:
        """Start the next pass at the first batch."""
        self._next, self._end = 0, len(self)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve batches ``start_index`` to ``end_index - 1`` only (onnxruntime's strided
        calibration, ``CalibStridedMinMax``, walks the batches this way)."""
        self._next, self._end = start_index, min(end_index, len(self))

    def features(self) -> np.ndarray:
        """All features of one pass, ``(clips, 1, n_mels, frames)``; leaves the reader rewound."""
        self.rewind()
        batches = list(iter(self.get_next, None))
        self.rewind()
        return np.concatenate([b[self.input_name] for b in batches])


def quantize_onnx(model_path, output_path, reader: CalibrationDataReader, config: OnnxQuantConfig = OnnxQuantConfig()) -> Path:
    """Quantize an fp32 ONNX model to int8 (QDQ), calibrated on ``reader``'s batches.

    Args:
        model_path: the fp32 model (one file).
        output_path: where the int8 model goes; written atomically.
        reader: calibration batches; rewound first if it can be.
        config: calibration method, weight granularity, range, activation type.

    Raises:
        QuantizationError: pre-processing or quantization failed.
    """
    model_path, output_path = Path(model_path), Path(output_path)
    if hasattr(reader, "rewind"):
        reader.rewind()
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=output_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(model_path), str(prepared))
        except Exception:
            # The symbolic shape inference (written for transformers) cannot follow reshapes
            # with a dynamic batch such as ShuffleNet's channel shuffle; ONNX's own shape
            # inference, which the CNN quantizer needs, still runs.
            try:
                quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
            except Exception as exc:
                raise QuantizationError(f"{model_path}: onnxruntime pre-processing failed: {type(exc).__name__}: {exc}") from exc
        quantized = Path(tmp) / "quantized.onnx"
        prepared_model = onnx.load(str(prepared))
        excluded = _float_ends(prepared_model) if config.float_ends else []
        extra = {"CalibStridedMinMax": CALIBRATION_STRIDE} if _strided(reader) else {}
        extra["TensorQuantOverrides"] = _per_tensor_norm_scales(prepared_model)
        cache = None
        if config.method == "percentile":
            extra["CalibPercentile"] = 99.999
        elif config.method == "entropy":
            cache = _entropy_ranges(prepared, reader, Path(tmp))
        try:
            # the histogram calibrators print progress on stdout, which belongs to the caller
            with contextlib.redirect_stdout(sys.stderr):
                quantize_static(
                    str(prepared),
                    str(quantized),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    activation_type=ACTIVATION_TYPES[config.activations],
                    weight_type=QuantType.QInt8,
                    per_channel=config.per_channel,
                    reduce_range=config.reduce_range,
                    calibrate_method=CALIBRATION_METHODS[config.method],
                    nodes_to_exclude=excluded,
                    extra_options=extra,
                    calibration_cache_path=cache,
                )
        except Exception as exc:
            raise QuantizationError(f"{model_path}: onnxruntime quantize_static ({config.name}) failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(quantized))
        compact_qdq(model)
        with atomic_path(output_path) as tmp_out:
            onnx.save(model, str(tmp_out))
    return output_path


def _float_ends(model: onnx.ModelProto) -> list:
    """Names of the first Conv node and the classifier, the last Conv/Gemm/MatMul node (nodes are in
    topological order; BC-ResNet classifies with a 1x1 Conv)."""
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if len(layers) < 2 or layers[0].op_type != "Conv":
        raise QuantizationError("the model has no first Conv and classifier node to keep in float")
    ends = [layers[0], layers[-1]]
    if not all(n.name for n in ends):
        raise QuantizationError("the first Conv or the classifier node has no name, so it cannot be excluded")
    return [n.name for n in ends]


def _per_tensor_norm_scales(model: onnx.ModelProto) -> dict:
    """Quantization overrides that quantize every BatchNormalization scale with one scale per tensor.

    Left alone, onnxruntime asks for channel axis 1 of every quantized weight, finds the
    1-D scale of a normalization that is not folded into a convolution (BC-ResNet's
    sub-spectral norm) too short, logs "Axis 1 is out-of-range" and falls back to one scale
    per tensor. That fallback is kept, said outright: per channel (axis 0), BC-ResNet-3's
    int8 file was 15 % larger and no more accurate (95.26 % against 95.29 % on 2,975 clips).
    """
    return {n.input[1]: [{}] for n in model.graph.node if n.op_type == "BatchNormalization"}


ENTROPY_BINS = 512


def _strided(reader) -> bool:
    return hasattr(reader, "set_range") and hasattr(reader, "__len__")


def _entropy_ranges(model_path: Path, reader: CalibrationDataReader, tmp: Path) -> Path:
    """Activation ranges by the entropy (KL divergence) method over `ENTROPY_BINS` bins.

    ``quantize_static`` runs its entropy calibrator with 128 histogram bins and 128 quantized
    bins, which leaves a single candidate threshold -- the full range, i.e. MinMax. The
    calibrator is run here with a 512-bin histogram (193 candidate thresholds; TensorRT's
    2048 bins cost 4x the time for thresholds 4x closer together), and its ranges are handed
    to ``quantize_static`` as a calibration cache.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with contextlib.redirect_stdout(sys.stderr):
        calibrator = create_calibrator(
            model_path,
            None,
            augmented_model_path=str(tmp / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
        )
        if _strided(reader):
            for start in range(0, len(reader), CALIBRATION_STRIDE):
                reader.set_range(start, start + CALIBRATION_STRIDE)
                calibrator.collect_data(reader)
        else:
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    cache = tmp / "entropy-ranges.json"
    save_tensors_data(ranges, cache)
    if hasattr(reader, "rewind"):
        reader.rewind()
    return cache


def compact_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shrink a quantized graph in place without changing what it computes.

    A QDQ graph has about three nodes per layer, each naming its tensors after the layer
    (``/layer1/layer1.0/conv1/Conv_output_0_DequantizeLinear_Output``...): on a small model
    such as ShuffleNetV2 0.5x those names weigh a third of the int8 weights. Internal tensors
    get short names (graph inputs and outputs keep theirs), node names and doc strings go, and
    the all-zero zero points of the symmetric int8 weights and int32 biases -- which
    DequantizeLinear assumes when the input is absent -- are dropped (with per-channel weights
    the biases' zero points alone weigh as much as the biases).
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    symmetric = (onnx.TensorProto.INT8, onnx.TensorProto.INT32)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3:
            continue
        constant, zero_point = initializers.get(node.input[0]), initializers.get(node.input[2])
        if (
            constant is not None
            and zero_point is not None
            and constant.data_type in symmetric
            and not numpy_helper.to_array(zero_point).any()
        ):
            del node.input[2]
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used or i.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(kept)

    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for init in graph.initializer:
        init.name = short(init.name)
        init.doc_string = ""
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        del node.metadata_props[:]
        for i, name in enumerate(node.input):
            node.input[i] = short(name)
        for i, name in enumerate(node.output):
            node.output[i] = short(name)
    del graph.value_info[:]  # shapes onnxruntime infers again on load
    onnx.checker.check_model(model)
    return model

"""ONNX export of a log-mel model: one self-contained file with a dynamic batch axis."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence

import onnx
import onnxruntime as ort
import torch
from torch import nn

from kws_runtime.files import atomic_path

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "check_onnx",
    "export_onnx",
    "onnx_session",
]

INPUT_NAME = "log_mel"
OUTPUT_NAME = "logits"
OPSET = 18


@contextlib.contextmanager
def quiet_onnx_export():
    """Silence the exporters' deprecation and registry chatter (not their errors)."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed": no torchvision ops here
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(TorchScript-based ONNX export|torch\.jit|torch\.export|LeafSpec|treespec)")
            # the TorchScript-based exporter's own logging set-up announces its removal
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The feature will be removed")
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(TorchScript-based ONNX export|LeafSpec|treespec)")
            warnings.filterwarnings("ignore", category=UserWarning, message=r".*(TorchScript-based ONNX export|LeafSpec|treespec)")
            # strided slices are simply not folded; the graph is still correct
            warnings.filterwarnings("ignore", category=UserWarning, message=r"Constant folding - Only steps=1")
            yield
    finally:
        registry_log.setLevel(level)


def export_onnx(
    model: nn.Module,
    path,
    input_shape: Sequence[int],
    *,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
    opset: int = OPSET,
    dynamo: bool = False,
) -> Path:
    """Export ``model`` to a single ONNX file whose first axis (batch) is dynamic.

    Args:
        model: an eval-mode module taking one float32 tensor.
        path: destination ``.onnx``; written atomically.
        input_shape: shape of one example input, batch axis first (e.g. ``(1, 1, 40, 32)``).
        input_name, output_name: graph input/output names.
        opset: ONNX opset.
        dynamo: use the ``torch.export``-based exporter. The default is the TorchScript-based
            one: it is 2-3x faster on these small CNNs and gives the same graph after
            onnxruntime's optimizations.

    Raises:
        ValueError: a model in training mode.
    """
    if model.training:
        raise ValueError("export_onnx() wants a model in eval mode")
    path = Path(path)
    example = torch.zeros(tuple(input_shape), dtype=torch.float32)
    if example.shape[0] < 2:
        # A batch of one lets the exporters specialise the batch axis away; two keeps it symbolic.
        example = example.expand(2, *example.shape[1:]).contiguous()
    kwargs = dict(input_names=[input_name], output_names=[output_name], opset_version=opset, external_data=False)
    if dynamo:
        kwargs.update(dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    else:
        kwargs.update(dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    with atomic_path(path) as tmp, quiet_onnx_export(), torch.no_grad():
        torch.onnx.export(model, (example,), str(tmp), dynamo=dynamo, **kwargs)
    return path


def check_onnx(path) -> onnx.ModelProto:
    """Load and validate an ONNX file with ``onnx.checker`` (full check, with shape inference)."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_session(path, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None) -> ort.InferenceSession:
    """An onnxruntime session on ``path``; ``threads`` sets ``intra_op_num_threads`` (and one inter-op thread)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))

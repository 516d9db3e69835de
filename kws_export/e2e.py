"""End-to-end ONNX: waveform in, class probabilities out, the log-mel front end inside the graph.

Any ONNX runtime can then serve the model without reimplementing the features. The front end
is written for export: framing and the real DFT are one strided convolution whose kernels are
the DFT basis multiplied by `kws_runtime.features.analysis_window`, followed by a matmul with
`kws_runtime.features.mel_filterbank` and the spec's dB conversion -- the same computation as
`kws_runtime.log_mel`, with the runtime's window and filterbank, in float32. (The training
front end, `kws_train.frontend.LogMel`, splits CPU batches into chunks, which fixes the batch
size of an exported graph.) `export_e2e_int8` puts the same front end, still float, before the
bundle's int8 network.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import torch
from onnx import helper
from torch import nn

from kws_runtime.features import analysis_window, mel_filterbank
from kws_runtime.files import atomic_path
from kws_runtime.spec import FeatureSpec

from .onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx

__all__ = ["E2E_INPUT_NAME", "E2E_OUTPUT_NAME", "LogMelGraph", "WaveformClassifier", "export_e2e", "export_e2e_int8"]

E2E_INPUT_NAME = "waveform"
E2E_OUTPUT_NAME = "probabilities"


class LogMelGraph(nn.Module):
    """Waveforms ``(N, samples)`` -> log-mel dB ``(N, n_mels, frames)`` with export-friendly ops.

    Equal to `kws_runtime.log_mel` within float32 rounding (about 1e-4 dB).
    """

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.spec = spec
        n_bins = spec.n_fft // 2 + 1
        # rfft as a matmul: bin k of frame x is sum_t x[t] w[t] exp(-2 pi i k t / n_fft)
        angle = 2.0 * np.pi * np.outer(np.arange(n_bins), np.arange(spec.n_fft)) / spec.n_fft
        window = analysis_window(spec)
        basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])  # float64, (2 * n_bins, n_fft)
        self.n_bins = n_bins
        self.register_buffer("basis", torch.from_numpy(basis[:, None, :]).float())
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(spec)).float())  # (n_mels, n_bins)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        x = audio[:, None]
        if spec.center:
            half = spec.n_fft // 2
            x = nn.functional.pad(x, (half, half), mode=spec.pad_mode)
        parts = nn.functional.conv1d(x, self.basis, stride=spec.hop_length)  # (N, 2 * n_bins, frames)
        real, imag = parts[:, : self.n_bins], parts[:, self.n_bins :]
        power = real * real + imag * imag
        if spec.power != 2.0:
            power = power.pow(spec.power / 2.0)
        mel = torch.matmul(self.mel, power).clamp_min(spec.amin)  # (N, n_mels, frames)
        if spec.ref == "max":
            ref = mel.amax(dim=(1, 2), keepdim=True)
        else:
            ref = torch.tensor(max(float(spec.ref), spec.amin))
        # divide before the logarithm: near 0 dB, two large rounded logarithms would cancel
        db = 10.0 * torch.log10(mel / ref)
        if spec.top_db is not None:
            db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - spec.top_db)
        return db


class WaveformClassifier(nn.Module):
    """Waveforms ``(N, spec.clip_samples)`` float32 in [-1, 1] -> probabilities ``(N, classes)``.

    Args:
        model: log-mel classifier ``(N, 1, n_mels, frames) -> logits``; a copy is kept.
        spec: the feature spec the model was trained with.
    """

    def __init__(self, model: nn.Module, spec: FeatureSpec):
        super().__init__()
        self.spec = spec
        self.log_mel = LogMelGraph(spec)
        self.model = copy.deepcopy(model).cpu().eval()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(self.log_mel(audio)[:, None]), dim=1)


def export_e2e(model: nn.Module, spec: FeatureSpec, path, opset: int = OPSET, dynamo: bool = False) -> Path:
    """Write the end-to-end ONNX model (one file, dynamic batch, ``spec.clip_samples`` samples).

    Input ``waveform`` float32 ``(batch, clip_samples)``: clips padded or cut to
    ``spec.clip_samples`` as `kws_runtime.load_audio` does. Output ``probabilities``
    float32 ``(batch, classes)``.
    """
    wrapper = WaveformClassifier(model, spec).eval()
    return export_onnx(
        wrapper,
        path,
        (1, spec.clip_samples),
        input_name=E2E_INPUT_NAME,
        output_name=E2E_OUTPUT_NAME,
        opset=opset,
        dynamo=dynamo,
    )


class _FrontEnd(nn.Module):
    """Waveforms ``(N, samples)`` -> the network's input ``(N, 1, n_mels, frames)``."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.log_mel = LogMelGraph(spec)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.log_mel(audio)[:, None]


def export_e2e_int8(network_int8, spec: FeatureSpec, path, opset: int = OPSET) -> Path:
    """Write an end-to-end ONNX model whose network is the quantized one and whose front end stays float.

    The log-mel front end (`LogMelGraph`, float32) is exported alone and joined to the
    quantized network ``network_int8`` (an int8 ONNX file taking ``log_mel``, giving
    ``logits``) with ``onnx.compose``; a Softmax gives ``probabilities``. The DFT and the
    logarithm stay float: quantizing them would cost the features their 80 dB range, while the
    network's own first QuantizeLinear already takes the features to int8 as `onnx_int8` does.
    Same ports as `export_e2e`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        front_path = export_onnx(_FrontEnd(spec).eval(), Path(tmp) / "front_end.onnx", (1, spec.clip_samples),
                                 input_name=E2E_INPUT_NAME, output_name=INPUT_NAME, opset=opset)
        front = onnx.load(str(front_path))
    network = onnx.load(str(network_int8))
    # Names inside the two graphs may collide (exporter-made initializer names); the ports keep theirs.
    front = onnx.compose.add_prefix(front, "front_end/", rename_inputs=False, rename_outputs=False)
    network = onnx.compose.add_prefix(network, "network/", rename_inputs=False, rename_outputs=False)
    _match_opsets(front, network)
    merged = onnx.compose.merge_models(front, network, io_map=[(INPUT_NAME, INPUT_NAME)],
                                       outputs=[OUTPUT_NAME], doc_string="kws end-to-end, int8 network")
    graph = merged.graph
    graph.node.append(helper.make_node("Softmax", [OUTPUT_NAME], [E2E_OUTPUT_NAME], axis=1, name="probabilities"))
    batch = network.graph.output[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    classes = network.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(E2E_OUTPUT_NAME, onnx.TensorProto.FLOAT, [batch, classes]))
    path = Path(path)
    with atomic_path(path) as tmp_path:
        onnx.save(merged, str(tmp_path))
    return path


def _match_opsets(front: onnx.ModelProto, network: onnx.ModelProto) -> None:
    """``merge_models`` wants one IR version and, per shared domain, one opset version."""
    ir = max(front.ir_version, network.ir_version)
    front.ir_version = network.ir_version = ir
    net_opsets = {o.domain: o.version for o in network.opset_import}
    for entry in front.opset_import:
        if entry.domain in net_opsets and net_opsets[entry.domain] != entry.version:
            raise ValueError(f"the front end uses opset {entry.version} of {entry.domain or 'ai.onnx'}, "
                             f"the int8 network {net_opsets[entry.domain]}: export both with one opset")

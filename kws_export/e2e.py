"""End-to-end ONNX: waveform in, class probabilities out, the log-mel front end inside the graph.

Any ONNX runtime can then serve the model without reimplementing the features. The front end
is written for export: framing and the real DFT are one strided convolution whose kernels are
the DFT basis multiplied by `kws_runtime.features.analysis_window`, followed by a matmul with
`kws_runtime.features.mel_filterbank` and the spec's dB conversion -- the same computation as
`kws_runtime.log_mel`, with the runtime's window and filterbank, in float32. (The training
front end, `kws_train.frontend.LogMel`, splits CPU batches into chunks, which fixes the batch
size of an exported graph.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kws_runtime.features import analysis_window, mel_filterbank
from kws_runtime.spec import FeatureSpec

from .onnx_export import OPSET, export_onnx

__all__ = ["E2E_INPUT_NAME", "E2E_OUTPUT_NAME", "LogMelGraph", "WaveformClassifier", "export_e2e"]

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

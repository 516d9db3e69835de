"""One maker per artifact kind: write the file, load it back, check it, describe it.

A maker is ``make(ctx: ExportContext, path) -> Made``. `ARTIFACTS` lists the kinds in the
order they are made, with their standard file names (the bundle contract); adding a kind
means writing one maker and adding one row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from kws_runtime.spec import FeatureSpec

from . import checks, e2e, executorch_export, onnx_export, quantize, scorecard, torchscript
from .executorch_export import Pt2eQuantConfig
from .quantize import LogMelReader, OnnxQuantConfig
from .torchscript import QUANTIZED_ENGINE, TorchQuantConfig


class NeedsCalibration(ValueError):
    """An int8 artifact was asked for without calibration data."""

    def __init__(self):
        super().__init__("int8 needs calibration data: pass calib_root (kws-export --calib DATA)")


@dataclasses.dataclass
class ExportContext:
    """What every maker reads: the model, its clips and fp32 outputs, the int8 options.

    Attributes:
        x_verify: log-mel features of the clips every artifact is checked on, and
            ``fp32_logits`` the eager model's outputs for them; ``verify_set`` the same clips.
        calib_reader: calibration batches (training split), or None.
        select_set, select_fp32: the clips an int8 setting is chosen on (validation split) and
            the eager model's outputs for them, or None.
        tmp_dir: scratch folder inside the bundle folder, removed after the export.
    """

    model: torch.nn.Module
    spec: FeatureSpec
    labels: list
    verify_set: scorecard.EvalSet
    x_verify: np.ndarray
    fp32_logits: np.ndarray
    calib_reader: Optional[LogMelReader]
    calib_counts: list
    select_set: Optional[scorecard.EvalSet]
    select_fp32: Optional[np.ndarray]
    tmp_dir: Path
    onnx_quant: OnnxQuantConfig
    torch_quant: TorchQuantConfig
    pt2e_quant: Pt2eQuantConfig
    select_quantization: bool
    try_all: bool
    log: Callable[[str], None]
    warn: Callable[[str], None]
    # made once, used by several makers: the traced fp32 module, the quantized torch model,
    # the fp32 ONNX file int8 is quantized from, the int8 ONNX network
    _shared: dict = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> list:
        return ["batch", 1, self.spec.n_mels, self.spec.n_frames]

    def ports(self, kind_in="log_mel", kind_out="logits", name_in=onnx_export.INPUT_NAME,
              name_out=onnx_export.OUTPUT_NAME, shape_in=None, batch="batch") -> dict:
        """The manifest's ``input``/``output`` of an artifact (``batch``: a fixed size, or the axis name)."""
        return {
            "input": {"name": name_in, "kind": kind_in, "shape": shape_in or [batch, *self.input_shape[1:]]},
            "output": {"name": name_out, "kind": kind_out, "shape": [batch, len(self.labels)]},
        }

    def example_one(self) -> torch.Tensor:
        """One verification clip's features, ``(1, 1, n_mels, frames)``: the shape programs are lowered at."""
        return torch.from_numpy(self.x_verify[:1])

    def traced(self) -> torch.jit.ScriptModule:
        if "traced" not in self._shared:
            self._shared["traced"] = torchscript.trace(self.model, torch.from_numpy(self.x_verify[:2]))
        return self._shared["traced"]

    def fp32_onnx(self) -> Path:
        """An fp32 ONNX file of the model (the bundle's own, else one in the scratch folder)."""
        if "fp32_onnx" not in self._shared:
            self._shared["fp32_onnx"] = onnx_export.export_onnx(self.model, self.tmp_dir / "model.onnx", [1, *self.input_shape[1:]])
        return self._shared["fp32_onnx"]

    def use_fp32_onnx(self, path: Path) -> None:
        """Quantize from ``path`` (the bundle's verified fp32 file) instead of a scratch export."""
        self._shared["fp32_onnx"] = path

    def int8_onnx(self) -> Path:
        """The int8 ONNX network (the bundle's own when it was made, else one in the scratch folder)."""
        if "int8_onnx" not in self._shared:
            make_onnx_int8(self, self.tmp_dir / "model.int8.onnx")
        return self._shared["int8_onnx"]

    def quantized_torch(self) -> tuple:
        """``(traced int8 module, its eager outputs on x_verify, config, settings tried)``."""
        if "quantized_torch" not in self._shared:
            self._shared["quantized_torch"] = _quantize_torch(self)
        return self._shared["quantized_torch"]

    def int8_notes(self, config, tried: list) -> dict:
        return {
            "quantization": config.to_dict(),
            "selected": config.name,
            "candidates": tried,
            "calibration_clips": len(self.calib_reader.clips),
            "calibration_per_class": dict(zip(self.labels, self.calib_counts)),
            "calibration_split": "training",
        }

    def settings(self, first) -> list:
        return checks.candidates(first) if self.select_quantization else [first]


@dataclasses.dataclass
class Made:
    """A written, checked artifact: its manifest fields (format, precision, ports, notes), the
    verification figures, and a runner the scorecard times and scores."""

    fields: dict
    verification: dict
    runner: scorecard.Runner


# ------------------------------------------------------------------------------------- makers


def make_torchscript_fp32(ctx: ExportContext, path: Path) -> Made:
    torchscript.save_torchscript(ctx.traced(), path)
    runner = scorecard.torchscript_runner(path)
    check = checks.compare_float("torchscript_fp32", checks.batched(runner, ctx.x_verify), ctx.fp32_logits, checks.FLOAT_ATOL)
    return Made({"format": "torchscript", "precision": "fp32", **ctx.ports()}, check, runner)


def make_torchscript_lite(ctx: ExportContext, path: Path) -> Made:
    notes = torchscript.save_lite(ctx.traced(), path)
    if not notes["optimized_for_mobile"]:
        ctx.warn(f"{path.name}: {notes['reason']}")
    runner = scorecard.torchscript_runner(path, lite=True)
    check = checks.compare_float("torchscript_lite", checks.batched(runner, ctx.x_verify), ctx.fp32_logits, checks.FLOAT_ATOL)
    return Made({"format": "torchscript-lite", "precision": "fp32", **ctx.ports(), "notes": notes}, check, runner)


def make_torchscript_int8(ctx: ExportContext, path: Path) -> Made:
    traced, eager, config, tried = ctx.quantized_torch()
    torchscript.save_torchscript(traced, path)
    runner = scorecard.torchscript_runner(path, engine=QUANTIZED_ENGINE)
    check = _check_quantized_torch("torchscript_int8", runner, ctx, eager)
    notes = {"engine": QUANTIZED_ENGINE, **ctx.int8_notes(config, tried),
             "load": "set torch.backends.quantized.engine = 'qnnpack' before loading"}
    return Made({"format": "torchscript", "precision": "int8", **ctx.ports(), "notes": notes}, check, runner)


def make_torchscript_int8_lite(ctx: ExportContext, path: Path) -> Made:
    traced, eager, config, tried = ctx.quantized_torch()
    lite_notes = torchscript.save_lite(traced, path)
    runner = scorecard.torchscript_runner(path, lite=True, engine=QUANTIZED_ENGINE)
    check = _check_quantized_torch("torchscript_int8_lite", runner, ctx, eager)
    notes = {"engine": QUANTIZED_ENGINE, **ctx.int8_notes(config, tried), **lite_notes}
    return Made({"format": "torchscript-lite", "precision": "int8", **ctx.ports(), "notes": notes}, check, runner)


def make_onnx_fp32(ctx: ExportContext, path: Path) -> Made:
    onnx_export.export_onnx(ctx.model, path, [1, *ctx.input_shape[1:]])
    onnx_export.check_onnx(path)
    runner = scorecard.onnx_runner(path)
    check = checks.compare_float("onnx_fp32", checks.batched(runner, ctx.x_verify), ctx.fp32_logits, checks.FLOAT_ATOL)
    ctx.use_fp32_onnx(path)  # verified: int8 is quantized from the bundle's own file
    notes = {"opset": onnx_export.OPSET, "exporter": "torch.onnx (TorchScript-based)"}
    return Made({"format": "onnx", "precision": "fp32", **ctx.ports(), "notes": notes}, check, runner)


def make_onnx_int8(ctx: ExportContext, path: Path) -> Made:
    if ctx.calib_reader is None:
        raise NeedsCalibration()
    source = ctx.fp32_onnx()
    built = []

    def build(config):
        built.append(ctx.tmp_dir / f"int8-{len(built) + 1}.onnx")
        return quantize.quantize_onnx(source, built[-1], ctx.calib_reader, config)

    def outputs(candidate):
        return checks.batched(scorecard.onnx_runner(candidate), ctx.select_set.features())

    chosen, config, tried = checks.select("onnx_int8", ctx.settings(ctx.onnx_quant), build, outputs, ctx.select_fp32,
                                          ctx.log, ctx.try_all)
    os.replace(chosen, path)
    onnx_export.check_onnx(path)
    runner = scorecard.onnx_runner(path)
    check = checks.check_int8("onnx_int8", checks.batched(runner, ctx.x_verify), ctx.fp32_logits)
    ctx._shared["int8_onnx"] = path
    notes = {**ctx.int8_notes(config, tried), "tool": "onnxruntime.quantization quant_pre_process + quantize_static"}
    return Made({"format": "onnx", "precision": "int8", **ctx.ports(), "notes": notes}, check, runner)


def make_onnx_e2e(ctx: ExportContext, path: Path) -> Made:
    e2e.export_e2e(ctx.model, ctx.spec, path)
    onnx_export.check_onnx(path)
    runner = scorecard.onnx_runner(path, input_kind="waveform", output_kind="probabilities")
    got = np.concatenate([runner(w) for w in ctx.verify_set.waveform_batches()])
    check = checks.compare_float("onnx_e2e (against kws_runtime.log_mel + the eager model)", got,
                                 checks.softmax(ctx.fp32_logits), checks.E2E_ATOL)
    notes = {
        "opset": onnx_export.OPSET,
        "exporter": "torch.onnx (TorchScript-based)",
        "features": "log-mel inside the graph (kws_export.e2e.LogMelGraph: framing and DFT as one strided "
                    "convolution with kws_runtime's window, kws_runtime's mel filterbank, the spec's dB conversion)",
        "input": f"float32 waveform in [-1, 1] at {ctx.spec.sample_rate} Hz, padded or cut to {ctx.spec.clip_samples} samples",
    }
    ports = ctx.ports("waveform", "probabilities", e2e.E2E_INPUT_NAME, e2e.E2E_OUTPUT_NAME,
                      shape_in=["batch", ctx.spec.clip_samples])
    return Made({"format": "onnx", "precision": "fp32", **ports, "notes": notes}, check, runner)


def make_onnx_e2e_int8(ctx: ExportContext, path: Path) -> Made:
    network = ctx.int8_onnx()
    e2e.export_e2e_int8(network, ctx.spec, path)
    onnx_export.check_onnx(path)
    runner = scorecard.onnx_runner(path, input_kind="waveform", output_kind="probabilities")
    got = np.concatenate([runner(w) for w in ctx.verify_set.waveform_batches()])
    want = checks.softmax(checks.batched(scorecard.onnx_runner(network), ctx.x_verify))
    check = {**checks.check_same_network("onnx_e2e_int8 (against kws_runtime.log_mel + the int8 network)", got, want),
             **checks.check_int8("onnx_e2e_int8", got, ctx.fp32_logits)}
    notes = {
        "opset": onnx_export.OPSET,
        "network": "the onnx_int8 network, unchanged (kws_export.e2e.export_e2e_int8 joins it to the front end)",
        "features": "log-mel inside the graph in float32, as in onnx_e2e; the network's first QuantizeLinear takes them to int8",
        "input": f"float32 waveform in [-1, 1] at {ctx.spec.sample_rate} Hz, padded or cut to {ctx.spec.clip_samples} samples",
    }
    ports = ctx.ports("waveform", "probabilities", e2e.E2E_INPUT_NAME, e2e.E2E_OUTPUT_NAME,
                      shape_in=["batch", ctx.spec.clip_samples])
    return Made({"format": "onnx", "precision": "int8", **ports, "notes": notes}, check, runner)


def make_executorch_fp32(ctx: ExportContext, path: Path) -> Made:
    executorch_export.lower_to_pte(ctx.model, ctx.example_one(), path)
    runner = executorch_export.pte_runner(path)
    check = checks.compare_float("executorch_fp32", runner(ctx.x_verify), ctx.fp32_logits, checks.FLOAT_ATOL)
    return Made({"format": "executorch", "precision": "fp32", **ctx.ports(batch=1), "notes": _pte_notes()}, check, runner)


def make_executorch_int8(ctx: ExportContext, path: Path) -> Made:
    q, config, tried = _select_int8_module(ctx, "executorch_int8", executorch_export.quantize_pt2e, ctx.pt2e_quant)
    executorch_export.lower_to_pte(q, ctx.example_one(), path)
    runner = executorch_export.pte_runner(path)
    check = checks.check_int8("executorch_int8", runner(ctx.x_verify), ctx.fp32_logits)
    notes = {**_pte_notes(), **ctx.int8_notes(config, tried), "tool": "torchao prepare_pt2e/convert_pt2e + XNNPACKQuantizer"}
    return Made({"format": "executorch", "precision": "int8", **ctx.ports(batch=1), "notes": notes}, check, runner)


def _pte_notes() -> dict:
    return {"backend": "XNNPACK", "batch": "fixed at 1: one window per call",
            "load": "executorch.runtime.Runtime.get().load_program(path).load_method('forward')"}


@dataclasses.dataclass(frozen=True)
class ArtifactKind:
    """One row of the table: name in the manifest, file name, maker, and the groups the
    ``kws-export --formats`` option selects it by (``family``, ``int8``)."""

    name: str
    file: str
    make: Callable[[ExportContext, Path], Made]
    family: str
    int8: bool = False
    # None when the kind's optional dependency is importable, else why not and how to install it.
    missing: Callable[[], Optional[str]] = lambda: None


ARTIFACTS = (
    ArtifactKind("torchscript_fp32", "model.pt", make_torchscript_fp32, "torchscript"),
    ArtifactKind("torchscript_lite", "model.ptl", make_torchscript_lite, "torchscript"),
    ArtifactKind("torchscript_int8", "model.int8.pt", make_torchscript_int8, "torchscript", int8=True),
    ArtifactKind("torchscript_int8_lite", "model.int8.ptl", make_torchscript_int8_lite, "torchscript", int8=True),
    ArtifactKind("onnx_fp32", "model.onnx", make_onnx_fp32, "onnx"),
    ArtifactKind("onnx_int8", "model.int8.onnx", make_onnx_int8, "onnx", int8=True),
    ArtifactKind("onnx_e2e", "model.e2e.onnx", make_onnx_e2e, "onnx"),
    ArtifactKind("onnx_e2e_int8", "model.e2e.int8.onnx", make_onnx_e2e_int8, "onnx", int8=True),
    ArtifactKind("executorch_fp32", "model.pte", make_executorch_fp32, "executorch",
                 missing=executorch_export.missing_reason),
    ArtifactKind("executorch_int8", "model.int8.pte", make_executorch_int8, "executorch", int8=True,
                 missing=executorch_export.missing_reason),
)


# ------------------------------------------------------------------------------------ helpers


def _select_int8_module(ctx: ExportContext, name: str, quantize: Callable, first, engine: Optional[str] = None) -> tuple:
    """``quantize(model, calibration batches, config)`` for each candidate setting from ``first`` on;
    the one closest to fp32 on the selection clips (`checks.select`): ``(module, config, tried)``."""
    if ctx.calib_reader is None:
        raise NeedsCalibration()

    def build(config):
        batches = (torch.from_numpy(b[onnx_export.INPUT_NAME]) for b in _passes(ctx.calib_reader))
        return quantize(ctx.model, batches, config)

    def outputs(q):
        with torchscript.quantized_engine(engine) if engine else contextlib.nullcontext(), torch.no_grad():
            return checks.batched(lambda x: q(torch.from_numpy(x)).numpy(), ctx.select_set.features())

    return checks.select(name, ctx.settings(first), build, outputs, ctx.select_fp32, ctx.log, ctx.try_all)


def _quantize_torch(ctx: ExportContext) -> tuple:
    q, config, tried = _select_int8_module(ctx, "torchscript_int8", torchscript.quantize_qnnpack, ctx.torch_quant,
                                           QUANTIZED_ENGINE)
    with torchscript.quantized_engine(QUANTIZED_ENGINE):
        traced = torchscript.trace(q, torch.from_numpy(ctx.x_verify[:2]))
        with torch.no_grad():
            eager = checks.batched(lambda x: q(torch.from_numpy(x)).numpy(), ctx.x_verify)
    return traced, eager, config, tried


def _check_quantized_torch(name: str, runner, ctx: ExportContext, eager: np.ndarray) -> dict:
    got = checks.batched(runner, ctx.x_verify)
    check = checks.compare_float(f"{name} (against the eager quantized model)", got, eager, checks.FLOAT_ATOL)
    check.update(checks.check_int8(name, got, ctx.fp32_logits))
    return check


def _passes(reader: LogMelReader):
    reader.rewind()
    yield from iter(reader.get_next, None)
    reader.rewind()

"""TorchScript artifacts for mobile apps: float and qnnpack int8, full and lite-interpreter files.

The float model is traced (`torch.jit.trace`); the int8 model is made by eager-mode
post-training static quantization for the qnnpack engine (the engine of ARM phones): fuse
conv/bn/relu, attach observers, run calibration batches, convert, then trace. The saved
files load with plain ``torch.jit.load`` / ``_load_for_lite_interpreter`` and no project code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from kws_runtime.files import atomic_path

__all__ = [
    "QUANTIZED_ENGINE",
    "TorchQuantConfig",
    "load_lite",
    "load_torchscript",
    "quantize_qnnpack",
    "quantized_engine",
    "save_lite",
    "save_torchscript",
    "trace",
    "xnnpack_available",
]

QUANTIZED_ENGINE = "qnnpack"


@contextlib.contextmanager
def _quiet_deprecations():
    # torch.jit.* and torch.ao.quantization announce their deprecation on every call, and
    # tracing a quantized model warns that scale/zero-point become trace constants, which is
    # what a quantized model wants.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(torch\.jit|torch\.ao\.quantization|Lite Interpreter)")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, message=r"Converting a tensor to a Python")
        warnings.filterwarnings("ignore", category=UserWarning, message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        yield


def xnnpack_available() -> bool:
    """Whether this torch build has XNNPACK, which `optimize_for_mobile` rewrites ops for."""
    try:
        import torch.backends.xnnpack as xnnpack
    except ImportError:
        return False
    return bool(xnnpack.enabled)


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Run quantized ops with ``engine`` (e.g. ``"qnnpack"``) inside the block."""
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"this torch build has no {engine!r} quantized engine (it has {', '.join(torch.backends.quantized.supported_engines)})"
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace a model in eval mode on an example batch ``(N, 1, n_mels, frames)``.

    ``torch.jit.trace``'s own check (re-running both on the example) is skipped: the caller
    verifies the saved file against the eager model on real inputs, which is stronger.
    """
    if model.training:
        raise ValueError("trace() wants a model in eval mode (batch norm and dropout behave differently in training)")
    with _quiet_deprecations(), torch.no_grad():
        return torch.jit.trace(model, example, check_trace=False)


def _atomic(path, write) -> Path:
    with atomic_path(path) as tmp:
        write(str(tmp))
    return Path(path)


def save_torchscript(module: torch.jit.ScriptModule, path) -> Path:
    """Write a TorchScript file (``torch.jit.save``), atomically."""
    with _quiet_deprecations():
        return _atomic(path, lambda tmp: torch.jit.save(module, tmp))


def save_lite(module: torch.jit.ScriptModule, path, optimize: Optional[bool] = None) -> dict:
    """Write a lite-interpreter file (``.ptl``) atomically, optimized for mobile when possible.

    Args:
        module: a traced or scripted module.
        path: destination.
        optimize: run ``torch.utils.mobile_optimizer.optimize_for_mobile`` first. ``None``
            means "if this torch has XNNPACK": without it the pass has nothing to rewrite to.

    Returns:
        notes for the manifest: ``{"optimized_for_mobile": bool, "reason": str}``.
    """
    if optimize is None:
        optimize = xnnpack_available()
        reason = "XNNPACK available" if optimize else "this torch build has no XNNPACK: written without optimize_for_mobile"
    else:
        reason = "requested" if optimize else "not requested"
    with _quiet_deprecations():
        if optimize:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            module = optimize_for_mobile(module)
        _atomic(path, lambda tmp: module._save_for_lite_interpreter(tmp))
    return {"optimized_for_mobile": bool(optimize), "reason": reason}


def load_torchscript(path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on CPU."""
    with _quiet_deprecations():
        return torch.jit.load(str(path), map_location="cpu")


def load_lite(path):
    """Load a ``.ptl`` file with the lite interpreter."""
    from torch.jit.mobile import _load_for_lite_interpreter

    with _quiet_deprecations():
        return _load_for_lite_interpreter(str(path))


@dataclasses.dataclass(frozen=True)
class TorchQuantConfig:
    """Observers for eager-mode static quantization with the qnnpack engine.

    Attributes:
        per_channel: one weight scale per output channel (qnnpack runs both). The default:
            depthwise convolutions (MobileNetV2, ShuffleNetV2) have channels whose weights
            differ by orders of magnitude, which one scale per tensor flattens to zero.
        reduce_range: 7-bit activations, for kernels whose 8-bit products can saturate.
        observer: activation observer, ``"histogram"`` (minimises quantization error, the
            qnnpack default) or ``"minmax"``.
        float_ends: keep the first convolution and the classifier in float. They hold few of
            the operations but see the rawest input and decide the output; when quantizing
            every layer flips too many decisions, this is the usual mixed-precision fallback.
    """

    per_channel: bool = True
    reduce_range: bool = False
    observer: str = "histogram"
    float_ends: bool = False

    def __post_init__(self):
        if self.observer not in ("histogram", "minmax"):
            raise ValueError(f"unknown observer {self.observer!r}; choose 'histogram' or 'minmax'")

    @property
    def name(self) -> str:
        parts = [self.observer, "per-channel" if self.per_channel else "per-tensor"]
        if self.reduce_range:
            parts.append("reduced range")
        if self.float_ends:
            parts.append("first convolution and classifier in float")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {
            "engine": QUANTIZED_ENGINE,
            "observer": self.observer,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "float_layers": "first convolution, classifier" if self.float_ends else "none",
        }

    def qconfig(self):
        from torch.ao.quantization import (
            HistogramObserver,
            MinMaxObserver,
            PerChannelMinMaxObserver,
            QConfig,
        )

        observer = HistogramObserver if self.observer == "histogram" else MinMaxObserver
        # reduced range = 7-bit activations, spelled as a quantization range (reduce_range= is deprecated)
        qrange = dict(quant_min=0, quant_max=127) if self.reduce_range else {}
        activation = observer.with_args(dtype=torch.quint8, **qrange)
        if self.per_channel:
            weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        else:
            weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        return QConfig(activation=activation, weight=weight)


def quantize_qnnpack(model: nn.Module, batches: Iterable[torch.Tensor], config: TorchQuantConfig = TorchQuantConfig()) -> nn.Module:
    """Post-training static quantization of a copy of ``model`` for the qnnpack engine.

    Args:
        model: float model with QuantStub/DeQuantStub and ``fuse_model()`` (left untouched).
        batches: calibration inputs ``(N, 1, n_mels, frames)``, without augmentation.
        config: observers.

    Returns:
        The quantized eager model, in eval mode; run it inside ``quantized_engine("qnnpack")``.
    """
    if not hasattr(model, "fuse_model"):
        raise TypeError(f"{type(model).__name__} has no fuse_model(); it cannot be quantized in eager mode")
    from torch.ao.quantization import convert, prepare

    q = copy.deepcopy(model).cpu().eval()
    seen = 0
    with _quiet_deprecations(), quantized_engine(QUANTIZED_ENGINE), torch.no_grad():
        q.fuse_model()
        q.qconfig = config.qconfig()
        if config.float_ends:
            _keep_ends_in_float(q)
        prepare(q, inplace=True)
        for batch in batches:
            q(batch)
            seen += int(batch.shape[0])
        if not seen:
            raise ValueError("no calibration batches: the observers saw nothing")
        convert(q, inplace=True)
    return q


class _FloatIsland(nn.Module):
    """A module that stays float inside a quantized model: dequantize, run it, quantize again.

    Without ``requantize`` its float output goes on as is (``dequantize`` of a float tensor
    returns it unchanged, so the model's own DeQuantStub after it is harmless).
    """

    def __init__(self, module: nn.Module, requantize: bool = True):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        module.qconfig = None  # prepare() and convert() leave it, and all it holds, alone
        self.dequant = DeQuantStub()
        self.module = module
        self.quant = QuantStub() if requantize else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.module(self.dequant(x)))


def _keep_ends_in_float(model: nn.Module) -> None:
    """Wrap the first convolution and the classifier (the last convolution or linear layer, in
    registration order: BC-ResNet classifies with a 1x1 convolution) of a fused model in float islands.

    A fused conv-bn-relu is wrapped whole. The classifier's float logits go straight to the
    model's DeQuantStub.
    """
    from torch.ao.nn.intrinsic import _FusedModule

    def unit(name: str) -> str:
        parent = name.rpartition(".")[0]
        return parent if parent and isinstance(model.get_submodule(parent), _FusedModule) else name

    modules = list(model.named_modules())
    layers = [name for name, m in modules if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(layers) < 2 or not isinstance(model.get_submodule(layers[0]), nn.Conv2d):
        raise ValueError(f"{type(model).__name__} has no first convolution and classifier to keep in float")
    for name, requantize in ((unit(layers[0]), True), (unit(layers[-1]), False)):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _FloatIsland(getattr(owner, child), requantize))

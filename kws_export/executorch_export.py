"""ExecuTorch programs (``.pte``) lowered to XNNPACK: fp32, and int8 through the PT2E flow.

The route is the one ExecuTorch documents for CPU (its "XNNPACK Backend" and "Quantization"
pages, docs.pytorch.org/executorch): ``torch.export.export`` ->
``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` -> ``to_executorch()``.
int8 is made before lowering: the model exported with ``torch.export``, ``prepare_pt2e`` with
``XNNPACKQuantizer`` (symmetric int8 weights, per channel by default; asymmetric int8
activations), calibration batches, ``convert_pt2e``.

The programs take a fixed batch of 1, ``(1, 1, n_mels, frames)`` float32 log-mel features, and
return ``(1, classes)`` logits: an app scores one window at a time, and a static shape lets
the runtime plan all memory once. ExecuTorch is an optional dependency (the ``mobile`` extra);
`missing_reason` says whether it is importable without importing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from kws_runtime.files import write_bytes_atomic

__all__ = ["INSTALL_HINT", "Pt2eQuantConfig", "lower_to_pte", "missing_reason", "pte_runner", "quantize_pt2e"]

INSTALL_HINT = "pip install 'kws-toolkit[mobile]'"


def missing_reason() -> Optional[str]:
    """None when ExecuTorch can be imported, else why not and how to install it."""
    if importlib.util.find_spec("executorch") is None:
        return f"ExecuTorch is not installed ({INSTALL_HINT})"
    return None


@dataclasses.dataclass(frozen=True)
class Pt2eQuantConfig:
    """XNNPACK quantizer settings: int8 weights per output channel or per tensor."""

    per_channel: bool = True

    @property
    def name(self) -> str:
        return "per-channel weights" if self.per_channel else "per-tensor weights"

    def to_dict(self) -> dict:
        return {"quantizer": "XNNPACKQuantizer", "weights": "int8 symmetric", "activations": "int8 asymmetric",
                "per_channel": self.per_channel}


# Loggers that report, on import, GPU kernels a CPU build lacks (torchao) and a registration
# torch itself deprecated (torch.utils._pytree, called by torchao): nothing a user can act on.
_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _expected_warnings():
    """ExecuTorch, torch.export and torchao's PT2E flow warn, on import and in use, about their
    own deprecations, their experimental Python runtime and optional kernels this CPU build
    lacks; none concerns these models."""
    loggers = [logging.getLogger(name) for name in _IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                module=r"torch\.|torchao\.|executorch\.|importlib\.resources")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.|torchao\.|executorch\.")
        warnings.filterwarnings("ignore", message=r"This API is experimental")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def lower_to_pte(model: torch.nn.Module, example: torch.Tensor, path) -> Path:
    """Export ``model`` (float, or int8 from `quantize_pt2e`) at ``example``'s shape, lower it to
    XNNPACK and write the program to ``path`` atomically."""
    with _expected_warnings(), torch.no_grad():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        exported = torch.export.export(model, (example,))
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    return write_bytes_atomic(Path(path), program.buffer)


def quantize_pt2e(model: torch.nn.Module, batches: Iterable[torch.Tensor], config: Pt2eQuantConfig = Pt2eQuantConfig()):
    """Post-training static int8 quantization of ``model`` for XNNPACK (left untouched).

    Args:
        model: float model in eval mode.
        batches: calibration inputs ``(N, 1, n_mels, frames)``, any ``N``.
        config: weight granularity.

    Returns:
        The converted module: it runs in eager PyTorch (quantize/dequantize around float ops,
        which is what the selection clips are scored on) and goes to `lower_to_pte`.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("no calibration batches: the observers saw nothing")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _expected_warnings(), torch.no_grad():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=config.per_channel))
        # A symbolic batch axis, so calibration runs whole batches; the program is lowered at batch 1.
        graph = torch.export.export(model, (first,), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        prepared(first)
        for x in batches:
            prepared(x)
        return convert_pt2e(prepared)


def pte_runner(path, threads: int = 1):
    """A loaded ``.pte`` program as ``x (N, 1, n_mels, frames) -> logits (N, classes)``, one clip per call
    (the program's batch is 1), on XNNPACK's thread pool resized to ``threads``."""
    from .scorecard import Runner

    with _expected_warnings():
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        # The pool is process-wide; the scorecard times every artifact on one thread.
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(x):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return np.concatenate([method.execute((clip[None],))[0].numpy() for clip in x])

    return Runner(run, "log_mel", "logits", "executorch")

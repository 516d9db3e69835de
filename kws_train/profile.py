"""Parameter and multiply-accumulate counts of the models, per feature preset.

MACs come from thop (convolutions, linear layers, batch norm and pooling, as thop counts them;
residual adds and concatenations are free). thop attaches counting buffers to every module, so
it only ever sees a copy of the model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

from kws_runtime import FeatureSpec
from kws_runtime.spec import PRESETS, canonical_preset

from .models import ARCHITECTURES, VARIANTS, build_model, model_variants

__all__ = ["profile_model", "profile_table", "format_table"]


def profile_model(model: nn.Module, input_shape: Sequence[int]) -> Tuple[int, int]:
    """Count parameters and MACs of one forward pass.

    Args:
        model: any module; it is not modified (a deep copy is profiled).
        input_shape: full input shape including the batch, e.g. ``(1, 1, 40, 101)``.

    Returns:
        ``(params, macs)``: trainable and frozen parameters, and multiply-accumulates for the whole
        batch (thop's counts are linear in the batch size).
    """
    shape = tuple(int(size) for size in input_shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"input_shape must be a full input shape with a batch, e.g. (1, 1, 40, 101); got {input_shape}")
    probe = copy.deepcopy(model).eval()
    parameter = next(probe.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    # thop prints which counter it registers per module type (kept out of the caller's output)
    # and compares torch versions with distutils, which warns on every call.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="distutils Version classes are deprecated", category=DeprecationWarning)
        import thop  # training-side dependency, only needed here

        macs, _ = thop.profile(probe, inputs=(torch.zeros(shape, device=device),), verbose=False)
    params = sum(p.numel() for p in model.parameters())
    return params, int(macs)


def profile_table(
    feature_presets: Iterable[str] = tuple(PRESETS),
    batch: int = 32,
    num_classes: int = 12,
    architectures: Iterable[str] = ARCHITECTURES,
    variants: Iterable[str] = VARIANTS,
) -> List[dict]:
    """Profile every architecture in each of its variants on each feature preset's input shape.

    Returns:
        One dict per (architecture, variant, preset): ``model``, ``variant``, ``preset``,
        ``input`` (``"40x32"``), ``params``, ``macs_per_clip``, ``batch`` and ``macs_per_batch``
        (``macs_per_clip * batch``; 32 by default, the first models' training batch).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    specs = [(canonical_preset(name), FeatureSpec.preset(name)) for name in feature_presets]
    rows = []
    for architecture in architectures:
        for variant in (v for v in variants if v in model_variants(architecture)):
            model = build_model(architecture, num_classes, variant)
            for preset, spec in specs:
                params, macs = profile_model(model, (1, 1) + tuple(spec.shape))
                rows.append({
                    "model": architecture,
                    "variant": variant,
                    "preset": preset,
                    "input": "x".join(str(size) for size in spec.shape),
                    "params": params,
                    "macs_per_clip": macs,
                    "batch": batch,
                    "macs_per_batch": macs * batch,
                })
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of `profile_table` rows (params in M, MACs in M per clip, G per batch)."""
    batch = rows[0]["batch"] if rows else 32
    header = ("model", "variant", "preset", "input", "params (M)", "MACs/clip (M)", f"MACs/batch {batch} (G)")
    lines = [
        (
            row["model"], row["variant"], row["preset"], row["input"], f"{row['params'] / 1e6:.2f}",
            f"{row['macs_per_clip'] / 1e6:.1f}", f"{row['macs_per_batch'] / 1e9:.2f}",
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned.
    def render(line):
        return "  ".join(
            str(cell).ljust(width) if i < 4 else str(cell).rjust(width) for i, (cell, width) in enumerate(zip(line, widths))
        ).rstrip()

    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines])

"""How an artifact is checked against the model it came from, and how an int8 setting is chosen.

Float artifacts must match the eager model (`compare_float`). An int8 model is refused only
when it disagrees with fp32 on half the clips fp32 decides clearly (`check_int8`): that is a
broken quantization (an overflowing range, a wrong engine), not rounding; smaller losses are
the scorecard's business. Among int8 settings, `select` keeps the one whose outputs follow
fp32 best.

Decisions are compared only where the reference decides by a margin larger than the rounding
can move an output (`decided`): where its top two outputs nearly tie, as they do on every clip
of an untrained or barely trained model, any correct int8 file may pick either.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch

from .executorch_export import Pt2eQuantConfig
from .quantize import OnnxQuantConfig
from .scorecard import agreement

FLOAT_ATOL = 1e-4
E2E_ATOL = 1e-4
# The int8 end-to-end model against log_mel + the int8 network: a feature that differs in the
# last float32 bit can round to the neighbouring int8 step at the network's input, and such
# steps move probabilities by up to a few hundredths (0.06 in the shipped bundles), so
# decisions are compared, not values, on clips whose top two probabilities differ by more
# than 2.5 times that.
E2E_INT8_MIN_AGREEMENT = 0.995
E2E_INT8_MARGIN = 0.15
INT8_MIN_AGREEMENT = 0.5
# fp32 logits an int8 decision is judged against must lead by this much: a healthy int8 file
# moved no logit of the shipped models by more than 0.87 (on 595 real clips each) and flipped
# only clips led by less than 0.7.
INT8_MARGIN = 1.0
# An int8 candidate that flips at most this fraction of the fp32 decisions is kept without
# trying the others (0.5 points: the accuracy budget for int8).
SELECTION_TOLERANCE = 0.005


class VerificationError(RuntimeError):
    """An artifact was written but does not behave like the model it came from."""


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def batched(fn: Callable, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``fn`` over ``x`` in batches, outputs concatenated."""
    return np.concatenate([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def eager_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return batched(lambda b: model(torch.from_numpy(b)).numpy(), x)


def compare_float(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> dict:
    """Outputs within ``atol`` of the eager model's; the figures for the manifest.

    Top-1 is not checked on its own: within the bound it can change only on a clip whose eager
    top two logits are within ``2 * atol`` of each other, a tie that rounding may break either
    way and that is no sign of a broken artifact.
    """
    diff = float(np.max(np.abs(got - want)))
    if not diff <= atol:
        raise VerificationError(f"{name}: outputs differ from the eager model by up to {diff:.3g} (allowed {atol:g})")
    return {"max_abs_diff": diff, "top1_identical": agreement(got, want) == 1.0}


def decided(reference: np.ndarray, margin: float) -> np.ndarray:
    """Which rows of ``reference`` ``(clips, classes)`` have a top-1 that leads the runner-up
    by more than ``margin`` (in the rows' own units): bool ``(clips,)``."""
    top2 = np.sort(reference, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > margin


def _decided_agreement(got: np.ndarray, reference: np.ndarray, margin: float, key: str) -> tuple:
    """Agreement of ``got`` with ``reference`` on the clips ``reference`` decides by more than
    ``margin`` (None if it decides none), how many clips that is, and the manifest figures
    named after ``key``."""
    clear = decided(reference, margin)
    judged = int(clear.sum())
    figures = {f"agreement_{key}": agreement(got, reference), f"decided_clips_{key}": judged}
    if not judged:
        return None, judged, figures
    agree = figures[f"agreement_{key}_decided"] = agreement(got[clear], reference[clear])
    return agree, judged, figures


def check_int8(name: str, got: np.ndarray, fp32_logits: np.ndarray) -> dict:
    """``got`` (logits or probabilities) makes fp32's decision on at least `INT8_MIN_AGREEMENT`
    of the clips fp32 decides by more than `INT8_MARGIN`; the figures for the manifest
    (``agreement_fp32`` over every clip, as the scorecard counts it)."""
    agree, judged, figures = _decided_agreement(got, fp32_logits, INT8_MARGIN, "fp32")
    if agree is not None and agree < INT8_MIN_AGREEMENT:
        raise VerificationError(
            f"{name}: agrees with the fp32 model on only {100 * agree:.1f}% of the {judged} clips "
            f"it decides by more than {INT8_MARGIN:g} logit (at least {100 * INT8_MIN_AGREEMENT:.0f}% expected)"
        )
    return figures


def check_same_network(name: str, got: np.ndarray, want: np.ndarray) -> dict:
    """Two paths to one int8 network's probabilities: the same decision on at least
    `E2E_INT8_MIN_AGREEMENT` of the clips ``want`` decides by more than `E2E_INT8_MARGIN`;
    the figures for the manifest."""
    same, judged, figures = _decided_agreement(got, want, E2E_INT8_MARGIN, "int8_network")
    if same is not None and same < E2E_INT8_MIN_AGREEMENT:
        raise VerificationError(
            f"{name}: top-1 differs on {100 * (1 - same):.2f}% of the {judged} clips decided by more "
            f"than {E2E_INT8_MARGIN:g} (at most {100 * (1 - E2E_INT8_MIN_AGREEMENT):.1f}% allowed)"
        )
    return {**figures, "max_abs_diff": float(np.max(np.abs(got - want)))}


def fidelity(outputs: np.ndarray, fp32_logits: np.ndarray) -> dict:
    """How closely int8 outputs follow fp32 ones: top-1 agreement and mean KL(fp32 || int8) in nats.

    Agreement is what the scorecard reports; the KL divergence also sees the changes that do
    not flip a decision yet, so it separates settings that a few hundred clips cannot.
    """
    p, q = softmax(fp32_logits), softmax(outputs)
    kl = np.sum(p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12))), axis=1)
    return {"agreement": agreement(outputs, fp32_logits), "kl": float(np.mean(kl))}


def select(name: str, candidates: Sequence, build: Callable, outputs: Callable, reference: np.ndarray,
           log: Callable, try_all: bool) -> tuple:
    """Build candidates in order and keep the one whose outputs follow fp32 best.

    ``build(config) -> artifact``, ``outputs(artifact) -> logits`` on the selection clips,
    compared with ``reference`` (the fp32 logits). Stops at the first candidate that flips at
    most `SELECTION_TOLERANCE` of the decisions, unless ``try_all``; of those tried, keeps
    the one with the lowest KL divergence from fp32 (on a few hundred clips, one flipped
    decision more or less is chance; the divergence over all clips and classes is not).

    Returns:
        (best artifact, best config, [{"config": ..., "selection_agreement": ..., "selection_kl": ...}, ...]).
    """
    best = None
    tried = []
    errors = []
    for config in candidates:
        try:
            artifact = build(config)
            score = fidelity(outputs(artifact), reference)
        except Exception as exc:  # one failing setting should not stop the others
            errors.append(f"{config.name}: {exc}")
            tried.append({"config": config.to_dict(), "error": str(exc)})
            log(f"  {name}: {config.name} failed: {exc}")
            continue
        tried.append({"config": config.to_dict(), "selection_agreement": score["agreement"], "selection_kl": score["kl"]})
        log(f"  {name}: {config.name}: on the selection clips agreement with fp32 {100 * score['agreement']:.2f}%, "
            f"KL {score['kl']:.2e}")
        key = (-score["kl"], score["agreement"])
        if best is None or key > best[2]:
            best = (artifact, config, key)
        if score["agreement"] >= 1.0 - SELECTION_TOLERANCE and not try_all:
            break
    if best is None:
        raise RuntimeError("; ".join(errors))
    return best[0], best[1], tried


def candidates(first) -> list:
    """The requested setting, then the alternatives tried when it loses too much accuracy:
    the other weight granularity, reduced range, another activation calibration, and last
    the requested setting with the first convolution and the classifier kept in float
    (for ExecuTorch's XNNPACK quantizer, only the other weight granularity).

    ONNX weights go from full to 7-bit range, never back: full range saturates on x86 CPUs
    without VNNI, which a selection run on another CPU cannot see (`OnnxQuantConfig`)."""
    out = [first]

    def add(config):
        if config.to_dict() not in [c.to_dict() for c in out]:
            out.append(config)

    add(dataclasses.replace(first, per_channel=not first.per_channel))
    if isinstance(first, Pt2eQuantConfig):  # XNNPACK's quantizer: weight granularity is the choice
        return out
    if not (isinstance(first, OnnxQuantConfig) and first.reduce_range):
        add(dataclasses.replace(first, reduce_range=not first.reduce_range))
    if isinstance(first, OnnxQuantConfig):
        # Not entropy: onnxruntime's entropy calibrator searches symmetric thresholds on a
        # histogram centred at zero, which halves the resolution of ReLU outputs; on these
        # models it flipped 5-10% of the decisions (it stays available on request).
        add(dataclasses.replace(first, method="minmax" if first.method != "minmax" else "percentile"))
    else:
        add(dataclasses.replace(first, observer="minmax" if first.observer == "histogram" else "histogram"))
    add(dataclasses.replace(first, float_ends=True))
    return out

"""Knowledge distillation: a student that learns a teacher's softened class probabilities.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015,
arXiv 1503.02531): the training loss mixes the usual cross-entropy on the labels with the
KL divergence from the teacher's to the student's softmax, both at a temperature ``T``; the
KL term is scaled by ``T**2`` so its gradients keep their size as ``T`` changes. Several
teachers form an ensemble: their softened probabilities are averaged.

Teachers are of two kinds. Checkpoints (`load_teachers`) run beside the student and see the
very features it sees, augmentation included, so the soft targets describe the clip as the
student heard it; each step pays for every teacher's forward pass. Bundles
(`bundle_soft_targets`) score every training clip once, as recorded, through their fp32 ONNX
model on onnxruntime before training starts: any exported model can teach, a large ensemble
costs minutes instead of its forward passes at every step, and the soft targets then ignore
what augmentation did to the clip (a shifted or noisier clip keeps its clean targets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kws_runtime.bundle import BundleError
from kws_runtime.features import log_mel
from kws_runtime.spec import FeatureSpec

from .cache import CachedSplit
from .checkpoint import load_checkpoint

__all__ = ["Distiller", "DistillError", "bundle_soft_targets", "distillation_loss", "load_teachers", "soften"]


class DistillError(ValueError):
    """A teacher that cannot teach this run (unreadable, other labels or other features)."""


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T**2 * KL(teacher || softmax(student / T))``, averaged over the batch.

    Args:
        student_logits: (batch, classes), float32.
        teacher_probs: (batch, classes), the teachers' probabilities at the same temperature.
        temperature: ``T`` > 0.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature ** 2


class Distiller(nn.Module):
    """Teachers in eval mode, and the mixing of their soft targets into a student's loss.

    Args:
        teachers: trained models taking the student's features, all with the student's labels;
            empty when the soft targets come with each batch (`bundle_soft_targets`).
        weight: share of the distillation term, in (0, 1]; the label loss gets ``1 - weight``.
        temperature: softmax temperature ``T`` > 0.
    """

    def __init__(self, teachers: Sequence[nn.Module], weight: float, temperature: float):
        super().__init__()
        if not 0 < weight <= 1:
            raise DistillError(f"distillation weight {weight!r}: must be in (0, 1]")
        if not temperature > 0:
            raise DistillError(f"distillation temperature {temperature!r}: must be > 0")
        self.teachers = nn.ModuleList(teachers).eval().requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)

    def train(self, mode: bool = True):
        # a teacher is never trained: its batch norms keep their running statistics
        return super().train(False)

    @torch.no_grad()
    def soft_targets(self, features: torch.Tensor) -> torch.Tensor:
        """The teachers' mean probabilities at temperature ``T``: (batch, classes), float32."""
        if not self.teachers:
            raise DistillError("this distiller has no teachers: its soft targets come with each batch")
        probs = [F.softmax(teacher(features).float() / self.temperature, dim=1) for teacher in self.teachers]
        return torch.stack(probs).mean(dim=0)

    def mix(self, label_loss: torch.Tensor, student_logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        """``(1 - weight) * label_loss + weight * distillation_loss``, in float32.

        Args:
            label_loss: the loss on the labels (a scalar).
            student_logits: (batch, classes).
            soft_targets: `soft_targets` of the features the student scored.
        """
        soft = distillation_loss(student_logits.float(), soft_targets, self.temperature)
        return (1 - self.weight) * label_loss + self.weight * soft


def load_teachers(paths: Sequence, labels: Sequence[str], spec: FeatureSpec, device) -> list:
    """The models of the checkpoints at ``paths``, checked to share the student's labels and features.

    Raises:
        DistillError: naming the checkpoint and what differs.
    """
    teachers = []
    for path in paths:
        try:
            checkpoint = load_checkpoint(path, map_location=device)
        except (OSError, ValueError) as error:  # CheckpointError is a ValueError
            raise DistillError(f"teacher: {error}") from None
        _check_teacher(path, checkpoint.labels, checkpoint.spec, labels, spec)
        teachers.append(checkpoint.model.to(device))
    return teachers


def bundle_soft_targets(bundles: Sequence, split: CachedSplit, spec: FeatureSpec, temperature: float,
                        threads: Optional[int] = None, batch_size: int = 256) -> np.ndarray:
    """The bundles' mean probabilities at temperature ``T`` for every clip of ``split``, as recorded.

    Each bundle's ``onnx_fp32`` model runs on onnxruntime over the runtime's log-mel features
    (equal to the training front end's without augmentation); several bundles form an ensemble.

    Args:
        bundles: bundle folders (`kws_export`), with the split's labels and ``spec``'s features.
        split: the training cache; row ``i`` of the result belongs to its example ``i``.
        spec: the run's feature spec.
        temperature: ``T`` > 0.
        threads: onnxruntime threads per bundle (None: its choice).
        batch_size: clips per model run.

    Returns:
        float32 ``(len(split), classes)``; rows sum to 1.

    Raises:
        DistillError: a bundle that cannot be read or run, or has other labels or features.
    """
    from kws_runtime.predict import Predictor  # onnxruntime: only runs with teacher bundles load it

    predictors = []
    for path in bundles:
        try:
            predictor = Predictor(path, artifact="onnx_fp32", threads=threads)
        except (BundleError, OSError) as error:
            raise DistillError(f"teacher bundle: {error}") from None
        _check_teacher(path, predictor.labels, predictor.spec, split.labels, spec)
        predictors.append(predictor)
    rows = []
    for start in range(0, len(split), batch_size):
        features = log_mel(split.waveforms(np.arange(start, min(start + batch_size, len(split)))), spec)
        try:
            probs = [soften(p.probabilities_of_features(features), temperature) for p in predictors]
        except BundleError as error:
            raise DistillError(f"teacher bundle: {error}") from None
        rows.append(np.mean(probs, axis=0))
    return np.concatenate(rows).astype(np.float32)


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)`` row by row: the probabilities of logits divided by ``T``.

    Args:
        probs: (n, classes) probabilities (a softmax of logits).
        temperature: ``T`` > 0.
    """
    logits = np.log(np.maximum(probs.astype(np.float64), np.finfo(np.float64).tiny)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _check_teacher(path, labels: Sequence[str], spec: FeatureSpec, run_labels: Sequence[str],
                   run_spec: FeatureSpec) -> None:
    if list(labels) != list(run_labels):
        raise DistillError(
            f"teacher {Path(path)}: its labels ({', '.join(labels)}) are not this run's "
            f"({', '.join(run_labels)}); distil from a model of the same task"
        )
    if spec != run_spec:
        raise DistillError(
            f"teacher {Path(path)}: trained on other features ({_brief(spec)}) than this run "
            f"({_brief(run_spec)}); use a teacher of the same --features preset"
        )


def _brief(spec: FeatureSpec) -> str:
    return f"{spec.n_mels}x{spec.n_frames}, FFT {spec.n_fft}, hop {spec.hop_length}"

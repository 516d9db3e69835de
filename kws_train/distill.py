"""Knowledge distillation: a student that learns a teacher's softened class probabilities.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015,
arXiv 1503.02531): the training loss mixes the usual cross-entropy on the labels with the
KL divergence from the teacher's to the student's softmax, both at a temperature ``T``; the
KL term is scaled by ``T**2`` so its gradients keep their size as ``T`` changes. Several
teachers form an ensemble: their softened probabilities are averaged.

The teachers see the very features the student sees, augmentation included, so the soft
targets describe the clip as the student heard it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kws_runtime.spec import FeatureSpec

from .checkpoint import load_checkpoint

__all__ = ["Distiller", "DistillError", "distillation_loss", "load_teachers"]


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
        teachers: trained models taking the student's features, all with the student's labels.
        weight: share of the distillation term, in (0, 1]; the label loss gets ``1 - weight``.
        temperature: softmax temperature ``T`` > 0.
    """

    def __init__(self, teachers: Sequence[nn.Module], weight: float, temperature: float):
        super().__init__()
        if not teachers:
            raise DistillError("distillation needs at least one teacher")
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
        if list(checkpoint.labels) != list(labels):
            raise DistillError(
                f"teacher {Path(path)}: its labels ({', '.join(checkpoint.labels)}) are not this run's "
                f"({', '.join(labels)}); distil from a model of the same task"
            )
        if checkpoint.spec != spec:
            raise DistillError(
                f"teacher {Path(path)}: trained on other features ({_brief(checkpoint.spec)}) than this run "
                f"({_brief(spec)}); use a teacher of the same --features preset"
            )
        teachers.append(checkpoint.model.to(device))
    return teachers


def _brief(spec: FeatureSpec) -> str:
    return f"{spec.n_mels}x{spec.n_frames}, FFT {spec.n_fft}, hop {spec.hop_length}"

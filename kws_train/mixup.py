"""Mixup: train on convex combinations of pairs of examples and of their labels.

Zhang, Cisse, Dauphin and Lopez-Paz, "mixup: Beyond Empirical Risk Minimization" (ICLR 2018,
arXiv 1710.09412), who also measured it on Google Speech Commands spectrograms: each batch is
mixed with a shuffled copy of itself, ``x = w * x_i + (1 - w) * x_j`` with one weight ``w``
drawn from ``Beta(alpha, alpha)``, and the loss is ``w * loss(y_i) + (1 - w) * loss(y_j)``.
Small ``alpha`` (0.1-0.4) keeps most mixtures close to one of the two clips.

Here the log-mel features are mixed, after augmentation, as the paper mixed spectrograms.
The weight is folded to ``w >= 0.5`` (the distribution is symmetric, so nothing changes but
the naming): each row's own label then dominates, and training accuracy stays meaningful.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["Mixup"]


class Mixup:
    """Mixes a batch of features with a shuffled copy of itself.

    Args:
        alpha: the ``Beta(alpha, alpha)`` parameter, > 0.
        seed: seed of the weights and pairings (`manual_seed` sets another).
    """

    def __init__(self, alpha: float, seed: int = 0):
        if not (alpha > 0 and np.isfinite(alpha)):
            raise ValueError(f"mixup alpha {alpha!r}: must be a positive number")
        self.alpha = float(alpha)
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def __call__(self, features: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """The mixed batch.

        Args:
            features: (batch, ...) model inputs.
            targets: (batch,) class indices.

        Returns:
            ``(mixed features, the partners' targets, weight w of each row's own targets)``.
        """
        weight = float(self._rng.beta(self.alpha, self.alpha))
        weight = max(weight, 1.0 - weight)
        order = torch.from_numpy(self._rng.permutation(features.shape[0])).to(features.device)
        mixed = features * weight + features[order] * (1.0 - weight)
        return mixed, targets[order], weight

    @staticmethod
    def loss(criterion, logits: torch.Tensor, targets: torch.Tensor, partners: torch.Tensor,
             weight: float) -> torch.Tensor:
        """``weight * criterion(logits, targets) + (1 - weight) * criterion(logits, partners)``."""
        return weight * criterion(logits, targets) + (1.0 - weight) * criterion(logits, partners)

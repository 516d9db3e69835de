"""An exponential moving average of a model's weights, the form of checkpoint averaging that
needs no stored checkpoints (Polyak and Juditsky 1992; as in ``torch.optim.swa_utils``).

The average is updated after every optimizer step with a decay set by a time constant in
epochs, so the same setting means the same thing for any dataset size or batch size. Batch
norm statistics are averaged with the weights (``use_buffers``): the averaged model is
evaluated as it is, with no pass over the data to recompute them (on BC-ResNet-3 such a pass,
with the training augmentation, changed 4 of 2,975 test decisions: docs/accuracy.md).
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["WeightAverage", "decay_for"]


def decay_for(epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose time constant is ``epochs`` epochs: ``exp(-1 / steps)``."""
    if not epochs > 0:
        raise ValueError(f"averaging time constant {epochs!r}: must be > 0 epochs")
    return math.exp(-1.0 / (epochs * max(steps_per_epoch, 1)))


class WeightAverage:
    """The running average of ``model``'s weights and buffers.

    Args:
        model: the bare model being trained (not a DDP or compiled wrapper).
        decay: per-step decay (`decay_for`).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self._average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and state-dict keys as ``model``)."""
        return self._average.module

    def update(self) -> None:
        """Fold the model's current weights into the average (after an optimizer step)."""
        self._average.update_parameters(self.model)

    def state_dict(self) -> dict:
        return self._average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._average.load_state_dict(state)

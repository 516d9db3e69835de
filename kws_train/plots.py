"""Training-curve and confusion-matrix figures (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kws_runtime.files import atomic_path

__all__ = ["plot_training_curves", "plot_confusion_matrix"]


def _pyplot():
    # Agg: figures are files, never windows, so training runs the same on a headless server.
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def plot_training_curves(history: Sequence[Mapping], path) -> Path:
    """Loss and accuracy per epoch, training and validation, side by side.

    Args:
        history: one mapping per epoch with ``epoch`` and any of ``train_loss``, ``val_loss``,
            ``train_acc``, ``val_acc`` (accuracies in [0, 1]); missing keys are skipped.
        path: PNG file to write.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for ax, keys, title in (
        (ax_loss, ("train_loss", "val_loss"), "loss"),
        (ax_acc, ("train_acc", "val_acc"), "accuracy"),
    ):
        for key in keys:
            points = [(e, row[key]) for e, row in zip(epochs, history) if row.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=key.split("_")[0])
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax_acc.set_ylim(0.0, 1.0)
    return _save(fig, path)


def plot_confusion_matrix(matrix, labels: Sequence[str], path, title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true label, columns: predicted) with counts.

    Args:
        matrix: integer array ``(classes, classes)``; ``matrix[t, p]`` counts clips of label ``t``
            predicted as ``p``.
        labels: class names in output order.
        path: PNG file to write.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({n}, {n}) for {n} labels")
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    plt = _pyplot()
    size = max(4.0, 0.45 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 40:
        for t in range(n):
            for p in range(n):
                if counts[t, p]:
                    ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if rates[t, p] > 0.5 else "black")
    return _save(fig, path)

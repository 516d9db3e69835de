"""Accuracy, per-class figures and confusion matrices of a model on a dataset split.

The model sees exactly what it sees in training: raw audio batches go through the same torch
front end (`kws_train.frontend.Frontend`, in eval mode: no augmentation), then the model.
Under ``torchrun`` each rank scores every ``world_size``-th clip and the confusion matrices
are summed, so every clip counts exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kws_runtime.spec import FeatureSpec

from .checkpoint import Checkpoint, load_checkpoint
from .dataset import SPLITS, UNKNOWN, load_example, noise_files
from .distributed import all_reduce_sum
from .frontend import Frontend
from .recipe import RunRecipe

# Clips per forward pass when scoring (memory, not results, depends on it).
EVAL_BATCH_SIZE = 256

__all__ = [
    "EvalResult",
    "evaluate_model",
    "evaluate_checkpoint",
    "evaluate_examples",
    "predict_files",
    "confusion_matrix",
    "format_report",
]


def confusion_matrix(targets, predictions, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts; ``[t, p]`` = clips of class ``t`` predicted ``p``."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if targets.shape != predictions.shape:
        raise ValueError(f"{targets.size} targets but {predictions.size} predictions")
    flat = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


@dataclasses.dataclass
class EvalResult:
    """Scores of one model on one set of clips.

    Attributes:
        labels: class names in model output order.
        confusion: int64 ``(classes, classes)``, rows true label, columns prediction.
        loss: mean cross-entropy (no smoothing, no class weights), or None if not computed.
    """

    labels: list
    confusion: np.ndarray
    loss: Optional[float] = None

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def accuracy(self) -> float:
        """Share of clips predicted correctly, in [0, 1] (0 for no clips)."""
        return self.correct / self.count if self.count else 0.0

    def per_class(self) -> list:
        """One dict per label: ``label``, ``support`` (true clips), ``correct``, ``recall``,
        ``precision`` and ``f1`` (None where undefined: no clips of, or predicted as, the label)."""
        rows = []
        predicted = self.confusion.sum(axis=0)
        for i, label in enumerate(self.labels):
            support, hit = int(self.confusion[i].sum()), int(self.confusion[i, i])
            recall = hit / support if support else None
            precision = hit / int(predicted[i]) if predicted[i] else None
            f1 = None
            if recall is not None and precision is not None:
                f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
            rows.append({"label": label, "support": support, "correct": hit, "recall": recall,
                         "precision": precision, "f1": f1})
        return rows

    def to_dict(self) -> dict:
        """JSON-safe figures: accuracy, count, loss, per-class rows and the confusion matrix."""
        return {
            "accuracy": self.accuracy,
            "count": self.count,
            "correct": self.correct,
            "loss": self.loss,
            "labels": list(self.labels),
            "per_class": self.per_class(),
            "confusion": self.confusion.tolist(),
        }


def format_report(result: EvalResult) -> str:
    """Accuracy line, a per-class table and the confusion matrix as text."""
    lines = [f"accuracy {100 * result.accuracy:.2f}% ({result.correct}/{result.count} clips)"]
    if result.loss is not None:
        lines[0] += f", loss {result.loss:.4f}"
    width = max(len("label"), *(len(label) for label in result.labels))

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    lines.append("")
    lines.append(f"{'label'.ljust(width)}  support  recall%  precision%    f1%")
    for row in result.per_class():
        lines.append(f"{row['label'].ljust(width)}  {row['support']:7d}  {pct(row['recall']):>7}  "
                     f"{pct(row['precision']):>10}  {pct(row['f1']):>5}")
    lines.append("")
    lines.append("confusion matrix (rows: true label, columns: predicted, in the order above)")
    cell = max(4, len(str(int(result.confusion.max(initial=0)))) + 1)
    for label, row in zip(result.labels, result.confusion):
        lines.append(f"{label.ljust(width)} " + "".join(str(int(v)).rjust(cell) for v in row))
    return "\n".join(lines)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    frontend: Frontend,
    waveforms: Callable[[np.ndarray], np.ndarray],
    targets: np.ndarray,
    labels: Sequence[str],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device=None,
    autocast_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> EvalResult:
    """Score a model on clips given as a waveform source.

    Args:
        model: logits model ``(N, 1, n_mels, frames) -> (N, classes)`` (put in eval mode here;
            the caller's mode is restored).
        frontend: raw audio -> model input; its spec must be the model's.
        waveforms: ``indices -> float32 (len(indices), clip_samples)``, e.g.
            `kws_train.cache.CachedSplit.waveforms`.
        targets: int ``(clips,)`` class indices.
        labels: class names in output order.
        batch_size: clips per forward pass.
        device: where to run (default: the model's parameters' device).
        autocast_dtype: run the model under autocast with this dtype (None: full precision).
        channels_last: feed the model channels-last tensors (faster convolutions on GPUs).
        rank, world_size: score only clips ``rank, rank + world_size, ...`` and sum the
            confusion matrices over the process group (every rank gets the total).
        progress: show a tqdm bar.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    num_classes = len(labels)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    mine = np.arange(rank, len(targets), world_size)
    was_training = model.training, frontend.training
    model.eval()
    frontend.eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="evaluating", unit="clip", leave=False)
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            audio = torch.from_numpy(np.ascontiguousarray(waveforms(idx), dtype=np.float32)).to(device)
            y = torch.from_numpy(targets[idx]).to(device)
            x = frontend(audio)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with amp:
                logits = model(x)
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
            pred = logits.argmax(dim=1)
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training[0])
        frontend.train(was_training[1])
    if world_size > 1:
        all_reduce_sum(confusion)
        all_reduce_sum(loss_sum)
    matrix = confusion.cpu().numpy()
    total = int(matrix.sum())
    return EvalResult(list(labels), matrix, float(loss_sum.item()) / total if total else None)


def evaluate_checkpoint(
    checkpoint,
    data_root,
    *,
    split: str = "auto",
    recipe: Optional[RunRecipe] = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Score a checkpoint on a dataset split, with the checkpoint's own features and labels.

    Args:
        checkpoint: a path or a loaded `kws_train.checkpoint.Checkpoint`.
        data_root: a Speech Commands folder (`kws_train.dataset.index_dataset`).
        split: ``"training"``, ``"validation"``, ``"testing"``, ``"all"`` (every clip of the
            folder, as test clips), or ``"auto"``: all clips of the official test archive (a
            folder with ``_unknown_/`` and no ``testing_list.txt``), else ``"testing"``.
        recipe: how the split is composed; default the checkpoint's own (`RunRecipe`), so on
            the run's folder this scores exactly the examples the run held out.
        batch_size: clips per forward pass.
        device: ``"cpu"`` or ``"cuda"``.

    Raises:
        CheckpointError, DatasetError, ValueError: unreadable checkpoint, unusable data, or no
            clips in the split.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, map_location="cpu")
    recipe = ckpt.recipe if recipe is None else recipe
    if split not in SPLITS + ("all", "auto"):
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS + ('all', 'auto'))}")
    if split == "auto":
        root = Path(data_root)
        test_archive = (root / UNKNOWN).is_dir() and not (root / "testing_list.txt").is_file()
        split = "all" if test_archive and recipe.split.method == "dataset" else "testing"
    if not noise_files(data_root):
        # nothing to cut silence from: score the words (and any ready-made silence clips)
        recipe = dataclasses.replace(recipe, silence_share=0.0)
    examples = recipe.task_split(data_root, split)
    if not examples.examples:
        raise ValueError(f"{data_root}: no clips of the {recipe.task}-class task in the {split!r} split")
    return evaluate_examples(ckpt.model, ckpt.spec, examples.examples, ckpt.labels,
                             batch_size=batch_size, device=device, progress=progress)


def evaluate_examples(
    model: nn.Module,
    spec: FeatureSpec,
    examples: Sequence,
    labels: Sequence[str],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Score a model on `kws_train.dataset.Example` s, decoding each batch as it is needed."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise ValueError(f"examples labelled {', '.join(unknown)} are not among the model's labels {list(labels)}")
    targets = np.array([index[e.label] for e in examples], dtype=np.int64)

    def waveforms(idx):
        return np.stack([load_example(examples[i], spec) for i in idx])

    device = torch.device(device)
    model = model.to(device)
    frontend = Frontend(spec).to(device)
    return evaluate_model(model, frontend, waveforms, targets, labels, batch_size=batch_size,
                          device=device, progress=progress)



@torch.no_grad()
def predict_files(checkpoint, paths: Sequence, *, batch_size: int = 64, device: str = "cpu") -> list:
    """Label audio files with a checkpoint's model.

    Each file is read with `kws_runtime.audio.load_audio` (resampled, mono, padded or cut to
    the spec's clip length) and goes through the same torch front end as in training.

    Args:
        checkpoint: a path or a loaded `kws_train.checkpoint.Checkpoint`.
        paths: audio files.

    Returns:
        ``(path, label, probability)`` per file, in input order.

    Raises:
        AudioError: a file that cannot be decoded (the message names it).
    """
    from kws_runtime.audio import load_audio

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, map_location="cpu")
    device = torch.device(device)
    model = ckpt.model.to(device).eval()
    frontend = Frontend(ckpt.spec).to(device).eval()
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        audio = torch.from_numpy(np.stack([load_audio(p, ckpt.spec) for p in chunk])).to(device)
        probabilities = torch.softmax(model(frontend(audio)).float(), dim=1)
        best, index = probabilities.max(dim=1)
        out += [(p, ckpt.labels[i], float(q)) for p, i, q in zip(chunk, index.tolist(), best.tolist())]
    return out

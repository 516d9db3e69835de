"""Training checkpoints: weights plus everything needed to rebuild and serve the model.

A checkpoint is one ``torch.save`` file holding a plain dict (no pickled classes), so it loads
with ``torch.load(weights_only=True)``::

    {"format": "kws-checkpoint", "format_version": 1,
     "architecture": "resnet18", "variant": "default", "labels": [...in output order...],
     "feature_spec": FeatureSpec.to_dict(), "config": {...}, "extra": {...},
     "state_dict": {name: tensor}}

``config`` is the training configuration, ``extra`` anything a resumed run needs (optimizer,
scheduler, epoch, RNG states); both may nest dicts, lists and tensors.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from kws_runtime import FeatureSpec, SpecError
from kws_runtime.files import write_bytes_atomic

from .models import build_model, canonical_architecture

__all__ = ["Checkpoint", "CheckpointError", "FORMAT", "FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

FORMAT = "kws-checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded; the message names the file and the problem."""


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint. `model` is a float model in eval mode, on `map_location`."""

    model: nn.Module
    architecture: str
    variant: str
    labels: list
    spec: FeatureSpec
    config: dict
    extra: dict
    path: Optional[Path] = None


# Leaf types torch.load(weights_only=True) rebuilds; exact types, so numpy scalars
# (subclasses of float) are caught here instead of failing at load time.
_PLAIN_TYPES = (str, bytes, int, float, complex, bool, type(None), torch.device, torch.dtype, torch.Size)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set)


def _check_loadable(obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_TYPES:
        return
    if type(obj) not in _CONTAINERS:
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
            "cannot read back; store tensors, numbers, strings, lists or dicts instead"
        )
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_loadable(key, f"{where} key {key!r}")
            _check_loadable(value, f"{where}[{key!r}]")
    else:
        for index, value in enumerate(obj):
            _check_loadable(value, f"{where}[{index}]")


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the model in .module, torch.compile in ._orig_mod;
    # the checkpoint stores the bare model's keys so it loads anywhere.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _brief(names: Sequence[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def _check_state_dict(state: dict, model: nn.Module, where: str, what: str) -> None:
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_brief(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_brief(unexpected)}")
    if not problems:
        wrong = [
            f"{name} {tuple(state[name].shape)} vs {tuple(tensor.shape)}"
            for name, tensor in expected.items()
            if not isinstance(state[name], torch.Tensor) or state[name].shape != tensor.shape
        ]
        if wrong:
            problems.append(f"{len(wrong)} tensor(s) of the wrong shape (stored vs expected): {_brief(wrong, 3)}")
    if problems:
        raise CheckpointError(f"{where}: the weights do not match {what}: " + "; ".join(problems))


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    *,
    architecture: str,
    variant: str,
    labels: Sequence[str],
    spec: FeatureSpec,
    config: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write `model`'s float weights and metadata to `path` atomically (temp file, then rename).

    Args:
        path: destination file; its directory must exist.
        model: the float model (not fused or quantized); DDP/DataParallel/compiled wrappers are unwrapped.
        architecture: name or alias accepted by `kws_train.models.build_model`.
        variant: model variant the weights belong to.
        labels: class names in output order (their count is the model's output size).
        spec: the features the model was trained on.
        config: training configuration (JSON-like).
        extra: anything else to restore later (optimizer/scheduler state, epoch, RNG state):
            nested dicts/lists/tuples of tensors, numbers and strings.

    Returns:
        The path written.

    Raises:
        CheckpointError: the weights do not fit the named architecture/variant/label count,
            or config/extra hold something that could not be loaded back.
    """
    path = Path(path)
    if not isinstance(spec, FeatureSpec):
        raise TypeError(f"spec must be a FeatureSpec, got {type(spec).__name__}")
    labels = list(labels)
    if not labels or not all(isinstance(label, str) for label in labels):
        raise CheckpointError(f"{path}: labels must be a non-empty list of strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise CheckpointError(f"{path}: labels must be unique, got {labels!r}")
    try:
        architecture = canonical_architecture(architecture)
        reference = build_model(architecture, len(labels), variant)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model = _unwrap(model)
    state = collections.OrderedDict((name, tensor.detach().cpu()) for name, tensor in model.state_dict().items())
    # Refuse at save time what load_checkpoint would refuse later (e.g. a fused model).
    try:
        _check_state_dict(state, reference, str(path), f"{architecture} ({variant}) with {len(labels)} classes")
    except CheckpointError as error:
        raise CheckpointError(f"{error} (save the float model, before fuse_model() or quantization)") from None
    config = {} if config is None else config
    extra = {} if extra is None else extra
    for name, value in (("config", config), ("extra", extra)):
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {name} must be a dict, got {type(value).__name__}")
        try:
            _check_loadable(value, name)
        except TypeError as error:
            raise CheckpointError(f"{path}: {error}") from None
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "variant": variant,
        "labels": labels,
        "feature_spec": spec.to_dict(),
        "config": config,
        "extra": extra,
        "state_dict": state,
    }
    # Serialised in memory first: torch's own writer reports a full disk as an internal
    # RuntimeError naming no file, while a plain write names the file and says the disk is full.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_bytes_atomic(path, buffer.getbuffer())


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` and rebuild its model (eval mode).

    Only plain data is unpickled (``torch.load(weights_only=True)``), and the stored weights must
    match the rebuilt model key for key and shape for shape.

    Raises:
        CheckpointError: missing or unreadable file, not a checkpoint, unsupported format version,
            unknown architecture or variant, bad feature spec, or weights that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not a kws checkpoint: it holds Python objects that weights-only loading refuses "
            "(only files written by save_checkpoint are accepted)"
        ) from None
    except Exception as error:  # foreign files surface as KeyError, EOFError, RuntimeError, ...
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(error).__name__}); "
            "expected a file written by save_checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kws checkpoint (no \"format\": \"{FORMAT}\" entry)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this version reads {FORMAT_VERSION})"
        )
    fields = {
        "architecture": str, "variant": str, "labels": list, "feature_spec": dict,
        "config": dict, "extra": dict, "state_dict": dict,
    }
    for name, kind in fields.items():
        if not isinstance(payload.get(name), kind):
            raise CheckpointError(f"{path}: field {name!r} is missing or not a {kind.__name__}")
    labels = payload["labels"]
    if not labels or not all(isinstance(label, str) for label in labels):
        raise CheckpointError(f"{path}: labels must be a non-empty list of strings")
    try:
        spec = FeatureSpec.from_dict(payload["feature_spec"])
    except SpecError as error:
        raise CheckpointError(f"{path}: bad feature spec: {error}") from None
    try:
        architecture = canonical_architecture(payload["architecture"])
        model = build_model(architecture, len(labels), payload["variant"])
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    variant = payload["variant"]
    _check_state_dict(payload["state_dict"], model, str(path), f"{architecture} ({variant}) with {len(labels)} classes")
    model.load_state_dict(payload["state_dict"], strict=True)
    if isinstance(map_location, (str, torch.device)):
        # load_state_dict copies into the freshly built (CPU) parameters: move the model itself.
        model.to(map_location)
    model.eval()
    return Checkpoint(
        model=model,
        architecture=architecture,
        variant=variant,
        labels=list(labels),
        spec=spec,
        config=payload["config"],
        extra=payload["extra"],
        path=path,
    )

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
import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from kws_runtime import FeatureSpec, SpecError
from kws_runtime.files import write_bytes_atomic

from .models import build_model, canonical_architecture, canonical_variant
from .recipe import recipe_from_config

__all__ = [
    "Checkpoint", "CheckpointError", "FORMAT", "FORMAT_VERSION", "ResumeState", "capture_rng_state", "load_checkpoint",
    "restore_rng_state", "save_checkpoint",
]

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

    @property
    def recipe(self):
        """The run's `kws_train.recipe.RunRecipe` (converted for checkpoints older than recipes)."""
        return recipe_from_config(self.config, self.spec, self.labels)


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
    payload = _read_payload(path, map_location)
    labels = payload["labels"]
    if not labels or not all(isinstance(label, str) for label in labels):
        raise CheckpointError(f"{path}: labels must be a non-empty list of strings")
    try:
        spec = FeatureSpec.from_dict(payload["feature_spec"])
    except SpecError as error:
        raise CheckpointError(f"{path}: bad feature spec: {error}") from None
    try:
        architecture = canonical_architecture(payload["architecture"])
        variant = canonical_variant(payload["variant"])
        model = build_model(architecture, len(labels), variant)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
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


def _read_payload(path: Path, map_location: Any) -> dict:
    """The checkpoint's dict, checked to be a kws checkpoint of this format with every field present."""
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
    return payload


# ------------------------------------------------------------------------------ resume state


@dataclasses.dataclass
class ResumeState:
    """What ``last.pt`` holds beyond the weights, so that a run continues exactly: stored as
    the checkpoint's ``extra``.

    Attributes:
        epoch: epochs finished.
        best_val_accuracy, best_epoch: of the run so far.
        history: the per-epoch metric rows.
        optimizer, scheduler, scaler: their ``state_dict()`` (the scheduler's lambda is rebuilt
            from the config, so it is stored as None).
        rng: `capture_rng_state` output.
        average: the weight average's ``state_dict()`` when the run keeps one (else empty).
    """

    epoch: int
    best_val_accuracy: float
    best_epoch: int
    history: list
    optimizer: dict
    scheduler: dict
    scaler: dict
    rng: dict
    average: dict = dataclasses.field(default_factory=dict)

    def to_extra(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_extra(cls, extra: dict, path) -> "ResumeState":
        # runs written before weight averaging existed have no "average": they kept none
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in extra and f.name != "average"]
        if "optimizer" in missing or "epoch" in missing:
            raise CheckpointError(f"{path}: holds no training state to resume from (use last.pt of a run)")
        if missing:
            raise CheckpointError(f"{path}: its training state lacks {', '.join(missing)}; it cannot be resumed")
        return cls(
            epoch=int(extra["epoch"]), best_val_accuracy=float(extra["best_val_accuracy"]),
            best_epoch=int(extra["best_epoch"]), history=list(extra["history"]), optimizer=extra["optimizer"],
            scheduler=extra["scheduler"], scaler=extra["scaler"], rng=extra["rng"], average=extra.get("average") or {},
        )


def capture_rng_state() -> dict:
    """Every global generator a run draws from (torch, CUDA, numpy, Python) as plain data."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what `capture_rng_state` captured (CUDA only with the same device count)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# weights_only loading rebuilds tensors, lists and numbers, not numpy arrays or tuples with
# arrays inside: the generators' states are stored in those terms.
def _numpy_state_to_plain(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_plain(d: dict):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_plain(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)

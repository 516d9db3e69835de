"""Training: `TrainConfig` in, checkpoints, metrics and figures out.

One code path for every device: a CPU, one GPU, or several GPUs (or CPU processes) under
``torchrun`` with DistributedDataParallel. Clips are decoded once into an int16 cache
(`kws_train.cache`), batches of raw audio go to the device, and features and augmentation
run there (`kws_train.augment.build_frontend`). Rank 0 writes everything in ``out``:

    best.pt, last.pt   checkpoints (`kws_train.checkpoint`); last.pt also holds what
                       ``resume`` needs: optimizer, scheduler, scaler, epoch, RNG states
    metrics.jsonl      one JSON object per epoch
    curves.png         loss and accuracy per epoch
    confusion.png      confusion matrix of best.pt on the test split (validation if none)
    summary.json       best epoch, validation and test figures

Reproducibility: the data order depends only on (seed, epoch), and the augmentation
generators and torch's global generator (dropout) are re-seeded from (seed, epoch, rank) at
each epoch, so a run resumed from last.pt continues exactly as the uninterrupted run would
have (bit for bit on a CPU with the same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from kws_runtime.spec import FeatureSpec
from kws_runtime.files import check_writable_folder, copy_atomic, write_json_atomic, write_text_atomic

from . import plots
from .augment import AugmentConfig, build_frontend
from .cache import BatchLoader, build_cache
from .checkpoint import save_checkpoint
from .dataset import SPLITS, TASKS, background_noise, index_dataset, task_split
from .distributed import (
    DistContext, all_reduce_sum, barrier, broadcast_buffers, init_distributed, shutdown_distributed,
)
from .evaluate import EvalResult, evaluate_model
from .models import VARIANTS, build_model, canonical_architecture

__all__ = [
    "AMP_MODES", "TrainConfig", "TrainError", "TrainResult", "default_weights_path", "resolve_autocast", "split_options", "train",
    "train_epoch",
    "warmup_cosine",
]

AMP_MODES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
BALANCING = ("none", "loss", "sampler")
SPLIT_METHODS = ("dataset", "speaker")
DEFAULT_LR = {"adamw": 2e-3, "sgd": 0.05}

# Settings a resumed run must share with the run it continues (others, like epochs or out, may change).
_RESUME_MUST_MATCH = (
    "architecture", "variant", "task", "features", "batch_size", "optimizer", "seed", "balance",
    "split", "split_salt", "validation_fraction", "testing_fraction", "augment",
)


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says why and what to do."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (stored in every checkpoint it writes).

    Attributes:
        data: Speech Commands root (`kws_train.dataset.index_dataset`).
        out: folder for checkpoints, metrics and figures (created).
        architecture: ``resnet18``, ``mobilenet_v2``, ``shufflenet_v2_x0_5`` or an alias.
        variant: ``"default"`` or ``"seed"`` (`kws_train.models`).
        task: ``"12"`` or ``"35"``.
        features: feature preset name (`kws_runtime.FeatureSpec.preset`).
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size: clips per optimizer step per process.
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum).
        lr: peak learning rate; None picks `DEFAULT_LR` for the optimizer.
        weight_decay: decoupled (AdamW) or L2 (SGD) decay on weights; never on norms and biases.
        momentum: SGD momentum.
        warmup_epochs: linear warm-up from ``lr / 100`` before the cosine decay (may be fractional).
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        label_smoothing: cross-entropy label smoothing.
        balance: ``"loss"`` (class weights ``1 / count``, normalised), ``"sampler"`` (draw
            clips with replacement, every class equally often) or ``"none"``.
        augment: time shift, background noise, gain and SpecAugment (`kws_train.augment`).
        augment_config: `AugmentConfig` fields overriding its defaults.
        split: ``"dataset"`` (the dataset's lists or hash rule) or ``"speaker"`` (re-split
            by speaker with ``split_salt`` and the two fractions).
        extra_train: more dataset roots whose clips all join the training split (e.g.
            synthetic speech from ``kws-data synth``); validation and test stay on ``data``.
        silence_percentage, unknown_percentage: 12-class task composition (`build_task`).
        device: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        amp: ``"auto"`` (bf16 on GPUs that have it, else fp16 with a gradient scaler; off on
            CPUs), ``"off"``, ``"bf16"`` or ``"fp16"`` (GPU only).
        channels_last: channels-last memory format; None: on for CUDA.
        compile: ``torch.compile`` the model.
        seed: model initialisation, data order, task sampling and augmentation.
        deterministic: ask torch for deterministic kernels (slower on GPUs).
        resume: continue from ``out/last.pt`` (or this path if a string).
        stop_after_epochs: end this run after that many epochs even if ``epochs`` is not
            reached (for time-limited jobs; ``resume`` continues).
        cache_dir: where decoded audio caches go; None: ``<out>/../cache``.
        workers: decoding threads when a cache is built.
        threads: torch intra-op CPU threads (``torch.set_num_threads``); None keeps torch's
            choice. On a CPU shared with other jobs, 1 is often much faster than more.
        eval_batch_size: clips per forward pass in validation and testing.
        save_weights: also copy best.pt to this file (the CLI's ``-s``).
        quiet: no progress bars and no per-epoch lines.
    """

    data: str
    out: str = "runs/train"
    architecture: str = "resnet18"
    variant: str = "default"
    task: str = "12"
    features: str = "fine"
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: Optional[float] = None
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    balance: str = "loss"
    augment: bool = True
    augment_config: dict = dataclasses.field(default_factory=dict)
    split: str = "dataset"
    split_salt: str = ""
    validation_fraction: float = 0.1
    testing_fraction: float = 0.1
    extra_train: List[str] = dataclasses.field(default_factory=list)
    silence_percentage: float = 10.0
    unknown_percentage: float = 10.0
    device: str = "auto"
    amp: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    resume: object = False
    stop_after_epochs: Optional[int] = None
    cache_dir: Optional[str] = None
    workers: int = 2
    threads: Optional[int] = None
    eval_batch_size: int = 256
    save_weights: Optional[str] = None
    quiet: bool = False

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}: {why}")

        try:
            self.architecture = canonical_architecture(self.architecture)
        except ValueError as error:
            raise ValueError(f"TrainConfig.architecture: {error}") from None
        self.task = str(self.task)
        self.data, self.out = os.fspath(self.data), os.fspath(self.out)
        self.extra_train = [os.fspath(p) for p in self.extra_train]
        if self.variant not in VARIANTS:
            bad("variant", f"choose one of {', '.join(VARIANTS)}")
        if self.task not in TASKS:
            bad("task", f"choose one of {', '.join(TASKS)}")
        FeatureSpec.preset(self.features)  # SpecError (a ValueError) names the presets
        for field in ("epochs", "batch_size", "eval_batch_size", "workers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(field, "must be a positive integer")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            bad("threads", "must be a positive integer or None")
        if self.stop_after_epochs is not None and (not isinstance(self.stop_after_epochs, int) or self.stop_after_epochs < 1):
            bad("stop_after_epochs", "must be a positive integer or None")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a positive number")
        for field in ("weight_decay", "warmup_epochs", "momentum"):
            if not (getattr(self, field) >= 0):
                bad(field, "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "must be in [0, 1)")
        if self.balance not in BALANCING:
            bad("balance", f"choose one of {', '.join(BALANCING)}")
        if self.split not in SPLIT_METHODS:
            bad("split", f"choose one of {', '.join(SPLIT_METHODS)}")
        if self.device not in ("auto", "cuda", "cpu"):
            bad("device", "choose auto, cuda or cpu")
        if self.amp not in AMP_MODES:
            bad("amp", f"choose one of {', '.join(AMP_MODES)}")
        AugmentConfig.from_dict(self.augment_config)  # unknown or bad fields fail now, not mid-run

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.preset(self.features)

    def to_dict(self) -> dict:
        """JSON-safe dict (what checkpoints store)."""
        d = dataclasses.asdict(self)
        d["resume"] = self.resume if isinstance(self.resume, (bool, str)) else os.fspath(self.resume)
        return d


@dataclasses.dataclass
class TrainResult:
    """What a run produced. `model` is the bare model with the final epoch's weights (every rank)."""

    out: Path
    best_path: Path
    last_path: Path
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    history: list
    test: Optional[EvalResult]
    validation: Optional[EvalResult]
    samples_per_second: float
    model: nn.Module
    labels: list
    spec: FeatureSpec

    def summary(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "epochs_run": self.epochs_run,
            "train_samples_per_second": self.samples_per_second,
            "validation": None if self.validation is None else self.validation.to_dict(),
            "test": None if self.test is None else self.test.to_dict(),
        }


def default_weights_path(architecture: str, root=None) -> Path:
    """The file ``kws-train -s`` updates and plain ``kws-train -m ARCH -d FILES`` predicts with:
    ``<root>/<architecture>.pt`` where root defaults to ``$KWS_WEIGHTS_DIR`` or ``./weights``."""
    root = Path(root if root is not None else os.environ.get("KWS_WEIGHTS_DIR", "weights"))
    return root / f"{canonical_architecture(architecture)}.pt"


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor at ``step``: linear 0.01 -> 1 over ``warmup_steps``, then a cosine
    from 1 down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return 0.01 + 0.99 * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Schedule:
    """Picklable-free lr lambda: its state is the three numbers, saved with the scheduler."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.min_ratio)


# ---------------------------------------------------------------------------------------------
# Pieces of a run


def _log(ctx: DistContext, config: TrainConfig, message: str) -> None:
    if ctx.is_main and not config.quiet:
        print(message, flush=True)


def resolve_autocast(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for an ``amp`` mode (`AMP_MODES`) on ``device``; None: full precision.

    ``"auto"`` is bf16 on GPUs that support it, else fp16 (which needs a gradient scaler),
    and off on CPUs (``"bf16"`` turns CPU autocast on when asked for).

    Raises:
        TrainError: fp16 on a CPU, or bf16 on a GPU without it.
    """
    device = torch.device(device)
    if amp not in AMP_MODES:
        raise TrainError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise TrainError("--amp fp16 needs a GPU (use --amp bf16 or off on a CPU)")
        return torch.float16
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainError("this GPU does not support bfloat16; use --amp fp16")
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def split_options(config: dict) -> dict:
    """`kws_train.dataset.task_split` keywords that reproduce a run's splits.

    Args:
        config: a `TrainConfig` as a dict (``to_dict()``, what checkpoints store); missing or
            malformed fields take the defaults, so checkpoints of older runs still resolve.
    """
    def number(key, default):
        value = config.get(key, default)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    return {
        "salt": str(config.get("split_salt", "")) if config.get("split") == "speaker" else None,
        "validation_fraction": float(number("validation_fraction", 0.1)),
        "testing_fraction": float(number("testing_fraction", 0.1)),
        "silence_percentage": float(number("silence_percentage", 10.0)),
        "unknown_percentage": float(number("unknown_percentage", 10.0)),
        "seed": int(number("seed", 0)),
    }


def _tasks(config: TrainConfig, spec: FeatureSpec):
    options = dict(split_options(config.to_dict()), spec=spec, extra_training=config.extra_train,
                   clips=index_dataset(config.data))
    train, val, test = (task_split(config.data, config.task, split, **options) for split in SPLITS)
    how = "the dataset's split" if config.split == "dataset" else f"--split speaker (salt {config.split_salt!r})"
    if not train.examples:
        raise TrainError(f"{config.data}: no training clips of the {config.task}-class task under {how}")
    if not val.examples:
        raise TrainError(
            f"{config.data}: no validation clips under {how}; use a dataset with a validation split "
            "or --split speaker with a validation fraction that gives some speakers"
        )
    return train, val, test


def _class_weights(counts: np.ndarray) -> torch.Tensor:
    # N / (classes present * count): the average weight over the training clips is 1
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            # norms and biases: decay would only pull them toward zero, not regularise
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.peak_lr)


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _augment_seed(config: TrainConfig, epoch: int, rank: int) -> int:
    # distinct streams per epoch and per rank, all derived from the run's seed
    return (config.seed * 1_000_003 + epoch * 1_009 + rank * 2) % (2**62)


def _resume_path(config: TrainConfig) -> Optional[Path]:
    if config.resume is False or config.resume is None:
        return None
    if config.resume is True:
        return Path(config.out) / "last.pt"
    return Path(config.resume)


def _load_resume_state(path: Path, config: TrainConfig) -> dict:
    if not path.is_file():
        raise TrainError(f"{path}: nothing to resume from (no such file); train without --resume first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainError(f"{path}: cannot read it to resume ({type(error).__name__}: {error})") from None
    extra = payload.get("extra", {}) if isinstance(payload, dict) else {}
    if "optimizer" not in extra or "epoch" not in extra:
        raise TrainError(f"{path}: holds no training state to resume from (use last.pt of a run)")
    stored = payload.get("config", {})
    changed = [f"{key}: {stored.get(key)!r} -> {getattr(config, key)!r}"
               for key in _RESUME_MUST_MATCH if key in stored and stored[key] != config.to_dict()[key]]
    if changed:
        raise TrainError(f"{path}: cannot resume with different settings ({'; '.join(changed)})")
    return payload


# ---------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig) -> TrainResult:
    """Train a model as `config` says; see the module docstring for what lands in ``config.out``.

    Under ``torchrun`` every process calls this with the same config; rank 0 writes files.

    Raises:
        TrainError, DatasetError, CacheError, CheckpointError, ValueError: with a message that
            says what is wrong (missing data, empty splits, no GPU, a resume that does not fit).
    """
    started_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        ctx = init_distributed(config.device)
    except RuntimeError as error:
        raise TrainError(str(error)) from None
    out = Path(config.out)
    out_existed = out.exists()
    try:
        return _train(config, ctx)
    except BaseException:
        # A run that failed before writing anything leaves no empty folder behind.
        if ctx.is_main and not out_existed and out.is_dir() and not any(out.iterdir()):
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        if started_here:
            shutdown_distributed()


def _train(config: TrainConfig, ctx: DistContext) -> TrainResult:
    device = ctx.device
    spec = config.spec
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    autocast_dtype = resolve_autocast(config.amp, device)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    resume_from = _resume_path(config)
    resume_state = _load_resume_state(resume_from, config) if resume_from is not None else None
    if ctx.is_main:
        # now, not after an epoch's work: an output folder that cannot be written fails here
        check_writable_folder(out)
    if resume_state is None and (out / "last.pt").is_file():
        _log(ctx, config, f"note: {out} holds an earlier run; its checkpoints will be replaced (--resume continues it)")

    # --- data
    train_task, val_task, test_task = _tasks(config, spec)
    labels = list(train_task.labels)
    cache_dir = Path(config.cache_dir) if config.cache_dir else out.parent / "cache"
    show = ctx.is_main and not config.quiet and sys.stderr.isatty()
    splits = {}
    # rank 0 decodes; the others wait and then open the same caches
    for turn in ((0,) if not ctx.distributed else (0, 1)):
        if (turn == 0) == ctx.is_main:
            for name, task in (("training", train_task), ("validation", val_task), ("testing", test_task)):
                if task.examples:
                    splits[name] = build_cache(task, cache_dir, name, spec, workers=config.workers, progress=show)
        if ctx.distributed:
            barrier(ctx)
    train_split, val_split, test_split = splits["training"], splits["validation"], splits.get("testing")
    counts = train_split.counts()
    _log(ctx, config, f"data: {len(train_split)} training, {len(val_split)} validation, "
         f"{0 if test_split is None else len(test_split)} test clips; {len(labels)} classes; "
         f"features {config.features} {spec.shape[0]}x{spec.shape[1]}; device {device}"
         + (f" x{ctx.world_size}" if ctx.distributed else "")
         + (f"; autocast {str(autocast_dtype).replace('torch.', '')}" if autocast_dtype else ""))
    empty = [label for label, n in zip(labels, counts) if n == 0]
    if empty:
        _log(ctx, config, f"warning: no training clips of {', '.join(empty)}")

    per_rank = -(-len(train_split) // ctx.world_size)
    loader = BatchLoader(
        train_split, config.batch_size, shuffle=True, seed=config.seed,
        sample_weights="balanced" if config.balance == "sampler" else None,
        # a last batch of one clip would break batch norm; keep it only if it is all there is
        drop_last=per_rank >= config.batch_size, device=device, rank=ctx.rank, world_size=ctx.world_size,
    )
    steps_per_epoch = len(loader)

    # --- model, front end, optimizer
    torch.manual_seed(config.seed)
    model = build_model(config.architecture, len(labels), config.variant).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    noise = background_noise(config.data, spec.sample_rate) if config.augment else []
    augment = None
    if config.augment:
        fields = dict(config.augment_config)
        if not noise and fields.get("noise_prob", AugmentConfig().noise_prob) > 0:
            _log(ctx, config, f"warning: {config.data} has no _background_noise_/: training without noise mixing")
            fields["noise_prob"] = 0.0
        augment = AugmentConfig.from_dict(fields)
    frontend = build_frontend(spec, augment, noise, seed=_augment_seed(config, 0, ctx.rank)).to(device)
    # LogMel picks a float64 FFT on CPUs to match the runtime to 1e-3 dB; training does not
    # need that, and float32 halves the cost of the long seed-preset FFT.
    frontend.log_mel.fft_dtype = torch.float32
    eval_frontend = build_frontend(spec, None).to(device)

    optimizer = _optimizer(config, model)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(total_steps, warmup_steps, config.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    weights = _class_weights(counts).to(device) if config.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)

    start_epoch, best_acc, best_epoch, history = 0, -1.0, 0, []
    if resume_state is not None:
        extra = resume_state["extra"]
        model.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        # the schedule follows this run's epochs (which may extend the stored run's)
        scheduler.lr_lambdas[0] = _Schedule(total_steps, warmup_steps, config.min_lr_ratio)
        if extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        start_epoch = int(extra["epoch"])
        best_acc, best_epoch = float(extra["best_val_accuracy"]), int(extra["best_epoch"])
        history = list(extra.get("history", []))
        _set_rng_state(extra["rng"])
        _log(ctx, config, f"resuming {resume_from} after epoch {start_epoch} (best {100 * best_acc:.2f}% at epoch {best_epoch})")

    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)

    meta = dict(architecture=config.architecture, variant=config.variant, labels=labels, spec=spec,
                config={**config.to_dict(), "augment_resolved": augment.to_dict() if augment else None})
    best_path, last_path = out / "best.pt", out / "last.pt"

    def save(path: Path, epoch: int) -> None:
        extra = {
            "epoch": epoch, "best_val_accuracy": best_acc, "best_epoch": best_epoch, "history": history,
            "optimizer": optimizer.state_dict(), "scheduler": _scheduler_state(scheduler),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": _rng_state(),
        }
        save_checkpoint(path, model, extra=extra, **meta)

    # --- epochs
    last_epoch = min(config.epochs, start_epoch + config.stop_after_epochs) if config.stop_after_epochs else config.epochs
    throughput = []
    validation = None
    for epoch in range(start_epoch + 1, last_epoch + 1):
        tick = time.perf_counter()
        loader.set_epoch(epoch)
        epoch_seed = _augment_seed(config, epoch, ctx.rank)
        for offset, augmenter in enumerate((frontend.waveform_augment, frontend.spec_augment)):
            if augmenter is not None:
                augmenter.manual_seed(epoch_seed + offset)
        # dropout draws from the global generator, which anything between epochs (building a
        # model to check a checkpoint, say) may also draw from: give each epoch its own stream
        torch.manual_seed(epoch_seed + 2)
        train_loss, train_acc, seen = train_epoch(
            net, frontend, loader, optimizer, scheduler, scaler, criterion, device=device,
            autocast_dtype=autocast_dtype, channels_last=channels_last, desc=f"epoch {epoch}/{config.epochs}",
            progress=show,
        )
        train_seconds = time.perf_counter() - tick
        samples_per_s = seen * ctx.world_size / max(train_seconds, 1e-9)
        throughput.append(samples_per_s)
        if ctx.distributed:
            broadcast_buffers(model)
        validation = evaluate_model(
            model, eval_frontend, val_split.waveforms, val_split.targets, labels,
            batch_size=config.eval_batch_size, device=device, autocast_dtype=autocast_dtype,
            channels_last=channels_last, rank=ctx.rank, world_size=ctx.world_size,
        )
        improved = validation.accuracy > best_acc
        if improved:
            best_acc, best_epoch = validation.accuracy, epoch
        row = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": validation.loss, "val_acc": validation.accuracy,
            "lr": optimizer.param_groups[0]["lr"], "best": improved,
            "seconds": round(time.perf_counter() - tick, 3), "train_samples_per_s": round(samples_per_s, 1),
        }
        history.append(row)
        if ctx.is_main:
            if improved:
                save(best_path, epoch)
            save(last_path, epoch)
            write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
            plots.plot_training_curves(history, out / "curves.png")
        _log(ctx, config, f"epoch {epoch}/{config.epochs}  train loss {train_loss:.4f} acc {100 * train_acc:.2f}%  "
             f"val loss {validation.loss:.4f} acc {100 * validation.accuracy:.2f}%"
             f"{'  *' if improved else ''}  ({row['seconds']:.1f} s, {samples_per_s:.0f} clips/s)")
        if ctx.distributed:
            barrier(ctx)

    finished = last_epoch >= config.epochs
    test_result = None
    if ctx.is_main and history and best_path.is_file():
        # the final figures are those of the best checkpoint, on clips it never chose by
        from .checkpoint import load_checkpoint

        best = load_checkpoint(best_path, map_location=device)
        scored = best_split = None
        if test_split is not None:
            test_result = evaluate_model(best.model, eval_frontend, test_split.waveforms, test_split.targets, labels,
                                         batch_size=config.eval_batch_size, device=device)
            scored, best_split = test_result, "test"
        else:
            scored = evaluate_model(best.model, eval_frontend, val_split.waveforms, val_split.targets, labels,
                                    batch_size=config.eval_batch_size, device=device)
            best_split = "validation"
        plots.plot_confusion_matrix(scored.confusion, labels, out / "confusion.png",
                                    title=f"{config.architecture} ({config.variant}), {best_split} split, "
                                          f"{100 * scored.accuracy:.1f}%")
        summary = {
            "architecture": config.architecture, "variant": config.variant, "features": config.features,
            "task": config.task, "seed": config.seed, "epochs_run": len(history), "finished": finished,
            "best_epoch": best_epoch, "best_val_accuracy": best_acc,
            "train_samples_per_s": float(np.median(throughput)) if throughput else None,
            "train_clips": len(train_split), "val_clips": len(val_split),
            "test_clips": 0 if test_split is None else len(test_split),
            "test": None if test_result is None else test_result.to_dict(),
        }
        write_json_atomic(out / "summary.json", summary, indent=1)
        if test_result is not None:
            _log(ctx, config, f"best epoch {best_epoch}: val {100 * best_acc:.2f}%, test {100 * test_result.accuracy:.2f}% "
                 f"({test_result.count} clips)")
        if config.save_weights and finished:
            copy_atomic(best_path, Path(config.save_weights))
            _log(ctx, config, f"updated {config.save_weights}")
    if ctx.distributed:
        barrier(ctx)
    return TrainResult(
        out=out, best_path=best_path, last_path=last_path, best_epoch=best_epoch, best_val_accuracy=best_acc,
        epochs_run=len(history), history=history, test=test_result, validation=validation,
        samples_per_second=float(np.median(throughput)) if throughput else 0.0,
        model=model, labels=labels, spec=spec,
    )


def _scheduler_state(scheduler) -> dict:
    # the lambda is rebuilt from the config on resume; only the counters need saving
    state = scheduler.state_dict()
    state["lr_lambdas"] = [None]
    return state


def train_epoch(net, frontend, batches, optimizer, scheduler, scaler, criterion, *, device, autocast_dtype=None,
                channels_last: bool = False, desc: str = "", progress: bool = False):
    """One pass of optimizer steps over ``batches`` of ``(audio (B, samples), targets (B,))``.

    The front end (augmentation, log-mel) runs without gradients, the model under autocast
    when ``autocast_dtype`` is given, the loss in float32; the scheduler steps per batch.

    Returns:
        ``(mean loss, accuracy, clips seen by this rank)``; loss and accuracy are summed over
        the process group when there is one.
    """
    net.train()
    frontend.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc=desc, unit="batch", leave=False)
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    try:
        for step, (audio, targets) in enumerate(batches):
            with torch.no_grad():
                x = frontend(audio)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp():
                logits = net(x)
            loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = targets.shape[0]
            seen += n
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            if bar is not None:
                bar.update()
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        if bar is not None:
            bar.close()
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
    all_reduce_sum(totals)
    loss_total, correct_total, count = totals.tolist()
    return loss_total / max(count, 1), correct_total / max(count, 1), seen

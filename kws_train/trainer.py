"""Training: a `kws_train.config.TrainConfig` in, checkpoints, metrics and figures out.

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
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from kws_runtime.bundle import BundleError, load_bundle
from kws_runtime.files import check_writable_folder, copy_atomic, write_json_atomic, write_text_atomic
from kws_runtime.spec import FeatureSpec

from . import plots
from .augment import AugmentConfig, build_frontend
from .averaging import WeightAverage, decay_for
from .cache import BatchLoader, CachedSplit, build_cache
from .checkpoint import CheckpointError, ResumeState, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import AMP_MODES, TrainConfig
from .dataset import SPLITS, background_noise, index_dataset
from .distill import Distiller, bundle_soft_targets, load_teachers
from .distributed import (
    DistContext, all_reduce_sum, barrier, broadcast_buffers, init_distributed, shutdown_distributed,
)
from .evaluate import EvalResult, evaluate_model
from .mixup import Mixup
from .models import build_model, canonical_architecture
from .recipe import RecipeError

__all__ = [
    "TrainError", "TrainResult", "default_weights_path", "resolve_autocast", "train", "train_epoch", "warmup_cosine",
]

# Settings a resumed run must share with the run it continues, besides its recipe (others,
# like epochs or out, may change).
_RESUME_MUST_MATCH = ("architecture", "variant", "batch_size", "optimizer", "balance", "augment")


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says why and what to do."""


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
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def _augment_seed(config: TrainConfig, epoch: int, rank: int) -> int:
    # distinct streams per epoch and per rank, all derived from the run's seed
    return (config.seed * 1_000_003 + epoch * 1_009 + rank * 2) % (2**62)


@contextlib.contextmanager
def _main_process_first(ctx: DistContext):
    """Rank 0 runs the block, then the other ranks do (and find its results, e.g. caches)."""
    if ctx.distributed and not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.distributed and ctx.is_main:
        barrier(ctx)


# ---------------------------------------------------------------------------------------------
# The run, in stages: prepare (settings, resume state, output folder), data, parts (model,
# front ends, optimizer), fit (the epochs), finish (the final test and summary.json).


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
        resume = _prepare(config, ctx)
        data = _prepare_data(config, ctx)
        parts = _build(config, ctx, data)
        progress = _Progress.start(parts, resume, ctx, config)
        validation = _fit(config, ctx, data, parts, progress)
        return _finish(config, ctx, data, parts, progress, validation)
    except BaseException:
        # A run that failed before writing anything leaves no empty folder behind.
        if ctx.is_main and not out_existed and out.is_dir() and not any(out.iterdir()):
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        if started_here:
            shutdown_distributed()


def _prepare(config: TrainConfig, ctx: DistContext) -> Optional[tuple]:
    """Process-wide settings, the resume state to continue from, and a writable ``out``."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for teacher in config.teachers:  # now, not after the data is decoded
        if not Path(teacher).is_file():
            raise TrainError(f"teacher {teacher}: no such checkpoint file")
    for bundle in config.teacher_bundles:
        try:  # the manifest only: the files are hashed once, when the bundle scores the clips
            load_bundle(bundle, verify=False)
        except BundleError as error:
            raise TrainError(f"teacher bundle: {error}") from None
    resume = _load_resume_state(config)
    out = Path(config.out)
    if ctx.is_main:
        # now, not after an epoch's work: an output folder that cannot be written fails here
        check_writable_folder(out)
        if resume is None and (out / "last.pt").is_file():
            _log(ctx, config, f"note: {out} holds an earlier run; its checkpoints will be replaced (--resume continues it)")
    return resume


def _resume_path(config: TrainConfig) -> Optional[Path]:
    if config.resume is False or config.resume is None:
        return None
    if config.resume is True:
        return Path(config.out) / "last.pt"
    return Path(config.resume)


def _load_resume_state(config: TrainConfig) -> Optional[tuple]:
    """``(path, weights, ResumeState)`` of the checkpoint to continue from, or None."""
    path = _resume_path(config)
    if path is None:
        return None
    if not path.is_file():
        raise TrainError(f"{path}: nothing to resume from (no such file); train without --resume first")
    try:
        stored = load_checkpoint(path)
        state = ResumeState.from_extra(stored.extra, path)
        recipe = stored.recipe
    except (CheckpointError, RecipeError) as error:
        raise TrainError(f"cannot resume: {error}") from None
    theirs_config = {**stored.config, "variant": stored.variant}  # under today's variant name
    changed = [f"{key}: {theirs_config.get(key)!r} -> {getattr(config, key)!r}"
               for key in _RESUME_MUST_MATCH if key in theirs_config and theirs_config[key] != config.to_dict()[key]]
    theirs, ours = recipe.to_dict(), config.recipe.to_dict()
    changed += [f"{key}: {theirs[key]!r} -> {ours[key]!r}" for key in ours if theirs[key] != ours[key] and key != "spec"]
    if recipe.spec != config.spec:
        changed.append(f"features: {stored.config.get('features', recipe.spec)!r} -> {config.features!r}")
    if changed:
        hint = "give the options the run was started with"
        if (theirs["unknown_draw"], theirs["unknown_share"]) != (ours["unknown_draw"], ours["unknown_share"]):
            # runs from before the per-word default differ here without any option given
            hint += f" (here --unknown-draw {theirs['unknown_draw']} --unknown-share {theirs['unknown_share']:g})"
        raise TrainError(f"{path}: cannot resume with different settings ({'; '.join(changed)}); {hint}")
    return path, stored.model.state_dict(), state


@dataclasses.dataclass
class _RunData:
    labels: list
    train: CachedSplit
    val: CachedSplit
    test: Optional[CachedSplit]
    loader: BatchLoader


def _prepare_data(config: TrainConfig, ctx: DistContext) -> _RunData:
    """The run's three splits (from its recipe), decoded into caches, and the batch loader."""
    recipe, spec = config.recipe, config.spec
    clips = index_dataset(config.data)
    tasks = {name: recipe.task_split(config.data, name, clips=clips) for name in SPLITS}
    if not tasks["training"].examples:
        raise TrainError(f"{config.data}: no training clips of the {config.task}-class task under {recipe.describe_split()}")
    if not tasks["validation"].examples:
        raise TrainError(
            f"{config.data}: no validation clips under {recipe.describe_split()}; use a dataset with a validation "
            "split or --split speaker with a validation fraction that gives some speakers"
        )
    cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.out).parent / "cache"
    show = ctx.is_main and not config.quiet and sys.stderr.isatty()
    with _main_process_first(ctx):
        splits = {name: build_cache(task, cache_dir, name, spec, workers=config.workers, progress=show)
                  for name, task in tasks.items() if task.examples}
    labels = list(tasks["training"].labels)
    train_split, val_split, test_split = splits["training"], splits["validation"], splits.get("testing")
    _log(ctx, config, f"data: {len(train_split)} training, {len(val_split)} validation, "
         f"{0 if test_split is None else len(test_split)} test clips; {len(labels)} classes; "
         f"features {config.features} {spec.n_mels}x{spec.n_frames}; device {ctx.device}"
         + (f" x{ctx.world_size}" if ctx.distributed else ""))
    empty = [label for label, n in zip(labels, train_split.counts()) if n == 0]
    if empty:
        _log(ctx, config, f"warning: no training clips of {', '.join(empty)}")
    per_rank = -(-len(train_split) // ctx.world_size)
    loader = BatchLoader(
        train_split, config.batch_size, shuffle=True, seed=config.seed,
        sample_weights="balanced" if config.balance == "sampler" else None,
        # a last batch of one clip would break batch norm; keep it only if it is all there is
        drop_last=per_rank >= config.batch_size, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
        rows=_stored_soft_targets(config, ctx, train_split),
    )
    return _RunData(labels, train_split, val_split, test_split, loader)


def _stored_soft_targets(config: TrainConfig, ctx: DistContext, train_split: CachedSplit) -> Optional[np.ndarray]:
    """The teacher bundles' soft targets of every training clip, or None without teacher bundles."""
    if not config.teacher_bundles:
        return None
    tick = time.perf_counter()
    soft = bundle_soft_targets(config.teacher_bundles, train_split, config.spec, config.distill_temperature,
                               threads=config.threads)
    _log(ctx, config, f"soft targets of the {len(train_split)} training clips from {', '.join(config.teacher_bundles)} "
         f"({time.perf_counter() - tick:.0f} s)")
    return soft


@dataclasses.dataclass
class _Parts:
    model: nn.Module  # the bare model (checkpoints store its weights)
    net: nn.Module  # what the steps run: the model, maybe wrapped in DDP and compiled
    frontend: nn.Module
    eval_frontend: nn.Module
    augment: Optional[AugmentConfig]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    autocast_dtype: Optional[torch.dtype]
    channels_last: bool
    distiller: Optional[Distiller]
    average: Optional[WeightAverage]
    mixup: Optional[Mixup]

    @property
    def scored(self) -> nn.Module:
        """The model validation scores and best.pt holds: the weight average when there is one."""
        return self.average.module if self.average is not None else self.model


def _build(config: TrainConfig, ctx: DistContext, data: _RunData) -> _Parts:
    """Model, training and evaluation front ends, optimizer, schedule, loss."""
    device, spec = ctx.device, config.spec
    autocast_dtype = resolve_autocast(config.amp, device)
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    torch.manual_seed(config.seed)
    model = build_model(config.architecture, len(data.labels), config.variant).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    augment = _augment_config(config, ctx)
    noise = background_noise(config.data, spec.sample_rate) if augment is not None else []
    frontend = build_frontend(spec, augment, noise, seed=_augment_seed(config, 0, ctx.rank)).to(device)
    # LogMel picks a float64 FFT on CPUs to match the runtime to 1e-3 dB; training does not
    # need that, and float32 halves the cost of the long 2048-sample FFT.
    frontend.log_mel.fft_dtype = torch.float32
    optimizer = _optimizer(config, model)
    steps_per_epoch = len(data.loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, steps_per_epoch))
    weights = _class_weights(data.train.counts()).to(device) if config.balance == "loss" else None
    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    if autocast_dtype:
        _log(ctx, config, f"autocast {str(autocast_dtype).replace('torch.', '')}")
    distiller = None
    if config.teachers or config.teacher_bundles:
        teachers = load_teachers(config.teachers, data.labels, spec, device)
        if channels_last:
            teachers = [teacher.to(memory_format=torch.channels_last) for teacher in teachers]
        distiller = Distiller(teachers, config.distill_weight, config.distill_temperature)
        _log(ctx, config, f"distilling from {', '.join(config.teachers or config.teacher_bundles)} "
             f"(weight {config.distill_weight:g}, temperature {config.distill_temperature:g})")
    average = None
    if config.average_epochs is not None:
        average = WeightAverage(model, decay_for(config.average_epochs, steps_per_epoch))
    return _Parts(
        model=model, net=net, frontend=frontend, eval_frontend=build_frontend(spec, None).to(device), augment=augment,
        optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing),
        autocast_dtype=autocast_dtype, channels_last=channels_last, distiller=distiller, average=average,
        mixup=Mixup(config.mixup) if config.mixup > 0 else None,
    )


def _augment_config(config: TrainConfig, ctx: DistContext) -> Optional[AugmentConfig]:
    if not config.augment:
        return None
    fields = dict(config.augment_config)
    if not background_noise(config.data, config.spec.sample_rate) and fields.get("noise_prob", AugmentConfig().noise_prob) > 0:
        _log(ctx, config, f"warning: {config.data} has no _background_noise_/: training without noise mixing")
        fields["noise_prob"] = 0.0
    return AugmentConfig.from_dict(fields)


def _schedule(config: TrainConfig, steps_per_epoch: int) -> "_Schedule":
    # follows this run's epochs, which a resumed run may extend beyond the stored run's
    return _Schedule(steps_per_epoch * config.epochs, int(round(config.warmup_epochs * steps_per_epoch)), config.min_lr_ratio)


@dataclasses.dataclass
class _Progress:
    """Where the run stands: epochs done, the best so far, the metric rows, throughput."""

    epoch: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    throughput: list = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, parts: _Parts, resume: Optional[tuple], ctx: DistContext, config: TrainConfig) -> "_Progress":
        """A fresh start, or the stored run's state put back into ``parts`` and the RNGs.

        The scheduler keeps the schedule `_build` made from this run's config (its stored
        lambda is None), so a resumed run may extend the epochs.
        """
        if resume is None:
            return cls()
        path, weights, state = resume
        parts.model.load_state_dict(weights)
        parts.optimizer.load_state_dict(state.optimizer)
        parts.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            parts.scaler.load_state_dict(state.scaler)
        if parts.average is not None and state.average:
            parts.average.load_state_dict(state.average)
        restore_rng_state(state.rng)
        _log(ctx, config, f"resuming {path} after epoch {state.epoch} "
             f"(best {100 * state.best_val_accuracy:.2f}% at epoch {state.best_epoch})")
        return cls(state.epoch, state.best_val_accuracy, state.best_epoch, list(state.history))

    def resume_state(self, parts: _Parts) -> ResumeState:
        return ResumeState(
            epoch=self.epoch, best_val_accuracy=self.best_val_accuracy, best_epoch=self.best_epoch,
            history=self.history, optimizer=parts.optimizer.state_dict(), scheduler=_scheduler_state(parts.scheduler),
            scaler=parts.scaler.state_dict() if parts.scaler.is_enabled() else {}, rng=capture_rng_state(),
            average=parts.average.state_dict() if parts.average is not None else {},
        )


def _save(config: TrainConfig, data: _RunData, parts: _Parts, progress: _Progress, path: Path,
          model: nn.Module) -> None:
    config_dict = {**config.to_dict(), "recipe": config.recipe.to_dict(),
                   "augment_resolved": parts.augment.to_dict() if parts.augment else None}
    save_checkpoint(path, model, architecture=config.architecture, variant=config.variant, labels=data.labels,
                    spec=config.spec, config=config_dict, extra=progress.resume_state(parts).to_extra())


def _fit(config: TrainConfig, ctx: DistContext, data: _RunData, parts: _Parts, progress: _Progress):
    """The epochs: train, validate, checkpoint (best.pt when validation improves, last.pt always)."""
    out = Path(config.out)
    last_epoch = config.epochs
    if config.stop_after_epochs:
        last_epoch = min(config.epochs, progress.epoch + config.stop_after_epochs)
    show = ctx.is_main and not config.quiet and sys.stderr.isatty()
    validation = None
    for epoch in range(progress.epoch + 1, last_epoch + 1):
        tick = time.perf_counter()
        _seed_epoch(config, ctx, data, parts, epoch)
        train_loss, train_acc, seen = train_epoch(
            parts.net, parts.frontend, data.loader, parts.optimizer, parts.scheduler, parts.scaler, parts.criterion,
            device=ctx.device, autocast_dtype=parts.autocast_dtype, channels_last=parts.channels_last,
            distiller=parts.distiller, average=parts.average, mixup=parts.mixup, desc=f"epoch {epoch}/{config.epochs}",
            progress=show,
        )
        samples_per_s = seen * ctx.world_size / max(time.perf_counter() - tick, 1e-9)
        progress.throughput.append(samples_per_s)
        if ctx.distributed:
            broadcast_buffers(parts.model)
        validation = evaluate_model(
            parts.scored, parts.eval_frontend, data.val.waveforms, data.val.targets, data.labels,
            batch_size=config.eval_batch_size, device=ctx.device, autocast_dtype=parts.autocast_dtype,
            channels_last=parts.channels_last, rank=ctx.rank, world_size=ctx.world_size,
        )
        improved = validation.accuracy > progress.best_val_accuracy
        if improved:
            progress.best_val_accuracy, progress.best_epoch = validation.accuracy, epoch
        progress.epoch = epoch
        row = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": validation.loss, "val_acc": validation.accuracy,
            "lr": parts.optimizer.param_groups[0]["lr"], "best": improved,
            "seconds": round(time.perf_counter() - tick, 3), "train_samples_per_s": round(samples_per_s, 1),
        }
        progress.history.append(row)
        if ctx.is_main:
            if improved:
                _save(config, data, parts, progress, out / "best.pt", parts.scored)
            # last.pt holds the trained weights (the average, if any, is in its state)
            _save(config, data, parts, progress, out / "last.pt", parts.model)
            write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in progress.history))
            plots.plot_training_curves(progress.history, out / "curves.png")
        _log(ctx, config, f"epoch {epoch}/{config.epochs}  train loss {train_loss:.4f} acc {100 * train_acc:.2f}%  "
             f"val loss {validation.loss:.4f} acc {100 * validation.accuracy:.2f}%"
             f"{'  *' if improved else ''}  ({row['seconds']:.1f} s, {samples_per_s:.0f} clips/s)")
        if ctx.distributed:
            barrier(ctx)
    return validation


def _seed_epoch(config: TrainConfig, ctx: DistContext, data: _RunData, parts: _Parts, epoch: int) -> None:
    data.loader.set_epoch(epoch)
    epoch_seed = _augment_seed(config, epoch, ctx.rank)
    for offset, augmenter in enumerate((parts.frontend.waveform_augment, parts.frontend.spec_augment)):
        if augmenter is not None:
            augmenter.manual_seed(epoch_seed + offset)
    if parts.mixup is not None:
        parts.mixup.manual_seed(epoch_seed + 3)
    # dropout draws from the global generator, which anything between epochs (building a
    # model to check a checkpoint, say) may also draw from: give each epoch its own stream
    torch.manual_seed(epoch_seed + 2)


def _finish(config: TrainConfig, ctx: DistContext, data: _RunData, parts: _Parts, progress: _Progress,
            validation) -> TrainResult:
    """Score best.pt on the test split (validation if none), draw its confusion matrix, write summary.json."""
    out = Path(config.out)
    best_path, last_path = out / "best.pt", out / "last.pt"
    finished = progress.epoch >= config.epochs
    test_result = None
    throughput = float(np.median(progress.throughput)) if progress.throughput else None
    if ctx.is_main and progress.history and best_path.is_file():
        # the final figures are those of the best checkpoint, on clips it never chose by
        best = load_checkpoint(best_path, map_location=ctx.device)
        split, scored_on = ("test", data.test) if data.test is not None else ("validation", data.val)
        scored = evaluate_model(best.model, parts.eval_frontend, scored_on.waveforms, scored_on.targets, data.labels,
                                batch_size=config.eval_batch_size, device=ctx.device)
        test_result = scored if data.test is not None else None
        plots.plot_confusion_matrix(scored.confusion, data.labels, out / "confusion.png",
                                    title=f"{config.architecture} ({config.variant}), {split} split, "
                                          f"{100 * scored.accuracy:.1f}%")
        summary = {
            "architecture": config.architecture, "variant": config.variant, "features": config.features,
            "task": config.task, "seed": config.seed, "epochs_run": len(progress.history), "finished": finished,
            "best_epoch": progress.best_epoch, "best_val_accuracy": progress.best_val_accuracy,
            "train_samples_per_s": throughput,
            "train_clips": len(data.train), "val_clips": len(data.val),
            "test_clips": 0 if data.test is None else len(data.test),
            "test": None if test_result is None else test_result.to_dict(),
        }
        write_json_atomic(out / "summary.json", summary, indent=1)
        if test_result is not None:
            _log(ctx, config, f"best epoch {progress.best_epoch}: val {100 * progress.best_val_accuracy:.2f}%, "
                 f"test {100 * test_result.accuracy:.2f}% ({test_result.count} clips)")
        if config.save_weights and finished:
            copy_atomic(best_path, Path(config.save_weights))
            _log(ctx, config, f"updated {config.save_weights}")
    if ctx.distributed:
        barrier(ctx)
    return TrainResult(
        out=out, best_path=best_path, last_path=last_path, best_epoch=progress.best_epoch,
        best_val_accuracy=progress.best_val_accuracy, epochs_run=len(progress.history), history=progress.history,
        test=test_result, validation=validation, samples_per_second=throughput or 0.0,
        model=parts.model, labels=data.labels, spec=config.spec,
    )


def _scheduler_state(scheduler) -> dict:
    # the lambda is rebuilt from the config on resume; only the counters need saving
    state = scheduler.state_dict()
    state["lr_lambdas"] = [None]
    return state


def train_epoch(net, frontend, batches, optimizer, scheduler, scaler, criterion, *, device, autocast_dtype=None,
                channels_last: bool = False, distiller: Optional[Distiller] = None,
                average: Optional[WeightAverage] = None, mixup: Optional[Mixup] = None, desc: str = "",
                progress: bool = False):
    """One pass of optimizer steps over ``batches`` of ``(audio (B, samples), targets (B,))``, or of
    ``(audio, targets, soft targets (B, classes))`` when a ``distiller`` without teachers learns from stored ones.

    The front end (augmentation, log-mel) runs without gradients, the model under autocast
    when ``autocast_dtype`` is given, the loss in float32; the scheduler steps per batch.
    With ``mixup``, the model and any teachers see mixed features and the loss mixes both labels;
    with a ``distiller``, its teachers score the same features and their soft targets join the loss;
    an ``average`` is updated after every step.

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
        for step, (audio, targets, *stored) in enumerate(batches):
            with torch.no_grad():
                x = frontend(audio)
                if mixup is not None:
                    x, partners, weight = mixup(x, targets)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp():
                logits = net(x)
                soft = None if distiller is None else stored[0] if stored else distiller.soft_targets(x)
            if mixup is not None:
                loss = mixup.loss(criterion, logits.float(), targets, partners, weight)
            else:
                loss = criterion(logits.float(), targets)
            if soft is not None:
                loss = distiller.mix(loss, logits, soft)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if average is not None:
                average.update()
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

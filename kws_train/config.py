"""What a training run is: `TrainConfig`, and each architecture's measured default `Schedule`.

A config is plain data, checked when it is made: `kws_train.trainer.train` runs it, checkpoints
store it (`TrainConfig.to_dict`), and a resumed run or `kws-train eval` rebuilds its recipe.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Optional

from kws_runtime.spec import FeatureSpec, canonical_preset

from .augment import AugmentConfig
from .dataset import TASKS
from .evaluate import EVAL_BATCH_SIZE
from .models import canonical_architecture, canonical_variant, model_variants
from .recipe import RecipeError, RunRecipe, SplitRule, default_of

__all__ = ["AMP_MODES", "BALANCING", "OPTIMIZERS", "SCHEDULES", "SGD_LR", "Schedule", "TrainConfig"]

AMP_MODES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
BALANCING = ("none", "loss", "sampler")
SGD_LR = 0.05


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An architecture's training defaults, measured on the official protocol (docs/accuracy.md).

    Attributes:
        epochs: epochs of a run.
        adamw_lr: peak AdamW learning rate (SGD runs use `SGD_LR`).
        warmup_epochs: linear warm-up before the cosine decay.
    """

    epochs: int
    adamw_lr: float
    warmup_epochs: float


# The small models underfit ResNet-18's schedule (a short, cool one): they need a hotter
# learning rate and more epochs; BC-ResNet follows Kim et al. 2021 (long, hot, warmed up).
SCHEDULES = {
    "resnet18": Schedule(epochs=30, adamw_lr=2e-3, warmup_epochs=1.0),
    # 80 epochs scored 95.1 % against 40 epochs' 94.0 % at full width (p = 0.002; docs/accuracy.md) ...
    "mobilenet_v2": Schedule(epochs=80, adamw_lr=5e-3, warmup_epochs=2.0),
    # ... and 93.0 % against 93.1 % at half width, where 40 stays.
    "mobilenet_v2_x0_5": Schedule(epochs=40, adamw_lr=5e-3, warmup_epochs=2.0),
    # 60 epochs beat 30 by 1.7 points (p < 0.001; docs/accuracy.md).
    "shufflenet_v2_x0_5": Schedule(epochs=60, adamw_lr=1e-2, warmup_epochs=2.0),
    "bc_resnet_3": Schedule(epochs=80, adamw_lr=1e-2, warmup_epochs=2.0),
}
# 80 epochs beat 40 by 0.8-0.9 points at widths 3 and 8 (docs/accuracy.md); width 1 is unmeasured.
SCHEDULES["bc_resnet_1"] = SCHEDULES["bc_resnet_8"] = SCHEDULES["bc_resnet_3"]


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (stored in every checkpoint it writes).

    Attributes:
        data: Speech Commands root (`kws_train.dataset.index_dataset`).
        out: folder for checkpoints, metrics and figures (created).
        architecture: a `kws_train.models` name (``resnet18``, ``mobilenet_v2``, ``bc_resnet_3``, ...)
            or an alias (``shufflenet``, ``bcresnet3``).
        variant: ``"default"`` or ``"imagenet"`` (`kws_train.models`; ``"seed"`` is accepted).
        task: ``"12"`` or ``"35"``.
        features: feature preset name (`kws_runtime.FeatureSpec.preset`; ``"seed"`` is accepted).
        epochs: total epochs of the run (a resumed run continues up to this number); None: the
            architecture's `SCHEDULES` entry.
        batch_size: clips per optimizer step per process.
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum).
        lr: peak learning rate; None: the architecture's AdamW rate, or `SGD_LR`.
        weight_decay: decoupled (AdamW) or L2 (SGD) decay on weights; never on norms and biases.
        momentum: SGD momentum.
        warmup_epochs: linear warm-up from ``lr / 100`` before the cosine decay (may be
            fractional); None: the architecture's.
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
        silence_share, unknown_share, partial_share: 12-class task, the training split's
            composition, fractions (`build_task`); evaluation splits use `RunRecipe`'s defaults.
        unknown_draw: how training ``_unknown_`` clips are drawn (`kws_train.dataset.UNKNOWN_DRAWS`).
        training_speakers: share of the training speakers kept (`RunRecipe`; 1 keeps all).
        teachers: checkpoints of trained models (same labels and features) to distil from
            (`kws_train.distill`); several form an ensemble. Empty: no distillation.
        teacher_bundles: exported bundles to distil from instead: they score every training
            clip once, as recorded, before the first epoch (`kws_train.distill.bundle_soft_targets`);
            several form an ensemble. Not with ``teachers`` or ``mixup``.
        distill_weight: share of the distillation term in the loss, in (0, 1].
        distill_temperature: softmax temperature of the distillation term.
        average_epochs: time constant, in epochs, of a moving average of the weights
            (`kws_train.averaging`); validation, best.pt and the test figures then use the
            averaged weights. None: no average.
        mixup: the ``Beta(alpha, alpha)`` parameter of mixup (`kws_train.mixup`), mixing
            pairs of training examples and their labels; 0: off.
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
    epochs: Optional[int] = None
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: Optional[float] = None
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_epochs: Optional[float] = None
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    balance: str = "loss"
    augment: bool = True
    augment_config: dict = dataclasses.field(default_factory=dict)
    split: str = default_of(SplitRule, "method")
    split_salt: str = default_of(SplitRule, "salt")
    validation_fraction: float = default_of(SplitRule, "validation_fraction")
    testing_fraction: float = default_of(SplitRule, "testing_fraction")
    extra_train: List[str] = dataclasses.field(default_factory=list)
    silence_share: float = default_of(RunRecipe, "silence_share")
    # Twice the standard share, as many clips of each other word: the better draw on unseen
    # speakers (docs/accuracy.md). `RunRecipe` keeps the standard 0.1 at random, which
    # composes every evaluation split and reads older checkpoints.
    unknown_share: float = 0.2
    unknown_draw: str = "per-word"
    partial_share: float = default_of(RunRecipe, "partial_share")
    training_speakers: float = default_of(RunRecipe, "training_speakers")
    teachers: List[str] = dataclasses.field(default_factory=list)
    teacher_bundles: List[str] = dataclasses.field(default_factory=list)
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    average_epochs: Optional[float] = None
    mixup: float = 0.0
    device: str = "auto"
    amp: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    seed: int = default_of(RunRecipe, "seed")
    deterministic: bool = False
    resume: object = False
    stop_after_epochs: Optional[int] = None
    cache_dir: Optional[str] = None
    workers: int = 2
    threads: Optional[int] = None
    eval_batch_size: int = EVAL_BATCH_SIZE
    save_weights: Optional[str] = None
    quiet: bool = False

    def __post_init__(self):
        self._resolve_names_and_defaults()
        self._check_numbers()
        self._check_choices()

    def _bad(self, field, why):
        raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}: {why}")

    def _resolve_names_and_defaults(self):
        try:
            self.architecture = canonical_architecture(self.architecture)
        except ValueError as error:
            raise ValueError(f"TrainConfig.architecture: {error}") from None
        self.task = str(self.task)
        schedule = SCHEDULES[self.architecture]  # None means "this architecture's default", stored resolved
        if self.epochs is None:
            self.epochs = schedule.epochs
        if self.warmup_epochs is None:
            self.warmup_epochs = schedule.warmup_epochs
        if self.lr is None and self.optimizer in OPTIMIZERS:
            self.lr = schedule.adamw_lr if self.optimizer == "adamw" else SGD_LR
        self.data, self.out = os.fspath(self.data), os.fspath(self.out)
        self.extra_train = [os.fspath(p) for p in self.extra_train]
        self.teachers = [os.fspath(p) for p in self.teachers]
        self.teacher_bundles = [os.fspath(p) for p in self.teacher_bundles]
        try:  # older spellings ("seed") are accepted and stored under today's names
            self.variant = canonical_variant(self.variant)
            self.features = canonical_preset(self.features)  # SpecError (a ValueError) names the presets
        except ValueError as error:
            raise ValueError(f"TrainConfig: {error}") from None

    def _check_numbers(self):
        bad = self._bad
        for field in ("epochs", "batch_size", "eval_batch_size", "workers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(field, "must be a positive integer")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            bad("threads", "must be a positive integer or None")
        if self.stop_after_epochs is not None and (not isinstance(self.stop_after_epochs, int) or self.stop_after_epochs < 1):
            bad("stop_after_epochs", "must be a positive integer or None")
        if self.optimizer in OPTIMIZERS and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a positive number")
        for field in ("weight_decay", "warmup_epochs", "momentum"):
            if not (getattr(self, field) >= 0):
                bad(field, "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "must be in [0, 1)")
        if not 0 < self.distill_weight <= 1:
            bad("distill_weight", "must be in (0, 1]")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            bad("distill_temperature", "must be a positive number")
        if self.average_epochs is not None and not (self.average_epochs > 0 and math.isfinite(self.average_epochs)):
            bad("average_epochs", "must be a positive number of epochs or None")
        if not (self.mixup >= 0 and math.isfinite(self.mixup)):
            bad("mixup", "must be 0 (off) or a positive alpha")

    def _check_choices(self):
        bad = self._bad
        if self.variant not in model_variants(self.architecture):
            bad("variant", f"{self.architecture} comes in {', '.join(model_variants(self.architecture))} only")
        if self.task not in TASKS:
            bad("task", f"choose one of {', '.join(TASKS)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        if self.teacher_bundles and self.teachers:
            bad("teacher_bundles", "distil from checkpoints (teachers) or from bundles, not both in one run")
        if self.teacher_bundles and self.mixup > 0:
            bad("teacher_bundles", "a bundle's soft targets belong to single clips, not to mixup's mixtures; "
                "use checkpoint teachers with mixup")
        if self.balance not in BALANCING:
            bad("balance", f"choose one of {', '.join(BALANCING)}")
        try:
            self.recipe  # the split and task composition are checked by the recipe
        except RecipeError as error:
            raise ValueError(f"TrainConfig: {error}") from None
        if self.device not in ("auto", "cuda", "cpu"):
            bad("device", "choose auto, cuda or cpu")
        if self.amp not in AMP_MODES:
            bad("amp", f"choose one of {', '.join(AMP_MODES)}")
        AugmentConfig.from_dict(self.augment_config)  # unknown or bad fields fail now, not mid-run

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.preset(self.features)

    @property
    def recipe(self) -> RunRecipe:
        """The data side of the run (stored in its checkpoints)."""
        split = SplitRule(self.split, self.split_salt if self.split == "speaker" else "", self.validation_fraction,
                          self.testing_fraction)
        return RunRecipe(spec=self.spec, task=self.task, split=split, silence_share=self.silence_share,
                         unknown_share=self.unknown_share, unknown_draw=self.unknown_draw,
                         partial_share=self.partial_share, training_speakers=self.training_speakers, seed=self.seed,
                         extra_training=tuple(self.extra_train))

    def to_dict(self) -> dict:
        """JSON-safe dict (what checkpoints store)."""
        d = dataclasses.asdict(self)
        d["resume"] = self.resume if isinstance(self.resume, (bool, str)) else os.fspath(self.resume)
        return d

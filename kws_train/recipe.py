"""The run recipe: everything that decides which examples a run trains, selects and tests on.

A `RunRecipe` is stored in every checkpoint (``config["recipe"]``) and is the only way the
trainer (on resume), ``kws-train eval`` and ``kws-export`` rebuild a run's data: the same
folder and recipe give the same three splits, example for example. Checkpoints written before
the recipe existed are read through `recipe_from_config`, the one conversion.

Shares are fractions everywhere (0.1 = 10%); each default is written once, in these
dataclasses, and the command lines read them from here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

from kws_runtime.spec import FeatureSpec, SpecError, versioned_fields

from .dataset import (
    LABELS_12, LABELS_35, SPLIT_SEED_OFFSET, SPLITS, TASKS, UNKNOWN_DRAWS, DatasetError, TaskSplit, build_task,
    index_dataset, keep_training_speakers, split_by_speaker,
)

RECIPE_VERSION = 1
SPLIT_METHODS = ("dataset", "speaker")
TASK_LABELS = {"12": tuple(LABELS_12), "35": tuple(LABELS_35)}


class RecipeError(ValueError):
    """A recipe that cannot be used or read; the message names the field."""


def _share(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def default_of(cls, field: str):
    """The declared default of a dataclass field (so callers never restate it)."""
    return cls.__dataclass_fields__[field].default


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """How clips are assigned to the training, validation and testing splits.

    Attributes:
        method: ``"dataset"`` (the dataset's ``*_list.txt`` files, else TensorFlow's hash
            rule on the speaker) or ``"speaker"`` (SHA-1 of ``salt + speaker``: an
            independent split by speaker, `kws_train.dataset.split_by_speaker`).
        salt: of ``"speaker"``.
        validation_fraction, testing_fraction: shares of the speakers (``"speaker"``).
    """

    method: str = "dataset"
    salt: str = ""
    validation_fraction: float = 0.1
    testing_fraction: float = 0.1

    def __post_init__(self):
        if self.method not in SPLIT_METHODS:
            raise RecipeError(f"split method {self.method!r}: choose one of {', '.join(SPLIT_METHODS)}")
        if not isinstance(self.salt, str):
            raise RecipeError(f"split salt must be a string, got {self.salt!r}")
        for name in ("validation_fraction", "testing_fraction"):
            if not _share(getattr(self, name)):
                raise RecipeError(f"{name}={getattr(self, name)!r}: must be a fraction in [0, 1]")
        if self.validation_fraction + self.testing_fraction > 1:
            raise RecipeError("validation_fraction + testing_fraction must be at most 1")


@dataclasses.dataclass(frozen=True)
class RunRecipe:
    """The data side of a run.

    Attributes:
        spec: the features (also the clip length and rate silence windows are cut with).
        task: ``"12"`` or ``"35"``; `labels` follow from it.
        split: the `SplitRule`.
        silence_share, unknown_share: 12-class task, training split: silence examples and
            ``_unknown_`` clips drawn per command-word clip (`kws_train.dataset.build_task`).
            The defaults compose every other split (`task_split`).
        unknown_draw: how the training ``_unknown_`` clips are drawn, one of `UNKNOWN_DRAWS`.
        seed: the run's seed; the training split draws its examples with
            ``seed + SPLIT_SEED_OFFSET["training"]``.
        extra_training: more dataset folders whose every clip joins the training split only
            (synthetic speech); validation and testing stay on the run's own folder.
        partial_share: 12-class task, training split only: command clips drawn again, moved
            so a fragment of the word stays, as ``_unknown_``, per command-word clip.
        training_speakers: share of the run's own training speakers it trains on
            (`kws_train.dataset.keep_training_speakers`): below 1, a learning curve's point.
    """

    spec: FeatureSpec = FeatureSpec()
    task: str = "12"
    split: SplitRule = SplitRule()
    silence_share: float = 0.1
    unknown_share: float = 0.1
    seed: int = 0
    extra_training: tuple = ()
    partial_share: float = 0.0
    training_speakers: float = 1.0
    unknown_draw: str = "random"

    def __post_init__(self):
        if self.task not in TASKS:
            raise RecipeError(f"task {self.task!r}: choose one of {', '.join(TASKS)}")
        for name in ("silence_share", "unknown_share", "partial_share"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
                raise RecipeError(f"{name}={value!r}: must be a fraction >= 0")
        value = self.training_speakers
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
            raise RecipeError(f"training_speakers={value!r}: must be a fraction in (0, 1]")
        if self.unknown_draw not in UNKNOWN_DRAWS:
            raise RecipeError(f"unknown_draw={self.unknown_draw!r}: choose one of {', '.join(UNKNOWN_DRAWS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "extra_training", tuple(str(p) for p in self.extra_training))

    @property
    def labels(self) -> tuple:
        """Class names in model output order."""
        return TASK_LABELS[self.task]

    def task_split(self, root, split: str, clips: Optional[Sequence] = None) -> TaskSplit:
        """The examples of one split of ``root``, as the run composed them.

        Args:
            root: the run's Speech Commands folder (or another one to score on).
            split: ``"training"``, ``"validation"``, ``"testing"``, or ``"all"``: every clip of
                ``root`` as a test example, whatever its split (a folder of unseen speakers).
            clips: ``index_dataset(root)``, when the caller builds several splits and indexes once.

        Only the training split follows the run's shares, draw and seed. The others are composed
        with the defaults (10 % silence, 10 % unknown drawn at random, seed 0) whatever the run's,
        so that every run scored on a folder's validation, testing or whole set is scored on the
        same examples, and the testing split keeps the standard composition.
        """
        if split not in SPLITS + ("all",):
            raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(SPLITS + ('all',))}")
        clips = index_dataset(root) if clips is None else list(clips)
        rule = self.split
        if split == "all":
            clips, rule, split = [dataclasses.replace(c, split="testing") for c in clips], SplitRule(), "testing"
        composition = self if split == "training" else RunRecipe(spec=self.spec, task=self.task)
        if rule.method == "speaker":
            clips = split_by_speaker(clips, rule.validation_fraction, rule.testing_fraction, rule.salt)
        if split == "training":
            if self.training_speakers < 1:
                clips = keep_training_speakers(clips, self.training_speakers)
            for extra in self.extra_training:
                clips = clips + [dataclasses.replace(c, split="training") for c in index_dataset(extra)]
        return build_task(clips, self.task, split, root=root, silence_share=composition.silence_share,
                          unknown_share=composition.unknown_share, seed=composition.seed + SPLIT_SEED_OFFSET[split],
                          spec=self.spec, unknown_draw=composition.unknown_draw,
                          partial_share=composition.partial_share)

    def describe_split(self) -> str:
        """The split rule in words, for messages."""
        if self.split.method == "dataset":
            return "the dataset's split"
        return f"a split by speaker (salt {self.split.salt!r})"

    def to_dict(self) -> dict:
        """JSON-safe dict, versioned (what checkpoints store)."""
        return {
            "version": RECIPE_VERSION,
            "spec": self.spec.to_dict(),
            "task": self.task,
            "labels": list(self.labels),
            "split": dataclasses.asdict(self.split),
            "silence_share": self.silence_share,
            "unknown_share": self.unknown_share,
            "unknown_draw": self.unknown_draw,
            "partial_share": self.partial_share,
            "training_speakers": self.training_speakers,
            "seed": self.seed,
            "extra_training": list(self.extra_training),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "RunRecipe":
        """Read `to_dict` output; an unknown version or field is refused."""
        fields = versioned_fields(dict(data) if isinstance(data, Mapping) else data, cls, RECIPE_VERSION, "run recipe",
                                  RecipeError, extra=("labels",))
        labels = fields.pop("labels", None)
        try:
            fields["spec"] = FeatureSpec.from_dict(fields.get("spec"))
            fields["split"] = SplitRule(**dict(fields.get("split") or {}))
        except (SpecError, TypeError) as error:
            raise RecipeError(f"run recipe: {error}") from None
        recipe = cls(**fields)
        if labels is not None and list(labels) != list(recipe.labels):
            raise RecipeError(f"run recipe labels {labels} are not the {recipe.task}-class task's, in that order")
        return recipe


def recipe_from_config(config: Mapping, spec: FeatureSpec, labels: Sequence[str]) -> RunRecipe:
    """The recipe of a checkpoint: its stored ``config["recipe"]``, or, for checkpoints written
    before recipes existed, the one conversion of their training settings.

    Old configs held the shares as percentages (``silence_percentage``) and the split as
    ``split`` / ``split_salt`` / ``*_fraction``; missing fields take today's defaults.

    Raises:
        RecipeError: a stored recipe that cannot be read, or labels that are neither task's.
    """
    if "recipe" in config:
        return RunRecipe.from_dict(config["recipe"])
    task = task_of_labels(labels)

    def number(key, default):
        value = config.get(key, default)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    speaker = config.get("split") == "speaker"
    rule = SplitRule(
        method="speaker" if speaker else "dataset",
        salt=str(config.get("split_salt", "")) if speaker else "",
        validation_fraction=float(number("validation_fraction", default_of(SplitRule, "validation_fraction"))),
        testing_fraction=float(number("testing_fraction", default_of(SplitRule, "testing_fraction"))),
    )
    return RunRecipe(
        spec=spec,
        task=task,
        split=rule,
        silence_share=float(number("silence_percentage", 100 * default_of(RunRecipe, "silence_share"))) / 100,
        unknown_share=float(number("unknown_percentage", 100 * default_of(RunRecipe, "unknown_share"))) / 100,
        seed=int(number("seed", default_of(RunRecipe, "seed"))),
        extra_training=tuple(config.get("extra_train", ()) or ()),
    )


def task_of_labels(labels: Sequence[str]) -> str:
    """``"12"`` or ``"35"``: the standard task whose labels ``labels`` are, in that order.

    Raises:
        RecipeError: the labels are neither task's (or are in another order, which would
            mislabel every example).
    """
    for task, task_labels in TASK_LABELS.items():
        if tuple(labels) == task_labels:
            return task
    raise RecipeError(f"the labels {list(labels)} are neither the 12- nor the 35-class task's, in that order")

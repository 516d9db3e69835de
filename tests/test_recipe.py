"""The run recipe: one versioned object rebuilds a run's splits for training, eval and export."""

import json

import pytest

from kws_runtime import FeatureSpec
from kws_train import dataset as ds
from kws_train.recipe import RecipeError, RunRecipe, SplitRule, recipe_from_config, task_of_labels
from kws_train.config import TrainConfig


def test_recipe_round_trips_through_json():
    recipe = RunRecipe(FeatureSpec.preset("fine"), "35", SplitRule("speaker", "x", 0.2, 0.15), 0.05, 0.2, 7, ("synth",),
                       unknown_draw="per-word")
    again = RunRecipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe and again.labels == tuple(ds.LABELS_35)
    # a recipe stored before the draw could be chosen drew at random
    older = {k: v for k, v in RunRecipe().to_dict().items() if k != "unknown_draw"}
    assert RunRecipe.from_dict(older).unknown_draw == "random"


@pytest.mark.parametrize(
    "change, message",
    [({"version": 2}, "version 2 is not supported"), ({"colour": "blue"}, "unknown field"),
     ({"labels": list(reversed(ds.LABELS_12))}, "in that order"), ({"silence_share": -1}, "silence_share"),
     ({"unknown_draw": "even"}, "unknown_draw='even': choose one of random, per-word"),
     ({"split": {"method": "random"}}, "split method 'random'"), ({"split": {"validation_fraction": 0.9,
                                                                            "testing_fraction": 0.2}}, "at most 1")],
)
def test_bad_recipes_are_refused_naming_the_field(change, message):
    data = {**RunRecipe().to_dict(), **change}
    with pytest.raises(RecipeError, match=message):
        RunRecipe.from_dict(data)


def test_train_config_derives_its_recipe_and_defaults_from_it():
    config = TrainConfig(data="d", split="speaker", split_salt="s", silence_share=0.2, extra_train=["x"], seed=4)
    recipe = config.recipe
    assert recipe == RunRecipe(FeatureSpec.preset("fine"), "12", SplitRule("speaker", "s", 0.1, 0.1), 0.2, 0.2, 4, ("x",),
                               unknown_draw="per-word")
    plain = TrainConfig(data="d")
    assert plain.recipe.split == SplitRule() and plain.silence_share == RunRecipe().silence_share
    # a new run draws _unknown_ its own way; the recipe's defaults stay the standard composition
    assert (plain.unknown_share, plain.unknown_draw) == (0.2, "per-word")
    assert (RunRecipe().unknown_share, RunRecipe().unknown_draw) == (0.1, "random")
    with pytest.raises(ValueError, match="validation_fraction"):
        TrainConfig(data="d", validation_fraction=1.5)


def test_a_checkpoint_without_a_recipe_is_converted_once(real_data):
    spec = FeatureSpec.preset("librosa")
    legacy = {"split": "speaker", "split_salt": "tasks", "validation_fraction": 0.1, "testing_fraction": 0.1,
              "silence_percentage": 20.0, "unknown_percentage": 5.0, "seed": 3, "extra_train": []}
    converted = recipe_from_config(legacy, spec, ds.LABELS_12)
    assert converted == RunRecipe(spec, "12", SplitRule("speaker", "tasks", 0.1, 0.1), 0.2, 0.05, 3, ())
    # and it rebuilds what the old composition (by hand) gave
    clips = ds.split_by_speaker(ds.index_dataset(real_data), 0.1, 0.1, "tasks")
    by_hand = ds.build_task(clips, "12", "training", root=real_data, silence_share=0.2, unknown_share=0.05,
                            seed=3 + ds.SPLIT_SEED_OFFSET["training"], spec=spec)
    assert converted.task_split(real_data, "training").examples == by_hand.examples
    # a stored recipe wins over the loose fields
    assert recipe_from_config({**legacy, "recipe": RunRecipe(spec).to_dict()}, spec, ds.LABELS_12) == RunRecipe(spec)


def test_labels_name_their_task_in_order_only():
    assert task_of_labels(ds.LABELS_12) == "12" and task_of_labels(ds.LABELS_35) == "35"
    with pytest.raises(RecipeError, match="in that order"):
        task_of_labels(sorted(ds.LABELS_12))


def test_every_run_is_scored_on_the_same_examples(real_data):
    spec, rule = FeatureSpec.preset("librosa"), SplitRule("speaker", "tasks", 0.1, 0.1)
    shared = RunRecipe(spec).task_split(real_data, "all").examples
    other = RunRecipe(spec, split=rule, silence_share=0.3, unknown_share=1.0, seed=5, partial_share=0.2,
                      unknown_draw="per-word")
    assert other.task_split(real_data, "all").examples == shared
    assert {e.label for e in shared} == set(ds.LABELS_12)
    # its validation and testing splits are the standard composition of its speakers ...
    standard = RunRecipe(spec, split=rule)
    for split in ("validation", "testing"):
        assert other.task_split(real_data, split).examples == standard.task_split(real_data, split).examples
    # ... and only its training split follows its shares, draw and seed
    trained = other.task_split(real_data, "training").examples
    assert trained != standard.task_split(real_data, "training").examples
    assert sum(e.label == ds.UNKNOWN for e in trained) > 2 * sum(
        e.label == ds.UNKNOWN for e in standard.task_split(real_data, "training").examples)


def test_a_share_of_training_speakers_trains_on_nested_subsets_of_whole_speakers(real_data):
    spec, rule = FeatureSpec.preset("librosa"), SplitRule("speaker", "tasks", 0.1, 0.1)
    clips = ds.index_dataset(real_data)

    def speakers(share, split="training"):
        examples = RunRecipe(spec, split=rule, training_speakers=share).task_split(real_data, split, clips=clips).examples
        # command clips are all taken; _unknown_ clips are a random draw from the kept speakers
        return {ds.speaker_of(e.path) for e in examples if e.label not in (ds.SILENCE, ds.UNKNOWN)}

    every, half, quarter = speakers(1.0), speakers(0.5), speakers(0.25)
    assert quarter < half < every
    assert 0.35 < len(half) / len(every) < 0.65 and 0.12 < len(quarter) / len(every) < 0.38
    whole = {c.path for c in ds.split_by_speaker(clips, 0.1, 0.1, "tasks") if ds.speaker_of(c.path) in half}
    kept = RunRecipe(spec, split=rule, training_speakers=0.5).task_split(real_data, "training", clips=clips)
    assert {e.path for e in kept.examples if e.label not in (ds.SILENCE, ds.UNKNOWN)} <= whole
    assert speakers(0.25, "validation") == speakers(1.0, "validation")
    again = RunRecipe.from_dict(json.loads(json.dumps(RunRecipe(training_speakers=0.25).to_dict())))
    assert again.training_speakers == 0.25
    for share in (0, 1.5):
        with pytest.raises(RecipeError, match="training_speakers"):
            RunRecipe(training_speakers=share)

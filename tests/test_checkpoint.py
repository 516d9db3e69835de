import os
import random

import pytest
import torch

from kws_runtime import FeatureSpec
from kws_train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kws_train.models import build_model

LABELS = ["_silence_", "_unknown_", "yes", "no"]


@pytest.fixture
def trained(tmp_path):
    """A seed ShuffleNetV2 after one optimizer step, and the resume state a trainer would keep."""
    torch.manual_seed(0)
    model = build_model("shufflenet", len(LABELS), "seed")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 40, 101)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    scheduler.step()
    extra = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 7,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    return model.eval(), extra


def test_round_trip_restores_weights_metadata_and_resume_state(tmp_path, trained):
    model, extra = trained
    spec = FeatureSpec.preset("fine")
    path = save_checkpoint(
        tmp_path / "model.pt", model, architecture="shufflenet", variant="seed", labels=LABELS,
        spec=spec, config={"epochs": 10, "lr": 1e-3, "augment": {"noise": [0.1, 0.5]}}, extra=extra,
    )
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temp file left behind

    loaded = load_checkpoint(path)
    assert loaded.architecture == "shufflenet_v2_x0_5"  # the alias is stored canonically
    assert loaded.variant == "imagenet"  # saved under its first name, "seed"; read under today's
    assert loaded.labels == LABELS
    assert loaded.spec == spec
    assert loaded.config == {"epochs": 10, "lr": 1e-3, "augment": {"noise": [0.1, 0.5]}}
    assert not loaded.model.training
    x = torch.randn(3, 1, 40, 101)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))

    assert loaded.extra["epoch"] == 7
    torch.testing.assert_close(loaded.extra["rng"]["torch"], extra["rng"]["torch"])
    assert loaded.extra["rng"]["python"] == extra["rng"]["python"]
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded.extra["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_file_is_plain_data_for_weights_only_loading(tmp_path, trained):
    model, _ = trained
    path = save_checkpoint(tmp_path / "m.pt", model, architecture="shufflenet_v2_x0_5", variant="seed",
                           labels=LABELS, spec=FeatureSpec())
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "kws-checkpoint"
    assert payload["feature_spec"] == FeatureSpec().to_dict()
    assert set(payload["state_dict"]) == set(model.state_dict())


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    # An arbitrary class instance: a full unpickle would construct it, weights-only loading must not.
    torch.save({"format": "kws-checkpoint", "payload": torch.nn.ReLU()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)


def test_strict_keys_mismatch_lists_keys(tmp_path, trained):
    model, _ = trained
    path = save_checkpoint(tmp_path / "m.pt", model, architecture="shufflenet", variant="seed",
                           labels=LABELS, spec=FeatureSpec())
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["stage2.0.extra.weight"] = torch.zeros(1)
    del payload["state_dict"]["fc.bias"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing 1 key(s): fc.bias" in message
    assert "unexpected 1 key(s): stage2.0.extra.weight" in message


def test_shape_mismatch_and_wrong_label_count(tmp_path, trained):
    model, _ = trained
    with pytest.raises(CheckpointError, match="wrong shape"):
        save_checkpoint(tmp_path / "m.pt", model, architecture="shufflenet", variant="seed",
                        labels=LABELS + ["extra"], spec=FeatureSpec())
    assert not any(tmp_path.iterdir())


def test_fused_model_is_refused_at_save_time(tmp_path, trained):
    model, _ = trained
    model.fuse_model()
    with pytest.raises(CheckpointError, match="before fuse_model"):
        save_checkpoint(tmp_path / "m.pt", model, architecture="shufflenet", variant="seed",
                        labels=LABELS, spec=FeatureSpec())


def test_unloadable_extra_is_refused_at_save_time(tmp_path, trained):
    np = pytest.importorskip("numpy")
    model, _ = trained
    with pytest.raises(CheckpointError, match=r"extra\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "m.pt", model, architecture="shufflenet", variant="seed", labels=LABELS,
                        spec=FeatureSpec(), extra={"rng": {"numpy": np.zeros(3)}})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_wrong_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_other_torch_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(build_model("shufflenet", 2, "seed").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a kws checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("architecture", "vgg16", "unknown architecture 'vgg16'; choose one of resnet18"),
        ("variant", "huge", "unknown model variant 'huge'"),
        ("feature_spec", {"version": 1, "n_mels": -3}, "bad feature spec"),
        ("feature_spec", {"version": 99}, "bad feature spec"),
        ("format_version", 2, "format version 2 is not supported"),
        ("labels", [], "labels"),
    ],
)
def test_bad_metadata(tmp_path, trained, field, value, expected):
    model, _ = trained
    path = save_checkpoint(tmp_path / "m.pt", model, architecture="shufflenet", variant="seed",
                           labels=LABELS, spec=FeatureSpec())
    payload = torch.load(path, weights_only=True)
    payload[field] = value
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)

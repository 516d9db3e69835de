"""Mixup: the mixed batch and loss, reproducible draws, and a run that uses it and resumes exactly."""

import math

import pytest
import torch
from torch import nn

from kws_train.checkpoint import load_checkpoint
from kws_train.mixup import Mixup
from kws_train.trainer import train

from test_trainer import tiny_config, tiny_data  # noqa: F401  (the fixture)


def test_a_batch_is_mixed_with_a_shuffled_copy_and_its_own_label_dominates():
    torch.manual_seed(0)
    features, targets = torch.randn(32, 1, 4, 6), torch.arange(32)
    mixed, partners, weight = Mixup(0.4, seed=1)(features, targets)
    assert 0.5 <= weight <= 1 and weight < 1 - 1e-6
    assert sorted(partners.tolist()) == list(range(32)) and not torch.equal(partners, targets)
    assert torch.allclose(mixed, weight * features + (1 - weight) * features[partners])


def test_the_loss_mixes_both_labels_with_the_same_weight():
    logits, targets, partners = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    loss = Mixup.loss(criterion, logits, targets, partners, 0.7)
    expected = 0.7 * criterion(logits, targets) + 0.3 * criterion(logits, partners)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)


def test_draws_follow_the_seed_and_alpha_sets_how_far_they_go():
    x, y = torch.randn(16, 3), torch.arange(16)
    a, b = Mixup(0.2, seed=5), Mixup(0.2, seed=5)
    for _ in range(3):
        assert torch.equal(a(x, y)[0], b(x, y)[0])
    b.manual_seed(6)
    assert not torch.equal(a(x, y)[0], b(x, y)[0])
    mean_weight = {alpha: sum(Mixup(alpha, seed=s)(x, y)[2] for s in range(200)) / 200 for alpha in (0.1, 4.0)}
    assert mean_weight[0.1] > 0.9 > 0.7 > mean_weight[4.0]  # small alpha: mixtures close to one clip
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="mixup alpha"):
            Mixup(bad)


def test_a_run_with_mixup_trains_differently_and_resumes_exactly(tiny_data, tmp_path):  # noqa: F811
    plain = train(tiny_config(tiny_data, tmp_path / "plain", epochs=1))
    straight = train(tiny_config(tiny_data, tmp_path / "straight", epochs=2, mixup=0.4))
    first = load_checkpoint(tmp_path / "straight" / "best.pt")
    assert first.config["mixup"] == 0.4
    assert plain.history[0]["train_loss"] != straight.history[0]["train_loss"]
    train(tiny_config(tiny_data, tmp_path / "resumed", epochs=2, mixup=0.4, stop_after_epochs=1))
    resumed = train(tiny_config(tiny_data, tmp_path / "resumed", epochs=2, mixup=0.4, resume=True))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ValueError, match="mixup"):
        tiny_config(tiny_data, tmp_path / "bad", mixup=-0.1)

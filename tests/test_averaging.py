"""The moving average of the weights: what best.pt holds, exact resumes, the decay's time constant."""

import math

import pytest
import torch

from kws_train.averaging import decay_for
from kws_train.checkpoint import load_checkpoint
from kws_train.trainer import train

from test_trainer import tiny_config, tiny_data  # noqa: F401  (the fixture)


def test_a_weight_average_is_what_best_pt_holds_and_it_resumes_exactly(tiny_data, tmp_path):  # noqa: F811
    one = train(tiny_config(tiny_data, tmp_path / "one", epochs=1, average_epochs=0.5))
    raw = load_checkpoint(one.last_path)
    averaged = {k[len("module."):]: v for k, v in raw.extra["average"].items() if k.startswith("module.")}
    trained, best = raw.model.state_dict(), load_checkpoint(one.best_path).model.state_dict()
    assert raw.extra["average"]["n_averaged"] > 1  # updated after every step
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)  # the average is not the last step
    assert all(torch.equal(best[k], averaged[k]) for k in averaged)  # and best.pt is the average
    straight = train(tiny_config(tiny_data, tmp_path / "straight", epochs=2, average_epochs=0.5))
    train(tiny_config(tiny_data, tmp_path / "resumed", epochs=2, average_epochs=0.5, stop_after_epochs=1))
    train(tiny_config(tiny_data, tmp_path / "resumed", epochs=2, average_epochs=0.5, resume=True))
    expected = load_checkpoint(straight.last_path).extra["average"]
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt").extra["average"]
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key


def test_the_average_decays_over_its_time_constant():
    decay = decay_for(2.0, 50)
    assert math.isclose(decay ** 100, math.exp(-1), rel_tol=1e-9)
    with pytest.raises(ValueError, match="must be > 0"):
        decay_for(0, 50)

"""Knowledge distillation: the loss, the frozen teachers, the checks, and a run with a teacher."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kws_runtime import Predictor
from kws_runtime.spec import FeatureSpec
from kws_train.cache import CachedSplit
from kws_train.checkpoint import load_checkpoint, save_checkpoint
from kws_train.distill import DistillError, Distiller, bundle_soft_targets, distillation_loss, load_teachers, soften
from kws_train.models import build_model
from kws_train.recipe import TASK_LABELS
from kws_train.trainer import TrainError, train

from test_trainer import tiny_config, tiny_data  # noqa: F401  (the fixture)

LABELS = list(TASK_LABELS["12"])
PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
TEACHERS = [PRETRAINED / "bc-resnet-3", PRETRAINED / "shufflenet-v2-0.5x"]


def test_loss_is_zero_at_the_teachers_probabilities_and_keeps_its_scale():
    torch.manual_seed(0)
    teacher_logits = torch.randn(16, 12)
    for temperature in (1.0, 4.0):
        soft = F.softmax(teacher_logits / temperature, dim=1)
        assert distillation_loss(teacher_logits, soft, temperature).abs() < 1e-6
    # with the T**2 factor the gradient is T * (p_student - p_teacher) / batch at every temperature
    student = torch.zeros(16, 12, requires_grad=True)
    for temperature in (2.0, 8.0):
        soft = F.softmax(teacher_logits / temperature, dim=1)
        loss = distillation_loss(student, soft, temperature)
        (grad,) = torch.autograd.grad(loss, student)
        expected = (F.softmax(student / temperature, dim=1) - soft) * temperature / 16
        assert torch.allclose(grad, expected, atol=1e-6)
    assert distillation_loss(torch.randn(16, 12), F.softmax(teacher_logits, dim=1), 1.0) > 0


def test_teachers_stay_frozen_in_eval_mode_and_are_averaged():
    torch.manual_seed(1)
    a, b = nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    distiller = Distiller([a, b], weight=0.25, temperature=2.0)
    distiller.train()
    assert not a.training and not any(p.requires_grad for p in distiller.parameters())
    x = torch.randn(5, 1, 2, 4)
    mean = (F.softmax(a(x) / 2, dim=1) + F.softmax(b(x) / 2, dim=1)) / 2
    assert torch.allclose(distiller.soft_targets(x), mean)
    logits, label_loss = torch.randn(5, 3), torch.tensor(1.5)
    mixed = distiller.mix(label_loss, logits, mean)
    assert math.isclose(mixed.item(), 0.75 * 1.5 + 0.25 * distillation_loss(logits, mean, 2.0).item(), rel_tol=1e-6)
    for bad in (dict(weight=0.0), dict(weight=1.5), dict(temperature=0.0)):
        with pytest.raises(DistillError):
            Distiller([a], **{"weight": 0.5, "temperature": 2.0, **bad})


def test_a_teacher_of_another_task_or_other_features_is_refused(tmp_path):
    spec = FeatureSpec.preset("fine")
    path = save_checkpoint(tmp_path / "t.pt", build_model("bc_resnet_1", 12), architecture="bc_resnet_1",
                           variant="default", labels=LABELS, spec=spec)
    assert len(load_teachers([path], LABELS, spec, "cpu")) == 1
    with pytest.raises(DistillError, match=r"t\.pt: its labels .* are not this run's"):
        load_teachers([path], LABELS[:-1] + ["other"], spec, "cpu")
    with pytest.raises(DistillError, match=r"t\.pt: trained on other features \(40x101.*\(40x32"):
        load_teachers([path], LABELS, FeatureSpec.preset("librosa"), "cpu")
    with pytest.raises(DistillError, match="no such checkpoint"):
        load_teachers([tmp_path / "missing.pt"], LABELS, spec, "cpu")


def test_a_run_with_a_teacher_stores_it_and_trains_differently(tiny_data, tmp_path):  # noqa: F811
    teacher = train(tiny_config(tiny_data, tmp_path / "teacher", epochs=2))
    plain = train(tiny_config(tiny_data, tmp_path / "plain", epochs=1, seed=5))
    student = train(tiny_config(tiny_data, tmp_path / "student", epochs=1, seed=5, teachers=[str(teacher.best_path)],
                                distill_weight=1.0, distill_temperature=3.0))
    stored = load_checkpoint(student.last_path).config
    assert stored["teachers"] == [str(teacher.best_path)] and stored["distill_weight"] == 1.0
    assert _weights_differ(plain, student)


def _weights_differ(plain, student) -> bool:
    # same seed, same batches: only the loss differs, so the weights must
    a, b = plain.model.state_dict(), student.model.state_dict()
    return any(not torch.equal(a[name], b[name]) for name in a)


def test_a_missing_teacher_fails_before_the_data_is_read(tiny_data, tmp_path):  # noqa: F811
    with pytest.raises(TrainError, match=r"teacher .*nope\.pt: no such checkpoint file"):
        train(tiny_config(tiny_data, tmp_path / "run", teachers=[str(tmp_path / "nope.pt")],
                          cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()


def _split(n: int = 6, labels=LABELS) -> CachedSplit:
    """Clips of tones and noise with a word-like envelope, as a training cache would hold them."""
    rng = np.random.default_rng(7)
    t = np.arange(16000) / 16000
    envelope = np.exp(-(((t - 0.5) / 0.15) ** 2))
    audio = [(0.3 * envelope * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.01 * rng.standard_normal(16000))
             for i in range(n)]
    audio = np.round(np.stack(audio) * 32767).astype(np.int16)
    return CachedSplit(Path("cache"), audio, np.arange(n) % len(labels), tuple(labels), "0" * 16, 16000)


def test_soften_divides_the_logits_by_the_temperature():
    logits = np.random.default_rng(0).normal(size=(4, 12)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.allclose(soften(probs, 1.0), probs, atol=1e-9)
    expected = F.softmax(torch.from_numpy(logits) / 4.0, dim=1).numpy()
    assert np.allclose(soften(probs, 4.0), expected, atol=1e-9)
    assert np.allclose(soften(np.eye(12)[:2], 2.0).sum(axis=1), 1.0)  # zeros stay finite


def test_bundle_soft_targets_are_the_bundles_own_predictions_averaged():
    split, spec = _split(), FeatureSpec.preset("fine")
    one = bundle_soft_targets(TEACHERS[:1], split, spec, temperature=1.0, batch_size=4)
    predicted = Predictor(TEACHERS[0], artifact="onnx_fp32").probabilities(split.waveforms(np.arange(len(split))))
    assert one.shape == (len(split), len(LABELS)) and one.dtype == np.float32
    assert np.allclose(one, predicted, atol=1e-5)
    both = bundle_soft_targets(TEACHERS, split, spec, temperature=2.0)
    each = [Predictor(b, artifact="onnx_fp32").probabilities(split.waveforms(np.arange(len(split)))) for b in TEACHERS]
    assert np.allclose(both, (soften(each[0], 2.0) + soften(each[1], 2.0)) / 2, atol=1e-5)
    assert not np.allclose(both, one, atol=1e-2)


def test_a_bundle_of_another_task_or_other_features_cannot_teach(tmp_path):
    with pytest.raises(DistillError, match=r"bc-resnet-3: its labels .* are not this run's"):
        bundle_soft_targets(TEACHERS[:1], _split(labels=LABELS[:-1] + ["other"]), FeatureSpec.preset("fine"), 2.0)
    with pytest.raises(DistillError, match=r"bc-resnet-3: trained on other features \(40x101.*\(40x32"):
        bundle_soft_targets(TEACHERS[:1], _split(), FeatureSpec.preset("librosa"), 2.0)
    with pytest.raises(DistillError, match="teacher bundle: .*nothing"):
        bundle_soft_targets([tmp_path / "nothing"], _split(), FeatureSpec.preset("fine"), 2.0)


def test_a_run_learns_from_teacher_bundles(tiny_data, tmp_path):  # noqa: F811
    settings = dict(architecture="bc_resnet_1", variant="default", features="fine", epochs=1, seed=5)
    plain = train(tiny_config(tiny_data, tmp_path / "plain", **settings))
    student = train(tiny_config(tiny_data, tmp_path / "student", teacher_bundles=[str(b) for b in TEACHERS],
                                distill_weight=1.0, **settings))
    assert load_checkpoint(student.last_path).config["teacher_bundles"] == [str(b) for b in TEACHERS]
    assert _weights_differ(plain, student)


def test_teacher_bundles_are_checked_before_the_data_is_read(tiny_data, tmp_path):  # noqa: F811
    with pytest.raises(TrainError, match=r"teacher bundle: .*nope"):
        train(tiny_config(tiny_data, tmp_path / "run", teacher_bundles=[str(tmp_path / "nope")],
                          cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()
    for clash in (dict(teachers=["t.pt"]), dict(mixup=0.2)):
        with pytest.raises(ValueError, match="teacher_bundles"):
            tiny_config(tiny_data, tmp_path / "run", teacher_bundles=[str(TEACHERS[0])], **clash)

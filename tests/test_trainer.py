"""The training library: outputs of a run, exact resume, schedule, balancing, evaluation figures.

Runs use a tiny generated dataset (tones per word, a handful of speakers, real WAV files) and
the smallest model, so a run takes about a second on a CPU.
"""

import contextlib
import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from kws_runtime.files import WriteError, current_umask
from kws_train.checkpoint import load_checkpoint
from kws_train.dataset import LABELS_12
from kws_train.evaluate import EvalResult, confusion_matrix, evaluate_checkpoint, format_report, predict_files
from kws_train.config import SCHEDULES, SGD_LR, TrainConfig
from kws_train.trainer import TrainError, _class_weights, default_weights_path, train, warmup_cosine

from filesystems import small_disk
from tiny_dataset import SALT, make_tiny_dataset


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(data), out=str(out), architecture="mobilenet_v2", variant="seed", features="seed",
        epochs=2, batch_size=8, split="speaker", split_salt=SALT, validation_fraction=0.2, testing_fraction=0.2,
        cache_dir=str(out.parent / "cache"), quiet=True, seed=3, threads=1, lr=5e-3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "straight"
    return train(tiny_config(tiny_data, out))


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_run_writes_checkpoints_metrics_and_figures(trained):
    out = trained.out
    for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png", "confusion.png", "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["val_acc"] <= 1.0 and math.isfinite(row["train_loss"]) and row["lr"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_run"] == 2 and summary["test"]["count"] > 0
    assert summary["best_val_accuracy"] == max(r["val_acc"] for r in rows)

    best = load_checkpoint(out / "best.pt")
    assert (best.architecture, best.variant, best.labels) == ("mobilenet_v2", "imagenet", list(LABELS_12))
    assert best.spec.shape == (40, 32)
    assert best.config["batch_size"] == 8 and best.config["split_salt"] == SALT
    last = load_checkpoint(out / "last.pt")
    assert last.extra["epoch"] == 2 and {"optimizer", "scheduler", "rng", "history"} <= set(last.extra)
    # the returned model is the last epoch's
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor.cpu(), last.model.state_dict()[name]), name
    # leftover temp files would mean a write was not atomic
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # shareable like anything open() writes: 0644 under the usual umask, not mkstemp's 0600
    usual = 0o666 & ~current_umask()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: usual for p in out.iterdir()}


def test_resume_continues_exactly(trained, tiny_data, tmp_path):
    out = tmp_path / "resumed"
    first = train(tiny_config(tiny_data, out, stop_after_epochs=1))
    assert first.epochs_run == 1 and load_checkpoint(out / "last.pt").extra["epoch"] == 1
    second = train(tiny_config(tiny_data, out, resume=True))
    assert second.epochs_run == 2
    straight, resumed = _weights(trained.last_path), _weights(out / "last.pt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), f"{name} differs after resume"
    a = [json.loads(line) for line in (trained.out / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "train_samples_per_s")} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


def test_resume_refuses_other_settings_and_missing_state(trained, tiny_data, tmp_path):
    with pytest.raises(TrainError, match="variant"):
        train(tiny_config(tiny_data, trained.out, variant="default", resume=True))
    # a run of the earlier default draw, resumed under today's default: said how to go on
    train(tiny_config(tiny_data, tmp_path / "older", unknown_draw="random", unknown_share=0.1, epochs=1))
    with pytest.raises(TrainError, match=r"unknown_draw: 'random' -> 'per-word'.*--unknown-draw random --unknown-share 0\.1"):
        train(tiny_config(tiny_data, tmp_path / "older", epochs=2, resume=True))
    with pytest.raises(TrainError, match="nothing to resume"):
        train(tiny_config(tiny_data, tmp_path / "fresh", resume=True))
    assert not (tmp_path / "fresh").exists()  # a failed start leaves no empty run folder


def test_an_output_folder_that_cannot_be_written_fails_before_any_work(tiny_data, tmp_path):
    with small_disk(tmp_path / "ro", 64, read_only=True):
        with pytest.raises(WriteError, match="ro: cannot be written: the file system is read-only"):
            train(tiny_config(tiny_data, tmp_path / "ro", cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()  # failed before decoding a single clip


def test_full_disk_names_the_file_and_keeps_the_run_resumable(tiny_data, tmp_path):
    with small_disk(tmp_path / "disk", 96 * 1024) as disk:
        out = disk / "run"
        train(tiny_config(tiny_data, out, epochs=2, stop_after_epochs=1))
        filler = disk / "filler"
        with open(filler, "wb") as stream:
            with contextlib.suppress(OSError):
                while True:
                    stream.write(b"\0" * (1 << 20))
                    stream.flush()
        with pytest.raises(WriteError, match=r"run/(best|last)\.pt: cannot be written: the disk is full"):
            train(tiny_config(tiny_data, out, epochs=2, resume=True))
        assert load_checkpoint(out / "last.pt").extra["epoch"] == 1
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
        filler.unlink()
        assert train(tiny_config(tiny_data, out, epochs=2, resume=True)).epochs_run == 2


def test_sampler_balancing_and_sgd_train(tiny_data, tmp_path):
    result = train(tiny_config(tiny_data, tmp_path / "sgd", epochs=1, balance="sampler", optimizer="sgd", lr=0.05,
                               augment=False, save_weights=str(tmp_path / "weights" / "mobilenet_v2.pt")))
    assert result.epochs_run == 1
    assert load_checkpoint(tmp_path / "weights" / "mobilenet_v2.pt").architecture == "mobilenet_v2"


def test_errors_are_specific(tiny_data, tmp_path):
    with pytest.raises(TrainError, match="fp16 needs a GPU"):
        train(tiny_config(tiny_data, tmp_path / "a", amp="fp16", device="cpu"))
    with pytest.raises(TrainError, match="no validation clips"):
        train(tiny_config(tiny_data, tmp_path / "b", validation_fraction=0.0))
    with pytest.raises(ValueError, match="architecture"):
        tiny_config(tiny_data, tmp_path / "c", architecture="vgg")
    with pytest.raises(ValueError, match="batch_size"):
        tiny_config(tiny_data, tmp_path / "d", batch_size=0)
    with pytest.raises(ValueError, match="unknown field"):
        tiny_config(tiny_data, tmp_path / "e", augment_config={"wobble": 1})
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="GPU"):
            train(tiny_config(tiny_data, tmp_path / "f", device="cuda"))


def test_warmup_cosine_schedule():
    total, warm = 100, 10
    factors = [warmup_cosine(s, total, warm, 0.05) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.01) and factors[warm] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.05)
    assert all(a < b for a, b in zip(factors[:warm], factors[1 : warm + 1]))
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1 :]))
    assert warmup_cosine(50, 100, 0, 0.0) == pytest.approx(0.5)


def test_class_weights_are_inverse_frequency_with_mean_one():
    counts = np.array([10, 0, 30, 60])
    w = _class_weights(counts).numpy()
    assert w[1] == 0.0
    assert w[0] / w[2] == pytest.approx(3.0) and w[0] / w[3] == pytest.approx(6.0)
    assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)


def test_confusion_and_per_class_figures():
    cm = confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 1], 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    result = EvalResult(["a", "b", "c"], cm, loss=0.5)
    assert result.accuracy == pytest.approx(3 / 6)
    rows = {r["label"]: r for r in result.per_class()}
    assert rows["b"]["recall"] == pytest.approx(2 / 3) and rows["b"]["precision"] == pytest.approx(2 / 4)
    assert rows["c"]["precision"] is None and rows["c"]["recall"] == 0.0
    text = format_report(result)
    assert "accuracy 50.00%" in text and "confusion matrix" in text
    assert json.loads(json.dumps(result.to_dict()))["confusion"] == cm.tolist()


def test_evaluate_and_predict_with_a_checkpoint(trained, tiny_data):
    # the checkpoint's recipe rebuilds the run's test split: the figures equal the run's own
    result = evaluate_checkpoint(trained.best_path, tiny_data, split="testing")
    assert result.count == trained.test.count
    assert np.array_equal(result.confusion, trained.test.confusion)
    files = sorted((tiny_data / "yes").glob("*.wav"))[:3]
    predictions = predict_files(trained.best_path, files)
    assert [p for p, _, _ in predictions] == files
    assert all(label in LABELS_12 and 0.0 < prob <= 1.0 for _, label, prob in predictions)


def test_default_weights_path(monkeypatch, tmp_path):
    monkeypatch.setenv("KWS_WEIGHTS_DIR", str(tmp_path))
    assert default_weights_path("shufflenet") == tmp_path / "shufflenet_v2_x0_5.pt"
    assert default_weights_path("resnet", "w") == Path("w") / "resnet18.pt"


def test_each_architecture_has_its_own_schedule_and_explicit_values_win():
    for architecture, schedule in SCHEDULES.items():
        config = TrainConfig(data="d", architecture=architecture)
        assert (config.epochs, config.lr, config.warmup_epochs) == (
            schedule.epochs, schedule.adamw_lr, schedule.warmup_epochs)
    assert TrainConfig(data="d", architecture="shufflenet", optimizer="sgd").lr == SGD_LR
    mine = TrainConfig(data="d", architecture="shufflenet", epochs=3, lr=1e-4, warmup_epochs=0)
    assert (mine.epochs, mine.lr, mine.warmup_epochs) == (3, 1e-4, 0)
    assert SCHEDULES["shufflenet_v2_x0_5"].adamw_lr > SCHEDULES["resnet18"].adamw_lr
    with pytest.raises(ValueError, match="distill_weight"):
        TrainConfig(data="d", distill_weight=0)

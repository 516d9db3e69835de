"""``kws-train``: training with the original flags, prediction, eval, profile, and clean errors."""

import json
import subprocess
import sys

import pytest
import torch

from kws_train.cli import main, unused_gpu_note
from kws_train.dataset import LABELS_12

from filesystems import require_permission_checks, run_unprivileged
from tiny_dataset import SALT, make_tiny_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("cli") / "data")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kws_train.cli", *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc_or_err, needle):
    err = proc_or_err.stderr if hasattr(proc_or_err, "stderr") else proc_or_err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0], err


def test_help_and_error_paths_in_a_real_process(tmp_path):
    proc = run_cli("-h")
    assert proc.returncode == 0 and "-t, --train" in proc.stdout and "eval CKPT DATA" in proc.stdout
    proc = run_cli("-m", "mobilenet", "-d", tmp_path / "missing", "-t", "-e", "1")
    assert proc.returncode != 0
    assert_one_line_error(proc, "no such folder")


def test_train_save_predict_eval(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code = main(["-m", "mobilenet", "-d", str(tiny_data), "-t", "-e", "1", "-b", "8", "-s", "--variant", "seed",
                 "--features", "seed", "--split", "speaker", "--salt", SALT, "--val-fraction", "0.2",
                 "--test-fraction", "0.2", "--out", str(out), "--threads", "1", "--seed", "1", "--shift-ms", "250",
                 "--speed", "0.9", "1.1", "--snr", "5", "30", "--freq-mask-bands", "4", "--time-mask-ms", "190",
                 "--silence-share", "0.05", "--unknown-share", "0.3", "--unknown-draw", "per-word", "--mixup", "0.2",
                 "-q"])
    assert code == 0
    config = torch.load(out / "best.pt", weights_only=False)["config"]
    assert config["augment_config"] == {"shift_ms": 250.0, "snr_db": [5.0, 30.0], "speed": [0.9, 1.1],
                                        "freq_mask_bands": 4, "time_mask_ms": 190.0}
    assert config["augment_resolved"]["freq_mask_bands"] == 4 and config["augment_resolved"]["freq_masks"] == 2
    assert config["unknown_share"] == 0.3 and config["mixup"] == 0.2
    assert config["recipe"]["unknown_draw"] == "per-word" and config["recipe"]["silence_share"] == 0.05
    assert {"best.pt", "last.pt", "metrics.jsonl", "curves.png", "confusion.png"} <= {p.name for p in out.iterdir()}
    # -s updated the default weights file (./weights/<architecture>.pt)
    weights = tmp_path / "weights" / "mobilenet_v2.pt"
    assert weights.is_file()
    capsys.readouterr()

    # without -t: label the files in -d with the default weights
    assert main(["-m", "mobilenet_v2", "-d", str(tiny_data / "no")]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted((tiny_data / "no").glob("*.wav"))
    assert len(lines) == len(files)
    for line, path in zip(lines, files):
        name, label = line.split("  ")
        assert name == str(path) and label in LABELS_12

    assert main(["eval", str(out / "best.pt"), str(tiny_data), "--salt", SALT, "--val-fraction", "0.2",
                 "--test-fraction", "0.2", "--json", "--plot", str(tmp_path / "cm.png")]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["count"] > 0 and 0 <= figures["accuracy"] <= 1 and figures["labels"] == list(LABELS_12)
    assert len(figures["confusion"]) == 12 and sum(map(sum, figures["confusion"])) == figures["count"]
    assert (tmp_path / "cm.png").is_file()
    assert main(["eval", str(out / "best.pt"), str(tiny_data), "--split", "all"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("accuracy ") and "recall%" in text and "confusion matrix" in text

    # resume a finished run: nothing left to train, same best checkpoint
    assert main(["-m", "mobilenet", "-d", str(tiny_data), "-t", "-e", "1", "-b", "8", "--variant", "seed",
                 "--features", "seed", "--split", "speaker", "--salt", SALT, "--val-fraction", "0.2",
                 "--test-fraction", "0.2", "--out", str(out), "--resume", "--seed", "1", "--shift-ms", "250",
                 "--speed", "0.9", "1.1", "--snr", "5", "30", "--freq-mask-bands", "4", "--time-mask-ms", "190",
                 "--silence-share", "0.05", "--unknown-share", "0.3", "--unknown-draw", "per-word", "--mixup", "0.2",
                 "-q"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_flag_without_gpu_is_an_error(tiny_data, capsys):
    assert main(["-m", "shufflenet", "-d", str(tiny_data), "-t", "-g"]) == 2
    assert_one_line_error(capsys.readouterr().err, "no GPU")
    assert main(["eval", "x.pt", str(tiny_data), "-g"]) == 2
    assert_one_line_error(capsys.readouterr().err, "no GPU")


def test_training_on_the_cpu_beside_a_gpu_says_how_to_use_it(monkeypatch):
    assert unused_gpu_note(gpu=True) is None
    if not torch.cuda.is_available():
        assert unused_gpu_note(gpu=False) is None
        # this machine has no GPU: stand one in, by name only, to see the line a user gets
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    note = unused_gpu_note(gpu=False)
    assert "training on the CPU" in note and "add -g" in note and "\n" not in note


def test_input_errors_are_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["-m", "resnet", "-d", str(empty), "-t"], "no clips found"),
        (["-m", "resnet", "-d", str(empty)], "no audio files"),
        (["-m", "resnet", "-d", str(tiny_data / "yes")], "no default weights"),
        (["-m", "resnet", "-d", str(tiny_data), "-t", "-e", "0"], "-e must be at least 1"),
        (["-m", "resnet", "-d", str(tiny_data), "-t", "--speed", "0.9", "3"], "speed=(0.9, 3.0): factors must lie in"),
        (["-m", "resnet", "-d", str(tiny_data), "-t", "--freq-mask-bands", "-1"], "freq_mask_bands=-1: must be an integer"),
        (["-m", "resnet", "-d", str(tiny_data), "-t", "--mixup", "-1"], "mixup=-1.0: must be 0 (off) or a positive"),
        (["-m", "resnet", "-d", str(tiny_data), "--checkpoint", str(tmp_path / "nope.pt")], "no such checkpoint"),
        (["eval", str(tmp_path / "nope.pt"), str(tiny_data)], "no such checkpoint"),
        ([], "nothing to do"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert_one_line_error(capsys.readouterr().err, needle)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path / "junk.pt"), str(tiny_data)]) == 2
    assert_one_line_error(capsys.readouterr().err, "junk.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", "vgg", "-d", str(tiny_data)])
    assert exit_info.value.code == 2


def test_an_output_folder_nobody_can_write_is_refused_at_once(tiny_data, tmp_path):
    require_permission_checks(tmp_path)
    out = tmp_path / "locked"
    out.mkdir(mode=0o555)
    proc = run_unprivileged([sys.executable, "-m", "kws_train.cli", "-m", "mobilenet", "-d", str(tiny_data), "-t",
                             "-e", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")], timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"{out}: cannot be written: permission denied; choose a folder you can write to")
    assert not (tmp_path / "cache").exists()  # refused before any clip was decoded


def test_profile_prints_the_table(capsys):
    assert main(["profile", "--features", "seed", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["model"], r["variant"]) for r in rows} == {
        (m, v) for m in ("resnet18", "mobilenet_v2", "mobilenet_v2_x0_5", "shufflenet_v2_x0_5")
        for v in ("default", "imagenet")
    } | {(f"bc_resnet_{w}", "default") for w in (1, 3, 8)}  # BC-ResNet has no imagenet layout
    assert all(r["input"] == "40x32" and r["macs_per_clip"] > 0 for r in rows)

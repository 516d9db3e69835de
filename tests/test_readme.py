"""Every command and code block of the README, so none can go stale.

Each shell line is parsed by the real command-line parser of the command it names (flags,
choices and subcommands must exist) and then run for real in a folder holding every path the
examples name (small generated datasets, a checkpoint, the shipped bundle), and the Python
block runs. Not run: the network and GPU lines (no machine here reaches the dataset host or has
a GPU) and the two full training runs; the quick start, which CI runs as the README's first
command (`.ci/run`), synthesizes, trains, exports and predicts for real.
"""

import configparser
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PRETRAINED = REPO / "pretrained" / "shufflenet-v2-0.5x"


def blocks(language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list:
    """Every shell command of the README's bash blocks, as argument lists (comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            args = shlex.split(line, comments=True)
            if args:
                out.append(args)
    return out


def parse(args: list) -> None:
    """Parse ``args`` with the real parser of its command; argparse exits on a bad line."""
    from kws_export.cli import build_parser as export_parser
    from kws_runtime.cli import _parser as runtime_parser
    from kws_train import cli as train_cli
    from kws_train.data_cli import build_parser as data_parser

    program, rest = args[0], args[1:]
    if program == "torchrun":  # torchrun [its options] -m kws_train.cli ARGS
        program, rest = "kws-train", rest[rest.index("kws_train.cli") + 1 :]
    if program == "kws":
        runtime_parser().parse_args(rest)
    elif program == "kws-data":
        data_parser().parse_args(rest)
    elif program == "kws-export":
        export_parser().parse_args(rest)
    elif program == "kws-train":
        if rest and rest[0] == "eval":
            train_cli._eval_parser().parse_args(rest[1:])
        elif rest and rest[0] == "profile":
            train_cli._profile_parser().parse_args(rest[1:])
        else:
            train_cli._train_parser().parse_args(rest)
    else:
        raise AssertionError(f"the README runs {program!r}, which this test does not know: add it here")


def test_every_readme_command_parses():
    known_elsewhere = {"bash", "pip", "npm", ".venv/bin/python"}
    seen = set()
    for args in commands():
        seen.add(args[0])
        if args[0] in known_elsewhere:
            continue
        try:
            parse(args)
        except SystemExit as exc:
            raise AssertionError(f"README command does not parse: {shlex.join(args)}") from exc
    assert {"kws", "kws-data", "kws-train", "kws-export"} <= seen


def test_quick_start_and_install_lines_name_what_exists():
    first = blocks("bash")[0].splitlines()
    assert first[0].startswith("bash tools/quickstart.sh") and (REPO / "tools" / "quickstart.sh").is_file()
    assert subprocess.run(["bash", "-n", str(REPO / "tools" / "quickstart.sh")]).returncode == 0
    ci = (REPO / ".ci" / "run").read_text()
    test_command = shlex.split(first[1], comments=True)
    assert shlex.join(test_command) in ci and "tools/quickstart.sh" in ci  # CI runs both
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extras = set(setup["options.extras_require"])
    for args in commands():
        if args[0] == "pip":
            for extra in re.findall(r"\[([\w,]+)\]", " ".join(args)):
                assert set(extra.split(",")) <= extras, args


# Lines that cannot run here: the dataset host is unreachable, there is no GPU and no
# microphone, two are full training runs (the quick start, run by CI, trains for real), and
# `kws serve` runs until stopped. They are parsed above; `kws listen` without sounddevice is
# tested in test_stream.py, `kws serve` with a real browser in test_browser.py.
NOT_RUN = ("kws-data download", " -g", "torchrun", "--resume", "--variant imagenet", "kws listen", "kws serve")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding every path the README's examples name, with small real files: the
    shipped bundle, datasets (DATA, OTHER, data/speech_commands_v0.02, and
    ../shared/data/speech_commands_real), a checkpoint where a run would write it, weights."""
    from kws_runtime import FeatureSpec
    from kws_train.checkpoint import save_checkpoint
    from kws_train.dataset import LABELS_12
    from kws_train.models import build_model

    from tiny_dataset import SPEAKERS, make_tiny_dataset

    work = tmp_path / "repo"
    work.mkdir()
    (work / "pretrained").symlink_to(REPO / "pretrained")
    data = make_tiny_dataset(work / "data" / "speech_commands_v0.02")
    clips = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*_nohash_0.wav"))
    for name, speakers in (("validation", SPEAKERS[:2]), ("testing", SPEAKERS[2:4])):  # by speaker, as the official lists
        (data / f"{name}_list.txt").write_text("".join(c + "\n" for c in clips if c.split("/")[1][:8] in speakers))
    for name in ("DATA", "OTHER"):
        (work / name).symlink_to(data)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "speech_commands_real").symlink_to(data)
    torch.manual_seed(0)  # the same untrained model whichever tests ran before in this process
    model = build_model("shufflenet", len(LABELS_12), "default").eval()
    run = work / "runs" / "shufflenet_v2_x0_5-default-fine"
    run.mkdir(parents=True)
    save_checkpoint(run / "best.pt", model, architecture="shufflenet_v2_x0_5", variant="default",
                    labels=LABELS_12, spec=FeatureSpec.preset("fine"), config={})
    (work / "best.pt").symlink_to(run / "best.pt")
    (work / "weights").mkdir()
    (work / "weights" / "shufflenet_v2_x0_5.pt").symlink_to(run / "best.pt")
    (work / "clips").symlink_to(data / "yes")
    t = np.arange(16000) / 16000
    soundfile.write(work / "clip.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    (work / "recordings").mkdir()
    soundfile.write(work / "recordings" / "a.flac", 0.1 * np.sin(2 * np.pi * 300 * t), 16000)
    monkeypatch.chdir(work)
    return work


def test_readme_commands_run(workdir, capsys):
    from kws_export.cli import main as kws_export
    from kws_runtime.cli import main as kws
    from kws_train.cli import main as kws_train
    from kws_train.data_cli import main as kws_data

    mains = {"kws": kws, "kws-data": kws_data, "kws-train": kws_train, "kws-export": kws_export}
    ran = []
    for args in commands():
        line = shlex.join(args)
        if args[0] not in mains or any(part in f" {line}" for part in NOT_RUN):
            continue
        assert mains[args[0]](args[1:]) == 0, line
        ran.append(args[0])
    assert set(ran) == set(mains) and len(ran) >= 9, ran
    out = capsys.readouterr().out
    assert "clip.wav" in out and "recordings/a.flac" in out and "onnx_int8" in out
    manifest = json.loads((workdir / "bundles" / "shufflenet" / "manifest.json").read_text())
    if importlib.util.find_spec("executorch"):  # the only ShuffleNetV2 .pte programs the suite makes
        assert {"executorch_fp32", "executorch_int8"} <= set(manifest["artifacts"])
    assert (workdir / "data" / "synth" / "synth.json").is_file()  # kws-data synth wrote a dataset
    assert (workdir / "runs" / "streams" / "report.json").is_file()  # kws evaluate-stream wrote its report


def test_readme_python_block_runs(workdir):
    (block,) = blocks("python")
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=workdir, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] in ("_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off",
                                      "stop", "go")

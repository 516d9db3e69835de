"""Every command and code block of the README, so none can go stale.

Each shell line is parsed by the real command-line parser of the command it names (flags,
choices and subcommands must exist), the commands that run in seconds on what the repository
holds are run for real (`kws` on the shipped bundle, the profile), and the Python block runs.
The quick start itself (synthesis, training, export, prediction) runs in CI after the tests
(`.ci/run`); the network and GPU commands (`kws-data download`, `-g`, `torchrun`) are parsed,
not run, since no machine here reaches the dataset host or has a GPU.
"""

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

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
    known_elsewhere = {"bash", "pip", ".venv/bin/python"}
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


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with the paths the README's examples use: the shipped bundle, a clip, recordings/."""
    (tmp_path / "pretrained").symlink_to(REPO / "pretrained")
    t = np.arange(16000) / 16000
    soundfile.write(tmp_path / "clip.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    (tmp_path / "recordings").mkdir()
    soundfile.write(tmp_path / "recordings" / "a.flac", 0.1 * np.sin(2 * np.pi * 300 * t), 16000)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_kws_commands_run(workdir, capsys):
    from kws_runtime.cli import main

    ran = 0
    for args in commands():
        if args[0] == "kws":
            assert main(args[1:]) == 0, shlex.join(args)
            ran += 1
    assert ran >= 3
    out = capsys.readouterr().out
    assert "clip.wav" in out and "recordings/a.flac" in out and "onnx_int8" in out


def test_readme_profile_runs(capsys):
    from kws_train.cli import main

    (line,) = [a for a in commands() if a[:2] == ["kws-train", "profile"]]
    assert main(line[1:]) == 0
    assert "shufflenet_v2_x0_5" in capsys.readouterr().out


def test_readme_python_block_runs(workdir):
    (block,) = blocks("python")
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=workdir, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] in ("_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off",
                                      "stop", "go")

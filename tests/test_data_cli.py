"""`kws-data` as a user runs it: a real subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kws_train import data_cli
from kws_train import download as dl
from loopback import LoopbackServer, build_archive

REPO = Path(__file__).resolve().parents[1]


def kws_data(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "kws_train.data_cli", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_commands(capsys):
    result = kws_data("-h")
    assert result.returncode == 0
    for command in ("download", "stats", "synth"):
        assert command in result.stdout
    for command in ("download", "stats", "synth"):
        with pytest.raises(SystemExit) as exit_info:
            data_cli.main([command, "-h"])
        assert exit_info.value.code == 0 and "usage: kws-data " + command in capsys.readouterr().out


def test_usage_errors_exit_2_without_traceback(capsys):
    result = kws_data()
    assert result.returncode == 2 and "Traceback" not in result.stderr and "usage: kws-data" in result.stderr
    for args in (["frobnicate"], ["download"], ["download", "--out", "x", "--version", "0.3"], ["synth"]):
        with pytest.raises(SystemExit) as exit_info:
            data_cli.main(args)
        assert exit_info.value.code == 2
        assert "usage: kws-data" in capsys.readouterr().err


def test_stats_errors_name_the_folder(tmp_path, capsys):
    assert_one_line_error(kws_data("stats", tmp_path / "missing"), "missing", "no such folder")
    (tmp_path / "empty").mkdir()
    # In-process for the rest: same code path, no interpreter start-up.
    assert data_cli.main(["stats", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no clips found" in err and len(err.strip().splitlines()) == 1


def test_stats_on_the_real_sample(real_data, capsys):
    assert data_cli.main(["stats", str(real_data), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["speakers"]["total"] == 206 and report["problems"] == []
    text = data_cli.format_stats(report)
    assert "speakers: 206" in text and "problems: 0" in text
    yes_row = next(line.split() for line in text.splitlines() if line.startswith("yes "))
    assert int(yes_row[-1]) == sum(report["words"]["yes"].values()) > 200


def test_synth_then_stats(tmp_path):
    out = tmp_path / "syn"
    result = kws_data("synth", out, "--words", "left", "right", "--per-word", "3", "--seed", "5", "--jobs", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "6 clips" in result.stdout and "clips/s" in result.stdout
    assert len(list(out.glob("*/*_nohash_*.wav"))) == 6
    again = kws_data("synth", out, "--words", "left", "--per-word", "1")
    assert_one_line_error(again, str(out), "not empty", "--overwrite")
    stats = kws_data("stats", out, "--json", "--no-progress")
    assert stats.returncode == 0
    report = json.loads(stats.stdout)
    assert report["clips"] == 6 and report["problems"] == []
    assert report["split_source"].startswith("validation_list.txt")


def test_synth_errors(tmp_path):
    assert_one_line_error(kws_data("synth", tmp_path / "a", "--noise", tmp_path / "none"), "--noise", "no such folder")
    assert_one_line_error(kws_data("synth", tmp_path / "a", "--words", "x1"), "cannot synthesize 'x1'")


def test_download_from_a_mirror(tmp_path, real_data):
    # The v0.01 test archive has no published checksum, so any faithful archive is accepted.
    info = dl.archive_info("0.01", test_set=True)
    data, members = build_archive(real_data)
    with LoopbackServer({info.filename: data}) as server:
        result = kws_data(
            "download", "--version", "0.01", "--test-set", "--out", tmp_path, "--base-url", server.url, "--no-progress"
        )
        assert result.returncode == 0, result.stderr
        assert info.dirname in result.stdout and "no published checksum" in result.stdout
        target = tmp_path / info.dirname
        assert all((target / rel).is_file() for rel in members)
        # v0.02 is pinned: our small archive is not the published one.
        result = kws_data("download", "--version", "0.02", "--out", tmp_path, "--base-url", server.url, "--no-progress")
        assert_one_line_error(result, "HTTP 404")
        server.files[dl.archive_info("0.02").filename] = data
        result = kws_data("download", "--out", tmp_path, "--base-url", server.url, "--no-progress")
        assert_one_line_error(result, f"expected {dl.archive_info('0.02').size}")


def test_download_refuses_an_archive_with_a_link_in_one_line(tmp_path, real_data):
    info = dl.archive_info("0.01", test_set=True)
    link = tarfile.TarInfo("./yes/escape")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc"
    data, _ = build_archive(real_data, extra=[(link, None)])
    with LoopbackServer({info.filename: data}) as server:
        result = kws_data(
            "download", "--version", "0.01", "--test-set", "--out", tmp_path, "--base-url", server.url, "--no-progress"
        )
    assert_one_line_error(result, "refused unsafe archive member './yes/escape': a symbolic link")
    assert "unverified archive was deleted" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_download_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert data_cli.main(["download", "--out", str(target), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err

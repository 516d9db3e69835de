"""The ``kws`` command: in-process through main() and as a real subprocess."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from kws_runtime import Predictor, load_audio
from kws_runtime.cli import main

from bad_manifests import BAD_FIELDS, set_field
from broken_audio import broken_files
from bundle_builders import LABELS, SEED, build_bundle, read_manifest, rewrite_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path, _ = build_bundle(
        tmp_path_factory.mktemp("cli") / "bundle",
        int8=True,
        waveform=True,
        torchscript=True,
        scorecard=[
            {"artifact": "onnx_fp32", "file": "model.onnx", "size": 61568, "accuracy": 0.9123, "agreement": 1.0, "latency_ms": 0.123},
            {"artifact": "onnx_int8", "file": "model.int8.onnx", "size": 15900, "accuracy": None, "agreement": 0.98, "latency_ms": 0.1},
        ],
    )
    return path


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    """Six clips in nested folders, plus files the folder walk must skip."""
    root = tmp_path_factory.mktemp("audio")
    (root / "a" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(SEED.clip_samples) / SEED.sample_rate
    for i, (sub, ext) in enumerate([("", "wav"), ("a", "flac"), ("a/deep", "wav"), ("a/deep", "ogg"), ("", "flac"), ("a", "wav")]):
        clip = 0.3 * np.sin(2 * np.pi * (150 + 400 * i) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(root / sub / f"clip{i}.{ext}", clip, SEED.sample_rate)
    (root / "readme.txt").write_text("not audio")
    (root / "a" / "model.onnx").write_bytes(b"\x00")
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def audio_files(folder):
    return sorted((p for p in Path(folder).rglob("*") if p.suffix in {".wav", ".flac", ".ogg"}), key=str)


def test_predict_lines_match_the_api(bundle, audio_dir, capsys):
    code, out, err = run(["predict", bundle, audio_dir], capsys)
    assert code == 0 and err == ""
    files = audio_files(audio_dir)
    lines = out.splitlines()
    assert len(lines) == len(files) == 6
    predictions = Predictor(bundle).predict(files)
    for line, file, p in zip(lines, files, predictions):
        assert line == f"{file}  {p.label}  {p.probability:.2f}"


def test_top_k_and_explicit_files(bundle, audio_dir, capsys):
    files = audio_files(audio_dir)[:2]
    code, out, err = run(["predict", bundle, *files, "--top-k", "3"], capsys)
    assert code == 0
    for line, file in zip(out.splitlines(), files):
        path, *pairs = line.split("  ")
        assert path == str(file) and len(pairs) == 3
        top = Predictor(bundle).predict(file).top(3)
        assert pairs == [f"{label}:{prob:.2f}" for label, prob in top]


def test_json_lines(bundle, audio_dir, capsys):
    code, out, _ = run(["predict", bundle, audio_dir, "--json", "--artifact", "onnx_fp32", "--threads", "1"], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    predictions = Predictor(bundle, artifact="onnx_fp32").predict(audio_files(audio_dir))
    assert [r["path"] for r in records] == [str(f) for f in audio_files(audio_dir)]
    for record, p in zip(records, predictions):
        assert record["label"] == p.label
        assert abs(record["probability"] - p.probability) < 1e-6
        assert list(record["probabilities"]) == LABELS
    code, out, _ = run(["predict", bundle, audio_dir, "--json", "--top-k", "2"], capsys)
    record = json.loads(out.splitlines()[0])
    assert [t["label"] for t in record["top"]] == [label for label, _ in Predictor(bundle).predict(audio_files(audio_dir)[0]).top(2)]


def test_artifact_option_changes_the_model(bundle, audio_dir, capsys):
    outputs = {}
    for name in ("onnx_fp32", "onnx_int8", "onnx_e2e"):
        code, out, _ = run(["predict", bundle, audio_dir, "--json", "--artifact", name], capsys)
        assert code == 0
        outputs[name] = [json.loads(line)["probabilities"] for line in out.splitlines()]
    assert outputs["onnx_fp32"] != outputs["onnx_int8"] != outputs["onnx_e2e"]
    want = Predictor(bundle, artifact="onnx_e2e").predict(load_audio(audio_files(audio_dir)[0]))
    assert abs(outputs["onnx_e2e"][0][want.label] - want.probability) < 1e-6


def test_bad_files_are_reported_and_the_run_goes_on(bundle, audio_dir, tmp_path, capsys):
    (tmp_path / "text.wav").write_text("hello\n" * 50)
    (tmp_path / "empty.flac").write_bytes(b"")
    (tmp_path / "empty_dir").mkdir()
    good = audio_files(audio_dir)
    args = ["predict", bundle, good[0], tmp_path / "text.wav", tmp_path / "missing.ogg", good[1], tmp_path / "empty.flac", tmp_path / "empty_dir"]
    code, out, err = run(args, capsys)
    assert code == 1
    assert [line.split("  ")[0] for line in out.splitlines()] == [str(good[0]), str(good[1])]
    errors = err.splitlines()
    assert len(errors) == 4
    assert errors[0].startswith(f"kws: error: {tmp_path / 'text.wav'}: not a readable audio file")
    assert errors[1] == f"kws: error: {tmp_path / 'missing.ogg'}: no such file or folder"
    assert errors[2] == f"kws: error: {tmp_path / 'empty.flac'}: file is empty (0 bytes)"
    assert errors[3].startswith(f"kws: error: {tmp_path / 'empty_dir'}: no audio files")


def test_bad_bundles_exit_2_with_one_line(bundle, audio_dir, tmp_path, capsys):
    # missing folder
    code, out, err = run(["predict", tmp_path / "nowhere", audio_dir], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "no such bundle folder" in err
    # tampered artifact
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[100] ^= 0x55
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    for command in (["predict", copy, audio_dir], ["info", copy]):
        code, out, err = run(command, capsys)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "model.int8.onnx: sha256" in err and "copy the bundle again" in err
    # unknown version
    manifest = read_manifest(copy)
    manifest["format_version"] = 7
    rewrite_manifest(copy, manifest)
    code, _, err = run(["info", copy], capsys)
    assert code == 2 and "format_version: 7 is not supported" in err and "upgrade kws_runtime" in err
    # bad artifact name, a torchscript artifact
    code, _, err = run(["predict", bundle, audio_dir, "--artifact", "nope"], capsys)
    assert code == 2 and "has no artifact 'nope'" in err
    code, _, err = run(["predict", bundle, audio_dir, "--artifact", "torchscript_fp32"], capsys)
    assert code == 2 and "runs ONNX artifacts only" in err


def test_info_prints_the_manifest_as_tables(bundle, capsys):
    code, out, err = run(["info", bundle], capsys)
    assert code == 0 and err == ""
    assert "tiny (linear, test)" in out
    assert "12: " + " ".join(LABELS) in out
    assert "40 mel bands x 32 frames: 16000 Hz, 1 s clips, n_fft 2048, window 2048 (hann), hop 512" in out
    manifest = read_manifest(bundle)
    for name, entry in manifest["artifacts"].items():
        row = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert entry["file"] in row and entry["format"] in row and entry["precision"] in row
        assert entry["sha256"][:12] in row
    assert "91.23%" in next(line for line in out.splitlines() if line.strip().startswith("onnx_fp32 "))
    assert "scorecard" in out
    assert "agreement" in out and "98.00%" in out and "61.6 kB" in out


@pytest.mark.parametrize("argv", [["-h"], ["predict", "-h"], ["info", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: kws" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage: kws"),
        (["predict"], "the following arguments are required"),
        (["predict", "b", "x", "--top-k", "0"], "expected a positive integer, got '0'"),
        (["predict", "b", "x", "--threads", "many"], "expected a positive integer, got 'many'"),
        (["train"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def _kws(*args, **kwargs):
    """The CLI as a user runs it: a new interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kws_runtime.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=120, **kwargs)


def test_subprocess_run_and_failures_have_no_traceback(bundle, audio_dir, tmp_path):
    ok = _kws("predict", bundle, audio_dir, "--threads", "1")
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 6 and ok.stderr == ""

    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00")
    partial = _kws("predict", bundle, audio_dir / "clip0.wav", tmp_path / "bad.wav")
    assert partial.returncode == 1
    assert len(partial.stdout.splitlines()) == 1 and partial.stderr.count("\n") == 1
    assert "bad.wav" in partial.stderr and "Traceback" not in partial.stderr

    broken = _kws("predict", tmp_path, audio_dir)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().startswith("kws: error:") and "manifest.json" in broken.stderr


def test_every_broken_audio_file_is_one_error_line(bundle, tmp_path, capsys):
    cases = broken_files(tmp_path)
    soundfile.write(tmp_path / "long.wav", np.zeros(31 * 8000, np.int16), 8000)
    cases["long.wav"] = (None, r"is 31\.0 s long, over the 30 s limit")
    paths = []
    for name, (data, _) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    code, out, err = run(["predict", bundle, *paths], capsys)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == len(cases)
    for line, path, (_, message) in zip(lines, paths, cases.values()):
        assert line.startswith(f"kws: error: {path}: ") and re.search(message, line), line


@pytest.mark.parametrize("field, value, message", BAD_FIELDS, ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD_FIELDS])
def test_bad_manifests_exit_2_naming_the_field(bundle, tmp_path, capsys, field, value, message):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = read_manifest(copy)
    set_field(manifest, field, value)
    rewrite_manifest(copy, manifest)
    for command in (["info", copy], ["predict", copy, copy / "model.onnx"]):
        code, out, err = run(command, capsys)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert err.startswith(f"kws: error: {copy / 'manifest.json'}: ")
        assert re.search(message, err)

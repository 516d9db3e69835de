"""The runtime against hostile or unlucky input: OS errors on paths, absurd sample values,
manifests and specs from folders nobody vouches for. Through the API and the ``kws`` CLI."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from kws_runtime import AudioError, BundleError, Predictor, load_audio, load_bundle, read_audio
from kws_runtime.bundle import MAX_MANIFEST_BYTES
from kws_runtime.cli import main
from kws_runtime.files import current_umask

from broken_audio import SR, tone
from bundle_builders import build_bundle, read_manifest, rewrite_manifest
from filesystems import require_permission_checks, run_unprivileged

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("untrusted") / "bundle")[0]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def kws_unprivileged(*args) -> subprocess.CompletedProcess:
    return run_unprivileged([sys.executable, "-m", "kws_runtime.cli", *map(str, args)], cwd=REPO)


def write_clip(path: Path, samples=None, subtype="PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, tone(440) if samples is None else samples, SR, subtype=subtype)
    return path


# ------------------------------------------------------------------------------- OS errors


def test_a_name_longer_than_the_file_system_allows(tmp_path, bundle, capsys):
    long_name = tmp_path / ("x" * 300 + ".wav")
    with pytest.raises(AudioError, match="the name is longer than the file system allows"):
        load_audio(long_name)
    good = write_clip(tmp_path / "good.wav")
    code, out, err = run(["predict", bundle, good, long_name, good], capsys)
    assert code == 1
    assert out.count(str(good)) == 2  # the files on both sides are still classified
    assert err.count("\n") == 1 and "the name is longer than the file system allows" in err


def test_a_permission_denied_folder_on_the_way_to_a_file(tmp_path, bundle):
    require_permission_checks(tmp_path)
    good = write_clip(tmp_path / "good.wav")
    locked = tmp_path / "locked"
    hidden = write_clip(locked / "clip.wav")
    locked.chmod(0)
    try:
        api = run_unprivileged(
            [sys.executable, "-c", f"from kws_runtime import load_audio\nload_audio({str(hidden)!r})"], cwd=REPO
        )
        cli = kws_unprivileged("predict", bundle, good, hidden, good)
    finally:
        locked.chmod(0o755)
    assert api.returncode != 0 and f"AudioError: {hidden}: permission denied" in api.stderr
    assert cli.returncode == 1
    assert cli.stdout.count(str(good)) == 2
    assert cli.stderr.strip() == f"kws: error: {hidden}: permission denied"


def test_an_unreadable_file_says_permission_denied_not_system_error(tmp_path, bundle):
    require_permission_checks(tmp_path)
    secret = write_clip(tmp_path / "secret.wav")
    secret.chmod(0)
    try:
        cli = kws_unprivileged("predict", bundle, secret)
    finally:
        secret.chmod(0o644)
    assert cli.returncode == 1
    assert cli.stderr.strip() == f"kws: error: {secret}: permission denied"
    assert "Traceback" not in cli.stderr and "System error" not in cli.stderr


def test_an_unreadable_subfolder_is_an_error_and_the_rest_is_classified(tmp_path, bundle):
    require_permission_checks(tmp_path)
    root = tmp_path / "clips"
    for name in ("a.wav", "b.wav", "sub/c.wav"):
        write_clip(root / name)
    write_clip(root / "locked" / "d.wav")
    (root / "locked").chmod(0)
    try:
        cli = kws_unprivileged("predict", bundle, root)
    finally:
        (root / "locked").chmod(0o755)
    assert cli.returncode == 1  # not 0: a folder was skipped
    assert [line.split()[0] for line in cli.stdout.splitlines()] == [str(root / n) for n in ("a.wav", "b.wav", "sub/c.wav")]
    assert cli.stderr.strip() == f"kws: error: {root / 'locked'}: folder cannot be read: permission denied"


def test_a_bundle_folder_that_cannot_be_read(tmp_path, bundle):
    require_permission_checks(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    build_bundle(locked / "bundle")
    locked.chmod(0)
    try:
        cli = kws_unprivileged("info", locked / "bundle")
    finally:
        locked.chmod(0o755)
    assert cli.returncode == 2
    assert cli.stderr.strip().endswith("cannot be read: permission denied") and "Traceback" not in cli.stderr


# ---------------------------------------------------------------------------- audio values


def test_finite_but_absurd_float_samples_are_refused(tmp_path, bundle, capsys):
    absurd = write_clip(tmp_path / "absurd.wav", np.full(SR, 1e20), subtype="FLOAT")
    with pytest.raises(AudioError, match=r"samples up to 1e\+20, far outside the \[-1, 1\]"):
        read_audio(absurd)
    code, out, err = run(["predict", bundle, absurd], capsys)
    assert (code, out) == (1, "")
    assert "far outside" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="far outside"):
        Predictor(bundle).predict(np.full(SR, 1e20, np.float32))


def test_ordinary_clipping_and_float_overshoot_are_accepted(tmp_path, bundle):
    clipped = write_clip(tmp_path / "clipped.wav", np.clip(3 * tone(440), -1, 1))
    overshoot = write_clip(tmp_path / "overshoot.wav", 3 * tone(440), subtype="FLOAT")  # peaks at 1.5
    assert np.abs(read_audio(clipped)).max() <= 1.0
    assert np.abs(read_audio(overshoot)).max() == pytest.approx(1.5, abs=1e-3)
    predictor = Predictor(bundle)
    for path in (clipped, overshoot):
        assert np.isfinite(list(predictor.predict(path).probabilities.values())).all()


# ------------------------------------------------------------------------------- manifests


def test_a_manifest_nested_deep_enough_to_exhaust_recursion(tmp_path, capsys):
    path, _ = build_bundle(tmp_path / "deep")
    manifest = read_manifest(path)
    text = json.dumps(manifest)[:-1] + ', "provenance": ' + "[" * 200_000 + "]" * 200_000 + "}"
    (path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(path)
    code, _, err = run(["info", path], capsys)
    assert code == 2 and "nested too deeply" in err and err.count("\n") == 1


def test_a_manifest_far_larger_than_any_real_one(tmp_path, capsys):
    path, _ = build_bundle(tmp_path / "huge")
    manifest = read_manifest(path)
    manifest["notes"] = "x" * MAX_MANIFEST_BYTES
    rewrite_manifest(path, manifest)
    with pytest.raises(BundleError, match=r"manifest\.json: is larger than 1024 KiB"):
        load_bundle(path)
    code, _, err = run(["info", path], capsys)
    assert code == 2 and "larger than" in err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_fft", 1 << 30, "n_fft.*must not exceed the clip length"),
        ("win_length", 1 << 30, "win_length"),
        ("hop_length", 1 << 30, "hop_length.*must not exceed the clip length"),
        ("n_mels", 1 << 20, "n_mels.*must not exceed the 1025 frequency bins"),
        ("clip_samples", 1 << 40, "clip_samples.*at most 60 s"),
        ("sample_rate", 1 << 40, "sample_rate.*at most 384000 Hz"),
    ],
)
def test_a_feature_spec_whose_sizes_would_allocate_absurd_memory(tmp_path, field, value, message):
    path, _ = build_bundle(tmp_path / "spec")
    manifest = read_manifest(path)
    manifest["feature_spec"][field] = value
    rewrite_manifest(path, manifest)
    with pytest.raises(BundleError, match=rf"manifest\.json: feature_spec: .*{message}"):
        load_bundle(path)


def test_manifest_may_be_a_link_inside_the_bundle_but_not_one_leading_outside(tmp_path):
    path, _ = build_bundle(tmp_path / "linked")
    (path / "manifest.json").rename(path / "real-manifest.json")
    (path / "manifest.json").symlink_to("real-manifest.json")
    assert load_bundle(path).name == "tiny"
    outside = tmp_path / "elsewhere.json"
    (path / "real-manifest.json").rename(outside)
    (path / "manifest.json").unlink()
    (path / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match="is a link leading outside the bundle folder"):
        load_bundle(path)


def test_bundles_are_written_readable_by_others(tmp_path):
    path, _ = build_bundle(tmp_path / "shared")
    assert stat.S_IMODE(os.stat(path / "manifest.json").st_mode) == 0o666 & ~current_umask()

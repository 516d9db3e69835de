"""Bundle manifests: writing, reading, validation and checksum refusal."""

import hashlib
import os

import numpy as np
import pytest

from kws_runtime import BundleError, file_sha256, load_bundle, write_manifest
from kws_runtime.bundle import validate_manifest

from bad_manifests import BAD_FIELDS, set_field
from bundle_builders import LABELS, SEED, build_bundle, read_manifest, rewrite_manifest


def test_load_bundle_reads_every_field(tmp_path):
    path, _ = build_bundle(tmp_path / "b", int8=True, waveform=True, torchscript=True, scorecard=[{"artifact": "onnx_fp32"}])
    bundle = load_bundle(path)
    assert bundle.path == path
    assert bundle.labels == tuple(LABELS)
    assert bundle.spec == SEED
    assert bundle.name == "tiny" and bundle.model["architecture"] == "linear"
    assert list(bundle.artifacts) == ["onnx_fp32", "onnx_int8", "onnx_e2e", "torchscript_fp32"]
    fp32 = bundle.artifacts["onnx_fp32"]
    assert fp32.path == (path / "model.onnx").absolute()
    assert fp32.input_shape == ("batch", 1, 40, 32) and fp32.output_shape == ("batch", 12)
    assert fp32.input_kind == "log_mel" and fp32.output_kind == "logits"
    assert fp32.sha256 == hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    assert fp32.metrics == {"accuracy": 0.9123}
    assert bundle.artifacts["onnx_e2e"].input_kind == "waveform"
    assert bundle.scorecard == [{"artifact": "onnx_fp32"}]
    # the manifest file itself is accepted as the path too
    assert load_bundle(path / "manifest.json").artifacts.keys() == bundle.artifacts.keys()


def test_unknown_top_level_keys_are_kept(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    manifest["export"] = {"torch": "2.13.0"}
    write_manifest(path, manifest)
    assert load_bundle(path).manifest["export"] == {"torch": "2.13.0"}


def test_write_manifest_is_atomic_and_round_trips(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    manifest["model"]["name"] = "renamed ünïcode"
    target = write_manifest(path, manifest)
    assert target == path / "manifest.json"
    assert read_manifest(path) == manifest
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]  # no temp files left


def test_write_manifest_refuses_an_invalid_manifest_and_keeps_the_old_one(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    before = (path / "manifest.json").read_bytes()
    manifest = read_manifest(path)
    manifest["labels"] = []
    with pytest.raises(BundleError, match="labels"):
        write_manifest(path, manifest)
    assert (path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]


def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk_bytes=1024) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_tampered_artifact_is_refused_with_the_file_named(tmp_path):
    path, _ = build_bundle(tmp_path / "b", int8=True)
    data = bytearray((path / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    (path / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert "model.int8.onnx" in message and "sha256" in message and "onnx_int8" in message
    assert "copy the bundle again" in message
    load_bundle(path, verify=False)  # structure alone is still fine


def test_read_returns_the_bytes_it_checked(tmp_path):
    path, _ = build_bundle(tmp_path / "b", int8=True)
    artifact = load_bundle(path).artifacts["onnx_int8"]
    assert artifact.read() == (path / "model.int8.onnx").read_bytes()
    data = bytearray(artifact.read())
    data[-1] ^= 0x01
    (path / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.int8\.onnx: sha256 .* \(onnx_int8\)"):
        artifact.read()
    (path / "model.int8.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.int8\.onnx: missing \(onnx_int8 in the manifest\)"):
        artifact.read()


def test_truncated_artifact_is_refused_by_size(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    data = (path / "model.onnx").read_bytes()
    (path / "model.onnx").write_bytes(data[:-10])
    with pytest.raises(BundleError, match=rf"model\.onnx.*{len(data) - 10} bytes but the manifest says {len(data)}"):
        load_bundle(path)


def test_missing_artifact_is_refused(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    (path / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: missing"):
        load_bundle(path)


@pytest.mark.parametrize("file", ["../model.onnx", "/etc/passwd", "sub/../../model.onnx", "C:/model.onnx", "..\\model.onnx"])
def test_file_names_must_stay_inside_the_bundle(tmp_path, file):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    manifest["artifacts"]["onnx_fp32"]["file"] = file
    rewrite_manifest(path, manifest)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(path)
    with pytest.raises(BundleError, match="outside the bundle"):
        write_manifest(path, manifest)


def test_symlink_leading_outside_is_refused(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    outside = tmp_path / "outside.onnx"
    os.replace(path / "model.onnx", outside)
    os.symlink(outside, path / "model.onnx")
    with pytest.raises(BundleError, match="link leading outside"):
        load_bundle(path)


def test_artifact_in_a_subfolder_is_fine(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    (path / "models").mkdir()
    os.replace(path / "model.onnx", path / "models" / "model.onnx")
    manifest = read_manifest(path)
    manifest["artifacts"]["onnx_fp32"]["file"] = "models/model.onnx"
    write_manifest(path, manifest)
    assert load_bundle(path).artifacts["onnx_fp32"].path == (path / "models" / "model.onnx").absolute()



@pytest.mark.parametrize("field, value, message", BAD_FIELDS, ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD_FIELDS])
def test_bad_manifest_fields_are_refused_with_the_field_named(tmp_path, field, value, message):
    path, _ = build_bundle(tmp_path / "b")
    manifest = read_manifest(path)
    set_field(manifest, field, value)
    rewrite_manifest(path, manifest)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(path)
    assert str(path / "manifest.json") in str(info.value)
    with pytest.raises(BundleError, match=message):
        validate_manifest(manifest)


def test_manifest_that_is_not_json_or_not_an_object(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    (path / "manifest.json").write_text('{"format": "kws-bundle",')
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON \(line 1"):
        load_bundle(path)
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object, not list"):
        load_bundle(path)
    (path / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BundleError, match="is not UTF-8 text"):
        load_bundle(path)


def test_not_a_bundle_folder(tmp_path):
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a bundle folder"):
        load_bundle(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path / "empty")


def test_write_manifest_refuses_values_json_cannot_hold(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    for bad in (float("nan"), np.float32(0.5), {1, 2}):
        manifest = read_manifest(path)
        manifest["artifacts"]["onnx_fp32"]["metrics"]["accuracy"] = bad
        with pytest.raises(BundleError, match="not plain JSON"):
            write_manifest(path, manifest)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]
    assert (path / "manifest.json").stat().st_mode & 0o777 == 0o644

"""Model bundles: a folder holding ``manifest.json`` and the model files it lists.

This module is the one definition of the manifest format. The exporter (kws_export) writes bundles
with `write_manifest` and `file_sha256`; devices read them with `load_bundle`, which refuses a
manifest it does not understand and any file whose size or sha256 differs from the manifest.

Manifest, format version 1::

    {"format": "kws-bundle", "format_version": 1,
     "model": {"name": str, "architecture": str, "variant": str},
     "labels": [str, ...],                       # in model output order
     "feature_spec": FeatureSpec.to_dict(),
     "artifacts": {NAME: {"file": str, "format": "onnx" | "torchscript" | "torchscript-lite" | "executorch",
                          "precision": "fp32" | "int8",
                          "input": {"name": str, "kind": "log_mel" | "waveform", "shape": [...]},
                          "output": {"name": str, "kind": "logits" | "probabilities", "shape": [...]},
                          "sha256": hex, "size": bytes, "metrics": {...}, "notes": {...}}},
     "scorecard": [{...}, ...]}                  # optional

Other top-level keys (provenance such as ``"export"``) are kept but not interpreted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

from .cpu import int8_pairs_saturate
from .files import os_error_reason, write_text_atomic
from .spec import FeatureSpec, SpecError

FORMAT = "kws-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Real manifests are a few tens of kB (the scorecard is the bulk); the cap keeps a hostile one
# from making the reader parse gigabytes.
MAX_MANIFEST_BYTES = 1 << 20
# An int8 artifact that agrees with its fp32 model on fewer test clips than this has lost
# more than rounding: kws-export and kws info warn, and Predictor does not pick it by default.
INT8_AGREEMENT_FLOOR = 0.97
ARTIFACT_FORMATS = ("onnx", "torchscript", "torchscript-lite", "executorch")
PRECISIONS = ("fp32", "int8")
INPUT_KINDS = ("log_mel", "waveform")
OUTPUT_KINDS = ("logits", "probabilities")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_REEXPORT = "re-export the bundle with kws-export"


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the bundle, the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One model file of a bundle, as its manifest entry describes it.

    Attributes:
        name: the entry's key, e.g. ``"onnx_int8"``.
        path: absolute path of the file.
        input_shape, output_shape: as listed; symbolic dimensions are strings (``"batch"``).
        size: bytes.
    """

    name: str
    file: str
    path: Path
    format: str
    precision: str
    input_name: str
    input_kind: str
    input_shape: tuple
    output_name: str
    output_kind: str
    output_shape: tuple
    sha256: str
    size: int
    metrics: dict
    notes: dict
    root: Path = dataclasses.field(repr=False, compare=False, default=Path("."))

    def verify(self) -> Path:
        """Check the file against the manifest's size and sha256 now; return its path.

        `Predictor` calls this right before onnxruntime opens the file, so a file changed
        after `load_bundle` is still refused.
        """
        _verify_file(self)
        return self.path

    def read(self) -> bytes:
        """The file's bytes, checked against the manifest's size and sha256: the bytes returned
        are the bytes checked, whatever happens to the file afterwards."""
        try:
            _check_location(self)
            data = self.path.read_bytes()
        except OSError as exc:
            raise _unreadable(self, exc) from None
        _check_content(self, len(data), hashlib.sha256(data).hexdigest())
        return data


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle.

    Attributes:
        path: the bundle folder.
        manifest: the manifest as read (plain JSON data).
        labels: class names in model output order.
        spec: the feature spec the models were trained with.
        artifacts: name -> `Artifact`, in manifest order.
        scorecard: the optional scorecard rows (list of dicts).
    """

    path: Path
    manifest: dict
    model: dict
    labels: tuple
    spec: FeatureSpec
    artifacts: dict
    scorecard: list

    @property
    def name(self) -> str:
        return self.model["name"]


def low_agreement(artifact: "Artifact") -> Optional[str]:
    """Why an int8 artifact should not be trusted by default (its measured agreement with fp32
    is below `INT8_AGREEMENT_FLOOR`), or None (fp32, unmeasured, or agreeing)."""
    agreement = artifact.metrics.get("agreement_fp32")
    if artifact.precision != "int8" or not isinstance(agreement, (int, float)) or agreement >= INT8_AGREEMENT_FLOOR:
        return None
    clips = artifact.metrics.get("test_clips")
    on = f" of {clips} test clips" if isinstance(clips, int) else " of the test clips"
    return (f"{artifact.name} agrees with the fp32 model on only {100 * agreement:.1f}%{on} "
            f"(below {100 * INT8_AGREEMENT_FLOOR:.0f}%): int8 lost more than rounding")


def full_range_weights(bundle: "Bundle", artifact: "Artifact") -> bool:
    """Whether an int8 ONNX artifact's weights use the full int8 range, as its export notes say
    (an ``onnx_e2e_int8`` holds the ``onnx_int8`` network, so it reads that one's notes)."""
    if artifact.format != "onnx" or artifact.precision != "int8":
        return False
    network = bundle.artifacts.get("onnx_int8", artifact) if artifact.input_kind == "waveform" else artifact
    quantization = network.notes.get("quantization")
    return isinstance(quantization, dict) and quantization.get("reduce_range") is False


def untrusted(bundle: "Bundle", artifact: "Artifact") -> Optional[str]:
    """Why an artifact should not be used unless asked for by name: low agreement with fp32
    (`low_agreement`), or full-range int8 weights on a CPU whose int8 kernels saturate with
    them (`kws_runtime.cpu`); None when it can be trusted."""
    reason = low_agreement(artifact)
    if reason is None and full_range_weights(bundle, artifact) and int8_pairs_saturate():
        reason = (f"{artifact.name} has full-range int8 weights, which saturate in onnxruntime on this CPU (x86 "
                  f"without VNNI) and cost accuracy; make it again with 'kws-export requantize {bundle.path} ...'")
    return reason


def file_sha256(path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_manifest(manifest: Any, where: str = MANIFEST_NAME) -> None:
    """Check the structure of a manifest (not the files); raise `BundleError` naming the field.

    Args:
        manifest: parsed JSON.
        where: how to name the manifest in messages (usually its path).
    """
    _parse(manifest, where, Path("."))


def write_manifest(bundle_dir, manifest: dict) -> Path:
    """Validate ``manifest`` and write it to ``bundle_dir/manifest.json`` atomically.

    The files it lists are not checked here (`load_bundle` does that), only the structure,
    so a bundle is never given a manifest that the runtime would refuse to read.

    Returns:
        The manifest's path.
    """
    bundle_dir = Path(bundle_dir)
    target = bundle_dir / MANIFEST_NAME
    _parse(manifest, str(target), bundle_dir)
    try:
        text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{target}: the manifest is not plain JSON ({exc}); use Python int/float/str/list/dict, "
            "finite numbers, and None for a value that was not measured"
        ) from None
    return write_text_atomic(target, text)


def load_bundle(path, verify: bool = True) -> Bundle:
    """Read a bundle folder (or its ``manifest.json``) and check every artifact.

    A bundle is something people copy between machines, so nothing in it is trusted: the
    manifest may be at most `MAX_MANIFEST_BYTES` and nested at most as deep as JSON parsing
    allows, it and every artifact must lie inside the folder (a link within the folder is
    fine, one leading outside is refused), and the feature spec's sizes are bounded
    (`kws_runtime.spec.FeatureSpec`).

    Args:
        path: the bundle folder, or the manifest file inside it.
        verify: check each artifact's size and sha256 (reads every file once).

    Raises:
        BundleError: missing or unreadable manifest, unknown format or version, a bad field,
            a file leaving the folder, or an artifact that is missing or differs from the
            manifest. The message says which bundle, which file, what and what to do.
    """
    path = Path(path)
    try:
        folder = path.parent if path.name == MANIFEST_NAME and path.is_file() else path
        manifest_path = folder / MANIFEST_NAME
        if not folder.exists():
            raise BundleError(f"{folder}: no such bundle folder")
        if not folder.is_dir():
            raise BundleError(f"{folder}: not a bundle folder (expected a folder with {MANIFEST_NAME})")
        if not manifest_path.is_file():
            raise BundleError(f"{folder}: has no {MANIFEST_NAME}; is this a bundle written by kws-export?")
        if not manifest_path.resolve().is_relative_to(folder.resolve()):
            raise BundleError(f"{manifest_path}: is a link leading outside the bundle folder; refusing to read it")
        with open(manifest_path, "rb") as stream:
            raw = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"{getattr(exc, 'filename', None) or path}: cannot be read: {os_error_reason(exc)}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{manifest_path}: is larger than {MAX_MANIFEST_BYTES // 1024} KiB, far beyond any manifest kws-export "
            "writes; refusing to parse it"
        )
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{manifest_path}: is not UTF-8 text ({exc.reason}); copy the bundle again") from None
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"{manifest_path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"copy the bundle again or {_REEXPORT}"
        ) from None
    except RecursionError:
        raise BundleError(f"{manifest_path}: is nested too deeply to be a manifest; refusing to parse it") from None
    bundle = _parse(manifest, str(manifest_path), folder)
    if verify:
        for artifact in bundle.artifacts.values():
            _verify_file(artifact)
    return bundle


# ----------------------------------------------------------------------------------- checking


def _parse(manifest: Any, where: str, folder: Path) -> Bundle:
    def bad(field: str, why: str, fix: str = _REEXPORT):
        raise BundleError(f"{where}: {field}: {why}; {fix}")

    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: must hold a JSON object, not {type(manifest).__name__}; {_REEXPORT}")
    if manifest.get("format") != FORMAT:
        bad("format", f"is {manifest.get('format')!r}, expected {FORMAT!r}", "this is not a kws model bundle")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        bad("format_version", f"must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        bad(
            "format_version",
            f"{version} is not supported (this runtime reads version {FORMAT_VERSION})",
            "upgrade kws_runtime" if version > FORMAT_VERSION else _REEXPORT,
        )

    model = _object(manifest, "model", bad)
    for key in ("name", "architecture", "variant"):
        if not isinstance(model.get(key), str) or not model[key]:
            bad(f"model.{key}", f"must be a non-empty string, got {model.get(key)!r}")

    labels = manifest.get("labels")
    if not isinstance(labels, list) or not labels:
        bad("labels", f"must be a non-empty list of class names, got {labels!r}")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label:
            bad(f"labels[{i}]", f"must be a non-empty string, got {label!r}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        bad("labels", f"repeat {', '.join(duplicates)}")

    try:
        spec = FeatureSpec.from_dict(manifest.get("feature_spec"))
    except SpecError as exc:
        bad("feature_spec", str(exc))

    entries = _object(manifest, "artifacts", bad)
    if not entries:
        bad("artifacts", "lists no model files")
    artifacts = {}
    for name, entry in entries.items():
        artifacts[name] = _parse_artifact(name, entry, spec, len(labels), folder, bad)

    scorecard = manifest.get("scorecard", [])
    if not isinstance(scorecard, list) or not all(isinstance(row, dict) for row in scorecard):
        bad("scorecard", "must be a list of objects")
    return Bundle(folder, manifest, dict(model), tuple(labels), spec, artifacts, list(scorecard))


def _object(parent: dict, key: str, bad, field: Optional[str] = None) -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        bad(field or key, f"must be an object, got {value!r}")
    return value


def _parse_artifact(name: str, entry: Any, spec: FeatureSpec, n_labels: int, folder: Path, bad) -> Artifact:
    field = f"artifacts.{name}"
    if not isinstance(entry, dict):
        bad(field, f"must be an object, got {entry!r}")

    file, path = _artifact_file(entry, field, folder, bad)
    choices = {"format": ARTIFACT_FORMATS, "precision": PRECISIONS}
    for key, allowed in choices.items():
        if entry.get(key) not in allowed:
            bad(f"{field}.{key}", f"is {entry.get(key)!r}, expected one of {', '.join(allowed)}")
    ports = {port: _parse_port(entry, field, port, kinds, bad)
             for port, kinds in (("input", INPUT_KINDS), ("output", OUTPUT_KINDS))}
    _check_shapes(ports, field, spec, n_labels, bad)

    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        bad(f"{field}.sha256", f"must be 64 lowercase hex digits, got {sha!r}")
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        bad(f"{field}.size", f"must be a byte count, got {size!r}")
    for key in ("metrics", "notes"):
        if not isinstance(entry.get(key, {}), dict):
            bad(f"{field}.{key}", f"must be an object, got {entry.get(key)!r}")

    return Artifact(
        name=name,
        file=file,
        path=path,
        format=entry["format"],
        precision=entry["precision"],
        input_name=ports["input"]["name"],
        input_kind=ports["input"]["kind"],
        input_shape=tuple(ports["input"]["shape"]),
        output_name=ports["output"]["name"],
        output_kind=ports["output"]["kind"],
        output_shape=tuple(ports["output"]["shape"]),
        sha256=sha,
        size=size,
        metrics=dict(entry.get("metrics", {})),
        notes=dict(entry.get("notes", {})),
        root=folder.absolute(),
    )


def _artifact_file(entry: dict, field: str, folder: Path, bad):
    """The artifact's file name as written and its path, which must stay inside the bundle folder."""
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        bad(f"{field}.file", f"must be a file name, got {file!r}")
    relative = PurePosixPath(file.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or re.match(r"^[A-Za-z]:", file):
        bad(f"{field}.file", f"{file!r} points outside the bundle folder", "refusing to read it; " + _REEXPORT)
    return file, (folder / Path(*relative.parts)).absolute()


def _parse_port(entry: dict, field: str, port: str, kinds: Sequence[str], bad) -> dict:
    """The artifact's ``input`` or ``output`` object: a name, a kind and a shape."""
    value = _object(entry, port, bad, f"{field}.{port}")
    if not isinstance(value.get("name"), str) or not value["name"]:
        bad(f"{field}.{port}.name", f"must be a non-empty string, got {value.get('name')!r}")
    if value.get("kind") not in kinds:
        bad(f"{field}.{port}.kind", f"is {value.get('kind')!r}, expected one of {', '.join(kinds)}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
        bad(f"{field}.{port}.shape", f"must be a list of sizes or dimension names, got {shape!r}")
    return value


def _check_shapes(ports: dict, field: str, spec: FeatureSpec, n_labels: int, bad) -> None:
    # The shapes must agree with the feature spec and the labels: a bundle whose parts do not
    # fit together would otherwise fail at the first prediction, or worse, mislabel.
    expected_in = [1, spec.n_mels, spec.n_frames] if ports["input"]["kind"] == "log_mel" else [spec.clip_samples]
    actual_in = ports["input"]["shape"][1:]
    if len(actual_in) != len(expected_in) or any(isinstance(a, int) and a != e for a, e in zip(actual_in, expected_in)):
        bad(
            f"{field}.input.shape",
            f"{ports['input']['shape']} does not fit the feature spec (expected [batch, {', '.join(map(str, expected_in))}])",
        )
    out_shape = ports["output"]["shape"]
    if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != n_labels):
        bad(f"{field}.output.shape", f"{out_shape} does not fit the {n_labels} labels (expected [batch, {n_labels}])")


def _is_dim(d) -> bool:
    return (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and bool(d))


def _check_location(artifact: Artifact) -> None:
    path = artifact.path
    if not path.exists():
        raise BundleError(f"{path}: missing ({artifact.name} in the manifest); copy the whole bundle folder")
    # The real location must be inside the real bundle folder: a link named model.onnx that
    # leads elsewhere is refused, a link within the folder is fine.
    if not path.resolve().is_relative_to(artifact.root.resolve()):
        raise BundleError(f"{path}: is a link leading outside the bundle folder; refusing to read it; {_REEXPORT}")
    if not path.is_file():
        raise BundleError(f"{path}: not a regular file ({artifact.name} in the manifest); copy the bundle again")


def _verify_file(artifact: Artifact) -> None:
    path = artifact.path
    try:
        _check_location(artifact)
        size = path.stat().st_size
        if size != artifact.size:
            # Cheap check first: a truncated copy is the common case and needs no hashing.
            _check_content(artifact, size, None)
        digest = file_sha256(path)
    except OSError as exc:
        raise _unreadable(artifact, exc) from None
    _check_content(artifact, size, digest)


def _unreadable(artifact: Artifact, exc: OSError) -> BundleError:
    return BundleError(f"{artifact.path}: cannot be read: {os_error_reason(exc)} ({artifact.name}); copy the bundle again")


def _check_content(artifact: Artifact, size: int, digest: Optional[str]) -> None:
    path = artifact.path
    fix = "the file was changed or damaged after export; copy the bundle again or " + _REEXPORT
    if size != artifact.size:
        raise BundleError(f"{path}: is {size} bytes but the manifest says {artifact.size} ({artifact.name}); {fix}")
    if digest is not None and digest != artifact.sha256:
        raise BundleError(
            f"{path}: sha256 {digest[:16]}... does not match the manifest's {artifact.sha256[:16]}... "
            f"({artifact.name}); {fix}"
        )

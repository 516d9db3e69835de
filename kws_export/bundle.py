"""Export a checkpoint into a model bundle: every artifact written, verified, scored and listed.

`export_bundle` is the library entry point behind ``kws-export``, a pipeline in four steps:

1. the run's recipe (stored in the checkpoint) rebuilds its splits: calibration clips from the
   training split, int8 setting selection on the validation split, the scorecard's test clips
   from the testing split (`ExportData`);
2. each requested artifact kind's maker (`kws_export.makers.ARTIFACTS`) writes its file, loads
   it back and checks it against the eager model; an artifact that fails is reported, its file
   removed, and the others are still written;
3. every artifact is scored on the same test clips (accuracy, agreement with fp32, latency);
4. the manifest is written with `kws_runtime.bundle.write_manifest` and read back with
   `kws_runtime.bundle.load_bundle`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from kws_runtime.audio import AudioError
from kws_runtime.bundle import (
    FORMAT, FORMAT_VERSION, INT8_AGREEMENT_FLOOR, MANIFEST_NAME, file_sha256, load_bundle, write_manifest,
)
from kws_runtime.spec import FeatureSpec
from kws_train.checkpoint import Checkpoint, load_checkpoint
from kws_train.dataset import DatasetError, index_dataset, load_example
from kws_train.recipe import RecipeError, RunRecipe

from . import checks, scorecard
from .checks import VerificationError
from .executorch_export import Pt2eQuantConfig
from .makers import ARTIFACTS, ExportContext, NeedsCalibration
from .quantize import LogMelReader, OnnxQuantConfig
from .torchscript import TorchQuantConfig

__all__ = [
    "ARTIFACT_FILES",
    "ArtifactResult",
    "ExportError",
    "ExportReport",
    "FORMATS",
    "MIN_CALIBRATION_CLIPS",
    "export_bundle",
]

# Standard artifact names and files (the bundle contract), in the order they are made.
ARTIFACT_FILES = {kind.name: kind.file for kind in ARTIFACTS}
FORMATS = tuple(ARTIFACT_FILES)
INT8_FORMATS = tuple(kind.name for kind in ARTIFACTS if kind.int8)
MIN_CALIBRATION_CLIPS = 500


class ExportError(ValueError):
    """The export cannot start (bad checkpoint, output folder, data or option)."""


@dataclasses.dataclass
class ArtifactResult:
    """What happened to one requested artifact."""

    name: str
    file: str
    ok: bool
    error: Optional[str] = None
    entry: Optional[dict] = None  # its manifest entry when ok

    def describe(self) -> str:
        if not self.ok:
            return f"FAILED {self.name}: {self.error}"
        m = self.entry.get("metrics", {})
        parts = [f"ok     {self.name:<22} {self.file:<16} {self.entry['size'] / 1e6:7.2f} MB"]
        if "accuracy" in m:
            parts.append(f"acc {100 * m['accuracy']:.2f}%  agree {100 * m['agreement_fp32']:.2f}%")
        if "latency_ms" in m:
            parts.append(f"{m['latency_ms']:.3f} ms")
        return "  ".join(parts)


@dataclasses.dataclass
class ExportReport:
    """The result of `export_bundle`."""

    out_dir: Path
    manifest_path: Optional[Path]
    artifacts: dict
    warnings: list
    scorecard: list

    @property
    def ok(self) -> bool:
        """True when every requested artifact was written and verified."""
        return self.manifest_path is not None and all(a.ok for a in self.artifacts.values())

    @property
    def failed(self) -> list:
        return [name for name, a in self.artifacts.items() if not a.ok]


# ----------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class ExportData:
    """The clips of an export, all from the run's own splits (its recipe).

    Attributes:
        calib_reader: calibration clips (training split, balanced across classes), or None.
        calib_counts: calibration clips per class.
        select_set: the clips int8 settings are chosen on (validation split), or None.
        test_set: the scorecard's clips (testing split), or None.
        verify_set: the clips every artifact is checked on: the test clips, else the
            validation clips, else synthetic ones.
    """

    calib_reader: Optional[LogMelReader]
    calib_counts: list
    select_set: Optional[scorecard.EvalSet]
    test_set: Optional[scorecard.EvalSet]
    verify_set: scorecard.EvalSet


def _export_data(recipe: RunRecipe, calib_root, test_root, *, calib_clips: int, selection_clips: int,
                 test_clips: Optional[int], test_split: str, seed: int, log: Callable, warn: Callable) -> ExportData:
    spec, labels = recipe.spec, list(recipe.labels)
    if recipe.split.method == "speaker" and (calib_root is not None or test_root is not None):
        log(f"splits: by speaker with the checkpoint's salt {recipe.split.salt!r}")
    indexed: dict = {}

    def pairs(root, split):
        try:
            if Path(root) not in indexed:
                indexed[Path(root)] = index_dataset(root)
            task = recipe.task_split(root, split, clips=indexed[Path(root)])
        except DatasetError as error:
            raise ExportError(str(error)) from None
        return [(e, task.label_index(e)) for e in task.examples]

    calib_reader, calib_counts, select_set, test_set = None, [], None, None
    if calib_root is not None:
        chosen = _balanced(pairs(calib_root, "training"), calib_clips, seed)
        if not chosen:
            raise ExportError(f"{calib_root}: its training split has no clips for the task; pass another --calib folder")
        if len(chosen) < calib_clips:
            warn(f"only {len(chosen)} calibration clips in {calib_root}'s training split (asked for {calib_clips})")
        if len(chosen) < MIN_CALIBRATION_CLIPS:
            warn(f"int8 calibrated on {len(chosen)} clips, fewer than the recommended {MIN_CALIBRATION_CLIPS}")
        calib_reader = LogMelReader(chosen, spec, _load_pair, batch_size=32)
        calib_counts = np.bincount([p[1] for p in chosen], minlength=len(labels)).tolist()
        log(f"calibration: {len(chosen)} clips from {calib_root} (training split), per class {calib_counts}")
        valid = _balanced(pairs(calib_root, "validation"), selection_clips, seed)
        if valid:
            select_set = scorecard.EvalSet(valid, [p[1] for p in valid], spec, _load_pair)
            log(f"int8 setting selection: {len(valid)} clips from the validation split")
        else:  # no validation split: choose on the calibration clips themselves
            select_set = scorecard.EvalSet(chosen, [p[1] for p in chosen], spec, _load_pair)
    if test_root is not None:
        tests = pairs(test_root, test_split)
        tests = _balanced(tests, test_clips, seed) if test_clips else tests
        if not tests:
            raise ExportError(f"{test_root}: its {test_split} split has no clips for the task; pass another --test folder")
        test_set = scorecard.EvalSet(tests, [p[1] for p in tests], spec, _load_pair)
        log(f"test: {len(tests)} clips from {test_root} ({'every clip' if test_split == 'all' else 'testing split'})")
    if test_set is not None:
        verify_set = test_set
    elif select_set is not None:
        verify_set = select_set
        warn("no test data: artifacts verified on validation clips; the scorecard has no accuracy")
    else:
        synthetic = _synthetic_clips(spec, 32, seed)
        verify_set = scorecard.EvalSet(list(synthetic), [0] * len(synthetic), spec, _identity_clip)
        warn("no test data: artifacts verified on synthetic clips; the scorecard has no accuracy")
    try:  # read every clip now: a broken file is an input error, not an artifact failure
        for clips in (verify_set, select_set, calib_reader):
            if clips is not None:
                clips.features()
    except (AudioError, DatasetError) as error:
        raise ExportError(f"{error}; remove or replace the file") from None
    return ExportData(calib_reader, calib_counts, select_set, test_set, verify_set)


def _balanced(pairs: list, n: Optional[int], seed: int) -> list:
    """Up to ``n`` pairs, as evenly spread over classes as the data allows (all when ``n`` is None)."""
    if n is None or n >= len(pairs):
        return list(pairs)
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for pair in pairs:
        by_class.setdefault(pair[1], []).append(pair)
    queues = {k: [v[i] for i in rng.permutation(len(v))] for k, v in sorted(by_class.items())}
    chosen = []
    while len(chosen) < n:
        for k in list(queues):
            if queues[k] and len(chosen) < n:
                chosen.append(queues[k].pop())
            if not queues[k]:
                del queues[k]
    return chosen


def _synthetic_clips(spec: FeatureSpec, n: int, seed: int) -> np.ndarray:
    """Noise bursts and chirps at varied levels: inputs for comparing artifacts when no data is given."""
    rng = np.random.default_rng(seed)
    t = np.arange(spec.clip_samples) / spec.sample_rate
    clips = []
    for i in range(n):
        f0, f1 = rng.uniform(100, spec.sample_rate / 4, size=2)
        chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / 2))
        envelope = np.exp(-(((t - rng.uniform(0.2, 0.8)) / rng.uniform(0.05, 0.3)) ** 2))
        audio = rng.uniform(0.05, 0.8) * chirp * envelope + 10 ** rng.uniform(-4, -1.5) * rng.standard_normal(t.size)
        clips.append(audio.astype(np.float32))
    return np.stack(clips)


def _load_pair(pair, spec):
    return load_example(pair[0], spec)


def _identity_clip(clip, spec):
    return clip  # synthetic clips are already waveforms


# ---------------------------------------------------------------------------------- the export


def export_bundle(
    checkpoint_path,
    out_dir,
    calib_root=None,
    test_root=None,
    formats: Sequence[str] = FORMATS,
    *,
    calib_clips: int = MIN_CALIBRATION_CLIPS,
    selection_clips: int = 400,
    test_clips: Optional[int] = None,
    test_split: str = "testing",
    onnx_quant: OnnxQuantConfig = OnnxQuantConfig(),
    torch_quant: TorchQuantConfig = TorchQuantConfig(),
    pt2e_quant: Pt2eQuantConfig = Pt2eQuantConfig(),
    select_quantization: bool = True,
    try_all: bool = False,
    latency_runs: int = 50,
    name: Optional[str] = None,
    force: bool = False,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
    threads: Optional[int] = None,
) -> ExportReport:
    """Export a checkpoint into a bundle folder.

    Args:
        checkpoint_path: a file written by `kws_train.checkpoint.save_checkpoint`.
        out_dir: the bundle folder; created if needed. An existing bundle there is only
            replaced with ``force``.
        calib_root: dataset root (Speech Commands layout); int8 artifacts are calibrated on
            its training split, balanced across classes, without augmentation, and their
            settings chosen on its validation split. Required for the int8 formats.
        test_root: dataset root whose testing split is scored for the scorecard. Without it
            artifacts are verified on the calibration clips (or synthetic ones) and the
            scorecard has sizes and latencies only.
        formats: artifact names to make (see `FORMATS`). Kinds whose optional dependency is
            missing (ExecuTorch: the ``mobile`` extra) are skipped with one warning.
        calib_clips: calibration clips; fewer than `MIN_CALIBRATION_CLIPS` is allowed (tests)
            but warned about.
        selection_clips: validation clips used to choose between int8 settings.
        test_clips: cap on the test clips scored (``None``: the whole split).
        test_split: ``"testing"`` (the run's testing split of ``test_root``) or ``"all"``
            (every clip of ``test_root``: a folder of speakers the run never met).
        onnx_quant, torch_quant, pt2e_quant: the ONNX, TorchScript and ExecuTorch int8 settings tried first.
        select_quantization: when the first setting flips more than 0.5% of the fp32
            decisions on the selection clips, also try the settings `checks.candidates`
            lists (other weight granularity, reduced range, other calibration, float first
            convolution and classifier) and keep the one closest to fp32.
        try_all: try every candidate setting even when the first is good enough.
        latency_runs: timed runs per artifact (0 skips latency).
        name: model name in the manifest (default: the checkpoint's file stem, or its
            folder's name for kws-train's ``best.pt`` / ``last.pt``).
        force: replace an existing bundle in ``out_dir``.
        seed: drives data selection.
        log: called with progress lines (default: silent).
        threads: torch threads while exporting (``None``: torch's default). One thread avoids
            oversubscription on a shared machine; latency is always measured on one thread.

    Returns:
        An `ExportReport`; ``report.ok`` is False when any requested artifact failed.

    Raises:
        ExportError: unusable checkpoint, output folder, data or format names.
    """
    formats = _check_request(formats, threads, test_split)
    log = log or (lambda line: None)
    warnings_: list = []

    def warn(message: str) -> None:
        warnings_.append(message)
        log(f"warning: {message}")

    with scorecard.torch_threads(threads) if threads else contextlib.nullcontext():
        ckpt, recipe = _load(checkpoint_path)
        out_dir = Path(out_dir)
        _check_out_dir(out_dir, force)
        # after the checks of the inputs, so that a bad one is the only line printed
        formats = _drop_unavailable(formats, warn)
        data = _export_data(recipe, calib_root, test_root, calib_clips=calib_clips, selection_clips=selection_clips,
                            test_clips=test_clips, test_split=test_split, seed=seed, log=log, warn=warn)
        _prepare_out_dir(out_dir, force)
        tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
        ctx = _context(ckpt, data, tmp_dir, onnx_quant=onnx_quant, torch_quant=torch_quant, pt2e_quant=pt2e_quant,
                       select_quantization=select_quantization, try_all=try_all, log=log, warn=warn)
        try:
            results, entries, runners = _make_artifacts(ctx, formats, out_dir, data.test_set)
            rows = _score(entries, runners, data, latency_runs, log)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        for name_, result in results.items():
            if not result.ok:
                warn(f"{name_} was not written: {result.error}")
        _check_targets(rows, warn)
        model_name = name or _default_name(Path(checkpoint_path))
        manifest = _manifest(ckpt, model_name, entries, rows, data.test_set, test_split, results, warnings_,
                             Path(checkpoint_path))
        manifest_path = _write_bundle(out_dir, manifest, rows, warnings_, warn, log) if entries else None
        if manifest_path is None:
            warn("no artifact could be written: no manifest")
        return ExportReport(out_dir, manifest_path, results, warnings_, [r.to_dict() for r in rows])


def _context(ckpt: Checkpoint, data: ExportData, tmp_dir: Path, **options) -> ExportContext:
    """What the makers share: the float model, its outputs on the check and selection clips."""
    model = ckpt.model.cpu().eval()
    x_verify = data.verify_set.features()
    select_fp32 = checks.eager_logits(model, data.select_set.features()) if data.select_set is not None else None
    return ExportContext(
        model=model, spec=ckpt.spec, labels=list(ckpt.labels), verify_set=data.verify_set, x_verify=x_verify,
        fp32_logits=checks.eager_logits(model, x_verify), calib_reader=data.calib_reader, calib_counts=data.calib_counts,
        select_set=data.select_set, select_fp32=select_fp32, tmp_dir=tmp_dir, **options,
    )


def _write_bundle(out_dir: Path, manifest: dict, rows: list, warnings_: list, warn: Callable, log: Callable) -> Path:
    """The scorecard files and the manifest, read back by the runtime; returns the manifest's path."""
    model = manifest["model"]
    scorecard.write_scorecard(rows, out_dir, f"{model['name']} ({model['architecture']}, {model['variant']})",
                              [f"Warning: {w}" for w in warnings_])
    manifest_path = write_manifest(out_dir, manifest)
    load_bundle(out_dir)  # the runtime must accept what was written
    log(f"wrote {manifest_path}")
    return manifest_path


def _check_request(formats: Sequence[str], threads: Optional[int], test_split: str) -> list:
    """The requested formats in table order, after checking the options."""
    if threads is not None and threads < 1:
        raise ExportError(f"threads must be >= 1, got {threads}")
    if test_split not in ("testing", "all"):
        raise ExportError(f"test_split must be 'testing' or 'all', got {test_split!r}")
    unknown = [f for f in formats if f not in ARTIFACT_FILES]
    if unknown:
        raise ExportError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if not formats:
        raise ExportError("no formats requested")
    return [f for f in FORMATS if f in formats]


def _drop_unavailable(formats: Sequence[str], warn: Callable) -> list:
    """``formats`` without the kinds whose optional dependency is missing, said in one warning per reason."""
    skipped: dict = {}
    for kind in (k for k in ARTIFACTS if k.name in formats):
        reason = kind.missing()
        if reason:
            skipped.setdefault(reason, []).append(kind.name)
    for reason, names in skipped.items():
        warn(f"{', '.join(names)} not made: {reason}")
    left = [f for f in formats if not any(f in names for names in skipped.values())]
    if not left:
        raise ExportError(f"nothing to make: {'; '.join(skipped)}")
    return left


def _load(checkpoint_path) -> tuple:
    """The checkpoint and the run recipe its data is rebuilt with."""
    try:
        ckpt: Checkpoint = load_checkpoint(checkpoint_path)
        recipe = ckpt.recipe
    except (ValueError, RecipeError) as error:
        raise ExportError(str(error)) from None
    if recipe.spec != ckpt.spec:
        raise ExportError(f"{checkpoint_path}: its run recipe's feature spec differs from the checkpoint's; re-train or fix it")
    return ckpt, recipe


def _make_artifacts(ctx: ExportContext, formats: Sequence[str], out_dir: Path, test_set) -> tuple:
    """Run each requested maker; ``(results, manifest entries, runners)`` by artifact name."""
    results, entries, runners = {}, {}, {}
    fp32_top1 = np.argmax(ctx.fp32_logits, axis=1)
    for kind in (k for k in ARTIFACTS if k.name in formats):
        path = out_dir / kind.file
        ctx.log(f"{kind.name}: writing {kind.file}")
        try:
            made = kind.make(ctx, path)
        except Exception as exc:
            if path.exists():
                path.unlink()
            expected = (ExportError, VerificationError, NeedsCalibration)
            message = str(exc) if isinstance(exc, expected) else f"{type(exc).__name__}: {exc}"
            ctx.log(f"{kind.name}: FAILED: {message}")
            if os.environ.get("KWS_EXPORT_TRACEBACK"):
                ctx.log(traceback.format_exc())
            results[kind.name] = ArtifactResult(kind.name, kind.file, False, message)
            continue
        metrics = {"verification": made.verification}
        if test_set is not None:
            ctx.log(f"{kind.name}: scoring on {len(test_set)} test clips")
            metrics.update(scorecard.evaluate(made.runner, test_set, fp32_top1))
        entry = {"file": kind.file, **made.fields, "sha256": file_sha256(path), "size": path.stat().st_size,
                 "metrics": metrics}
        entry.setdefault("notes", {})
        entries[kind.name], runners[kind.name] = entry, made.runner
        results[kind.name] = ArtifactResult(kind.name, kind.file, True, entry=entry)
    return results, entries, runners


def _score(entries: dict, runners: dict, data: ExportData, latency_runs: int, log: Callable) -> list:
    """Latencies into the entries' metrics, and one scorecard row per artifact."""
    if latency_runs and runners:
        log(f"latency: {latency_runs} runs per artifact, batch 1, one thread, artifacts taking turns")
        timed_on = data.test_set if data.test_set is not None else data.verify_set
        for name, ms in scorecard.median_latencies_ms(runners, timed_on, runs=latency_runs).items():
            entries[name]["metrics"]["latency_ms"] = ms
    return [_row(name, entry) for name, entry in entries.items()]


def _row(name: str, entry: dict) -> scorecard.ScoreRow:
    """An artifact's scorecard row, from its manifest entry."""
    m = entry["metrics"]
    return scorecard.ScoreRow(name, entry["file"], entry["format"], entry["precision"], entry["size"], m.get("accuracy"),
                              m.get("agreement_fp32"), m.get("latency_ms"), m.get("test_clips", 0))


def _manifest(ckpt: Checkpoint, model_name: str, entries: dict, rows: list, test_set, test_split: str,
              results: dict, warnings_: list, checkpoint_path: Path) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": model_name, "architecture": ckpt.architecture, "variant": ckpt.variant},
        "labels": list(ckpt.labels),
        "feature_spec": ckpt.spec.to_dict(),
        "artifacts": entries,
        "scorecard": [r.to_dict() for r in rows],
        "export": {
            "checkpoint": checkpoint_path.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "machine": platform.machine(),
            "test_data": None if test_set is None else {"clips": len(test_set), "split": test_split},
            "latency": "median per clip, batch 1, one thread (onnxruntime intra_op_num_threads=1, torch.set_num_threads(1))",
            "failed": {k: r.error for k, r in results.items() if not r.ok},
            "warnings": warnings_,
        },
    }


def _default_name(checkpoint: Path) -> str:
    # kws-train writes <run folder>/best.pt: the folder names the model, the file does not
    if checkpoint.stem in ("best", "last") and checkpoint.parent.name:
        return checkpoint.parent.resolve().name
    return checkpoint.stem


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _check_targets(rows: list, warn: Callable) -> None:
    by_name = {r.artifact: r for r in rows}
    fp32 = by_name.get("onnx_fp32") or by_name.get("torchscript_fp32")
    for name in INT8_FORMATS:
        r = by_name.get(name)
        if r is None or fp32 is None:
            continue
        if r.accuracy is not None and fp32.accuracy is not None and fp32.accuracy - r.accuracy > 0.005:
            warn(f"{name}: accuracy {100 * r.accuracy:.2f}% is more than 0.5 points below fp32 ({100 * fp32.accuracy:.2f}%)")
        if r.agreement is not None and r.agreement < INT8_AGREEMENT_FLOOR:
            warn(f"{name} agrees with fp32 on only {100 * r.agreement:.1f}% of the {r.clips} test clips (below "
                 f"{100 * INT8_AGREEMENT_FLOOR:.0f}%); kws predict uses the fp32 model unless asked for this one")
    onnx32, onnx8 = by_name.get("onnx_fp32"), by_name.get("onnx_int8")
    if onnx32 and onnx8:
        if onnx8.size > 0.3 * onnx32.size:
            warn(f"onnx_int8 is {onnx8.size / onnx32.size:.3f}x the size of onnx_fp32 (target: at most 0.3x)")


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an output folder that would be overwritten without ``force`` (nothing is changed)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if not out_dir.exists() or force:
        return
    if (out_dir / MANIFEST_NAME).exists():
        raise ExportError(f"{out_dir}: already holds a bundle (manifest.json); pass --force to replace it")
    if any(not p.name.startswith(".") for p in out_dir.iterdir()):
        raise ExportError(f"{out_dir}: is not empty and holds no bundle; choose an empty folder or pass --force")


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    _check_out_dir(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        # Without its manifest the old bundle is no longer a bundle, so a half-rewritten
        # folder can never be loaded with stale checksums.
        manifest.unlink()
        for name in list(ARTIFACT_FILES.values()) + ["scorecard.md", "scorecard.png"]:
            if (out_dir / name).exists():
                (out_dir / name).unlink()

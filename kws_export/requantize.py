"""Make a bundle's int8 ONNX artifacts again from its own fp32 ONNX file, without the checkpoint.

For bundles exported with full-range int8 weights, which lose accuracy on x86 CPUs without
VNNI (`kws_export.quantize.OnnxQuantConfig`), and for trying other int8 settings on a bundle
whose checkpoint is gone. The bundle's verified ``model.onnx`` is quantized and is the
reference every check compares with; ``onnx_int8`` is made again (added if missing), and
``onnx_e2e_int8`` when the bundle has one. Every other artifact is kept as it is.

A bundle stores its labels and features but not its run's recipe, so the clips come from the
default composition of the task (`kws_train.recipe.RunRecipe`) in the folders given: the
composition every run of the official protocol is scored with, and the one its calibration
used unless the run changed its shares.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from kws_runtime.bundle import MANIFEST_NAME, BundleError, load_bundle
from kws_train.recipe import RecipeError, RunRecipe, task_of_labels

from . import checks, executorch_export, scorecard
from .bundle import (
    MIN_CALIBRATION_CLIPS, ExportError, ExportReport, _check_targets, _export_data, _make_artifacts, _row, _score,
    _version, _write_bundle,
)
from .executorch_export import Pt2eQuantConfig
from .makers import ExportContext
from .quantize import OnnxQuantConfig
from .torchscript import QUANTIZED_ENGINE, TorchQuantConfig

__all__ = ["requantize_bundle"]


def requantize_bundle(
    bundle_dir,
    calib_root,
    test_root=None,
    *,
    test_split: str = "testing",
    test_clips: Optional[int] = None,
    onnx_quant: OnnxQuantConfig = OnnxQuantConfig(),
    calib_clips: int = MIN_CALIBRATION_CLIPS,
    selection_clips: int = 400,
    select_quantization: bool = True,
    latency_runs: int = 50,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> ExportReport:
    """Quantize ``bundle_dir``'s ``model.onnx`` again into its int8 ONNX artifacts, in place.

    Args:
        bundle_dir: a bundle with an ``onnx_fp32`` artifact.
        calib_root: dataset root; calibration clips from its training split, the int8 setting
            chosen on its validation split (as `kws_export.export_bundle` does).
        test_root: dataset root the new artifacts are scored on. Required when the bundle's
            scorecard has accuracies: give the folder (and ``test_split``) it was scored on, so
            that every row of the scorecard counts the same clips.
        test_split: ``"testing"`` or ``"all"`` (every clip of ``test_root``).
        test_clips: the cap on test clips the bundle was scored with, if any.
        onnx_quant: the int8 setting tried first; the alternatives follow
            `kws_export.checks.candidates` unless ``select_quantization`` is False.
        calib_clips, selection_clips, latency_runs, seed: as for `kws_export.export_bundle`.
        log: called with progress lines.

    Returns:
        An `ExportReport` of the re-made artifacts; the bundle holds them and a manifest that
        lists them, with its scorecard files rewritten.

    Raises:
        ExportError: not a usable bundle, other test clips than its scorecard's, unusable
            data, or an artifact that could not be made (the bundle is then unchanged).
    """
    log = log or (lambda line: None)
    warnings_: list = []

    def warn(message: str) -> None:
        warnings_.append(message)
        log(f"warning: {message}")

    bundle_dir = Path(bundle_dir)
    bundle, manifest = _read(bundle_dir)
    formats = ["onnx_int8"] + (["onnx_e2e_int8"] if "onnx_e2e_int8" in bundle.artifacts else [])
    try:
        recipe = RunRecipe(spec=bundle.spec, task=task_of_labels(bundle.labels))
    except RecipeError as error:
        raise ExportError(f"{bundle_dir}: {error}") from None
    if test_root is None:  # refused before any clip is read
        _check_same_test_clips(bundle_dir, manifest, None, test_split)
    data = _export_data(recipe, calib_root, test_root, calib_clips=calib_clips, selection_clips=selection_clips,
                        test_clips=test_clips, test_split=test_split, seed=seed, log=log, warn=warn)
    _check_same_test_clips(bundle_dir, manifest, data.test_set, test_split)
    work = Path(tempfile.mkdtemp(prefix=".requantize-", dir=bundle_dir))
    try:
        staged = work / "artifacts"
        staged.mkdir()
        ctx = _context(bundle_dir / bundle.artifacts["onnx_fp32"].file, bundle, data, work, onnx_quant,
                       select_quantization, log, warn)
        results, entries, runners = _make_artifacts(ctx, formats, staged, data.test_set)
        failed = {name: r.error for name, r in results.items() if not r.ok}
        if failed:
            raise ExportError(f"{bundle_dir} is unchanged: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        manifest["artifacts"].update(entries)
        rows = _rescore(bundle_dir, manifest["artifacts"], runners, data, latency_runs, log, warn)
        manifest["scorecard"] = [row.to_dict() for row in rows]
        manifest["export"]["requantized"] = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "artifacts": formats,
            "from": bundle.artifacts["onnx_fp32"].file,
            "onnxruntime": _version("onnxruntime"),
            "clips": "the task's default composition of the folders given",
            "warnings": warnings_,
        }
        # No manifest while files change: an interrupted rewrite never loads with stale checksums.
        (bundle_dir / MANIFEST_NAME).unlink()
        for name in formats:
            os.replace(staged / entries[name]["file"], bundle_dir / entries[name]["file"])
        manifest_path = _write_bundle(bundle_dir, manifest, rows, manifest["export"].get("warnings", []) + warnings_,
                                      warn, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportReport(bundle_dir, manifest_path, results, warnings_, manifest["scorecard"])


def _read(bundle_dir: Path) -> tuple:
    """The bundle (checksums verified) and its manifest as JSON."""
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as error:
        raise ExportError(str(error)) from None
    if "onnx_fp32" not in bundle.artifacts:
        raise ExportError(f"{bundle_dir}: has no onnx_fp32 artifact to quantize from; export the checkpoint instead")
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    return bundle, manifest


def _check_same_test_clips(bundle_dir: Path, manifest: dict, test_set, test_split: str) -> None:
    scored = manifest.get("export", {}).get("test_data")
    if scored is None:
        return
    if test_set is None or (len(test_set), test_split) != (scored["clips"], scored["split"]):
        now = "no test clips" if test_set is None else f"{len(test_set)} clips ({test_split})"
        raise ExportError(f"{bundle_dir}: its scorecard counts {scored['clips']} test clips ({scored['split']}), "
                          f"this run {now}; pass the folder it was scored on (with --test-all for 'all', and "
                          "--test-clips if it was capped)")


def _context(fp32_onnx: Path, bundle, data, work: Path, onnx_quant: OnnxQuantConfig, select_quantization: bool,
             log: Callable, warn: Callable) -> ExportContext:
    """An export context whose reference is the fp32 ONNX file (no torch model is needed)."""
    reference = scorecard.onnx_runner(fp32_onnx)
    x_verify = data.verify_set.features()
    select_fp32 = checks.batched(reference, data.select_set.features()) if data.select_set is not None else None
    (work / "scratch").mkdir()
    ctx = ExportContext(
        model=None, spec=bundle.spec, labels=list(bundle.labels), verify_set=data.verify_set, x_verify=x_verify,
        fp32_logits=checks.batched(reference, x_verify), calib_reader=data.calib_reader, calib_counts=data.calib_counts,
        select_set=data.select_set, select_fp32=select_fp32, tmp_dir=work / "scratch", onnx_quant=onnx_quant,
        torch_quant=TorchQuantConfig(), pt2e_quant=Pt2eQuantConfig(), select_quantization=select_quantization,
        try_all=False, log=log, warn=warn,
    )
    ctx.use_fp32_onnx(fp32_onnx)
    return ctx


def _rescore(bundle_dir: Path, artifacts: dict, new_runners: dict, data, latency_runs: int, log: Callable,
             warn: Callable) -> list:
    """Scorecard rows of every artifact, in manifest order. Every artifact this machine can run is
    timed again beside the new ones: latencies from another CPU or another day would not compare."""
    others = {name: entry for name, entry in artifacts.items() if name not in new_runners}
    runners = {**_runners(bundle_dir, others, warn), **new_runners}
    timed = {row.artifact: row for row in _score({n: artifacts[n] for n in runners}, runners, data, latency_runs, log)}
    rows = [timed.get(name) or _row(name, entry) for name, entry in artifacts.items()]
    _check_targets(rows, warn)
    return rows


def _runners(bundle_dir: Path, artifacts: dict, warn: Callable) -> dict:
    """A runner for each artifact of the bundle this machine can run (ExecuTorch needs its extra)."""
    runners = {}
    for name, entry in artifacts.items():
        path, kinds = bundle_dir / entry["file"], (entry["input"]["kind"], entry["output"]["kind"])
        if entry["format"] == "onnx":
            runners[name] = scorecard.onnx_runner(path, *kinds)
        elif entry["format"] in ("torchscript", "torchscript-lite"):
            engine = QUANTIZED_ENGINE if entry["precision"] == "int8" else None
            runners[name] = scorecard.torchscript_runner(path, lite=entry["format"] == "torchscript-lite", engine=engine)
        elif entry["format"] == "executorch" and executorch_export.missing_reason() is None:
            runners[name] = executorch_export.pte_runner(path)
        else:
            warn(f"{name}: not timed again ({executorch_export.missing_reason() or entry['format']}); "
                 "its latency is the export's")
    return runners

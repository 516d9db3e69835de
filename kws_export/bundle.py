"""Export a checkpoint into a model bundle: every artifact written, verified, scored and listed.

`export_bundle` is the library entry point behind ``kws-export``. Each artifact is written,
loaded back from its file and compared with the eager model (or, for int8, checked for
agreement with it) before it is listed in ``manifest.json``; an artifact that fails is
reported, its file removed, and the others are still written. The manifest itself is written
with `kws_runtime.bundle.write_manifest` and read back with `kws_runtime.bundle.load_bundle`.
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
from kws_runtime.bundle import file_sha256, load_bundle, write_manifest
from kws_runtime.spec import FeatureSpec
from kws_train.checkpoint import load_checkpoint
from kws_train.dataset import LABELS_12, LABELS_35, DatasetError, index_dataset, load_example, task_split
from kws_train.trainer import split_options

from . import e2e, onnx_export, quantize, scorecard, torchscript
from .quantize import LogMelReader, OnnxQuantConfig
from .torchscript import QUANTIZED_ENGINE, TorchQuantConfig

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
ARTIFACT_FILES = {
    "torchscript_fp32": "model.pt",
    "torchscript_lite": "model.ptl",
    "torchscript_int8": "model.int8.pt",
    "torchscript_int8_lite": "model.int8.ptl",
    "onnx_fp32": "model.onnx",
    "onnx_int8": "model.int8.onnx",
    "onnx_e2e": "model.e2e.onnx",
}
FORMATS = tuple(ARTIFACT_FILES)
INT8_FORMATS = ("torchscript_int8", "torchscript_int8_lite", "onnx_int8")
MIN_CALIBRATION_CLIPS = 500

# Verification thresholds. Float artifacts must match the eager model. An int8 model is
# refused when it disagrees with fp32 on half the clips: that is a broken quantization (an
# overflowing range, a wrong engine), not rounding. Smaller losses are the scorecard's business
# (a barely trained model, with near-equal logits, flips many decisions on rounding alone).
FLOAT_ATOL = 1e-4
E2E_ATOL = 1e-4
INT8_MIN_AGREEMENT = 0.5
# An int8 candidate that flips at most this fraction of the fp32 decisions is kept without
# trying the others (0.5 points: the accuracy budget for int8).
SELECTION_TOLERANCE = 0.005


class ExportError(ValueError):
    """The export cannot start (bad checkpoint, output folder, data or option)."""


class VerificationError(RuntimeError):
    """An artifact was written but does not behave like the model it came from."""


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


def _task_name(labels: Sequence[str]) -> str:
    if set(labels) == set(LABELS_12):
        return "12"
    if set(labels) == set(LABELS_35):
        return "35"
    raise ExportError(
        f"the checkpoint's labels {list(labels)} are neither the 12- nor the 35-class task: "
        "calibration and test data cannot be labelled"
    )


def _examples(root, labels: Sequence[str], split: str, spec: FeatureSpec, options: dict, indexed: dict) -> list:
    """(example, class index) pairs of one split of ``root``, labelled in the checkpoint's order.

    ``options`` are the training run's own (`kws_train.trainer.split_options`): "training
    split" here is the run's training split, so int8 calibration never sees a test clip and the
    scorecard's test clips are the ones the run reported on. ``indexed`` maps each root to its
    `index_dataset` clips, filled on first use: a full dataset takes about a second to walk.
    """
    try:
        if Path(root) not in indexed:
            indexed[Path(root)] = index_dataset(root)
        task = task_split(root, _task_name(labels), split, spec=spec, clips=indexed[Path(root)], **options)
    except DatasetError as error:
        raise ExportError(str(error)) from None
    index = {label: i for i, label in enumerate(labels)}
    return [(e, index[e.label]) for e in task.examples]


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


# ------------------------------------------------------------------------------------- helpers


def _eager_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _compare_float(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> dict:
    diff = float(np.max(np.abs(got - want)))
    same = float(np.mean(np.argmax(got, 1) == np.argmax(want, 1)))
    if not diff <= atol:
        raise VerificationError(f"{name}: outputs differ from the eager model by up to {diff:.3g} (allowed {atol:g})")
    if same < 1.0:
        raise VerificationError(f"{name}: top-1 differs from the eager model on {100 * (1 - same):.2f}% of the clips")
    return {"max_abs_diff": diff, "top1_identical": True}


def _check_int8(name: str, got: np.ndarray, fp32_logits: np.ndarray) -> dict:
    agree = scorecard.agreement(got, fp32_logits)
    if agree < INT8_MIN_AGREEMENT:
        raise VerificationError(
            f"{name}: agrees with the fp32 model on only {100 * agree:.1f}% of the clips (at least {100 * INT8_MIN_AGREEMENT:.0f}% expected)"
        )
    return {"agreement_fp32": agree}


def _batched(fn: Callable, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _fidelity(outputs: np.ndarray, fp32_logits: np.ndarray) -> dict:
    """How closely int8 outputs follow fp32 ones: top-1 agreement and mean KL(fp32 || int8) in nats.

    Agreement is what the scorecard reports; the KL divergence also sees the changes that do
    not flip a decision yet, so it separates settings that a few hundred clips cannot.
    """
    p, q = _softmax(fp32_logits), _softmax(outputs)
    kl = np.sum(p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12))), axis=1)
    return {"agreement": scorecard.agreement(outputs, fp32_logits), "kl": float(np.mean(kl))}


def _select(name: str, candidates: Sequence, build: Callable, outputs: Callable, reference: np.ndarray, log: Callable, try_all: bool) -> tuple:
    """Build candidates in order and keep the one whose outputs follow fp32 best.

    ``build(config) -> artifact``, ``outputs(artifact) -> logits`` on the selection clips,
    compared with ``reference`` (the fp32 logits). Stops at the first candidate that flips at
    most `SELECTION_TOLERANCE` of the decisions, unless ``try_all``; of those tried, keeps
    the one with the lowest KL divergence from fp32 (on a few hundred clips, one flipped
    decision more or less is chance; the divergence over all clips and classes is not).

    Returns:
        (best artifact, best config, [{"config": ..., "selection_agreement": ..., "selection_kl": ...}, ...]).
    """
    best = None
    tried = []
    errors = []
    for config in candidates:
        try:
            artifact = build(config)
            score = _fidelity(outputs(artifact), reference)
        except Exception as exc:  # one failing setting should not stop the others
            errors.append(f"{config.name}: {exc}")
            tried.append({"config": config.to_dict(), "error": str(exc)})
            log(f"  {name}: {config.name} failed: {exc}")
            continue
        tried.append({"config": config.to_dict(), "selection_agreement": score["agreement"], "selection_kl": score["kl"]})
        log(f"  {name}: {config.name}: on the selection clips agreement with fp32 {100 * score['agreement']:.2f}%, KL {score['kl']:.2e}")
        key = (-score["kl"], score["agreement"])
        if best is None or key > best[2]:
            best = (artifact, config, key)
        if score["agreement"] >= 1.0 - SELECTION_TOLERANCE and not try_all:
            break
    if best is None:
        raise RuntimeError("; ".join(errors))
    return best[0], best[1], tried


def _candidates(first) -> list:
    """The requested setting, then the alternatives tried when it loses too much accuracy:
    the other weight granularity, reduced range, another activation calibration, and last
    the requested setting with the first convolution and the classifier kept in float."""
    out = [first]

    def add(config):
        if config.to_dict() not in [c.to_dict() for c in out]:
            out.append(config)

    if isinstance(first, OnnxQuantConfig):
        add(dataclasses.replace(first, per_channel=not first.per_channel))
        add(dataclasses.replace(first, reduce_range=not first.reduce_range))
        # Not entropy: onnxruntime's entropy calibrator searches symmetric thresholds on a
        # histogram centred at zero, which halves the resolution of ReLU outputs; on these
        # models it flipped 5-10% of the decisions (it stays available on request).
        add(dataclasses.replace(first, method="minmax" if first.method != "minmax" else "percentile"))
    else:
        add(dataclasses.replace(first, per_channel=not first.per_channel))
        add(dataclasses.replace(first, reduce_range=not first.reduce_range))
        add(dataclasses.replace(first, observer="minmax" if first.observer == "histogram" else "histogram"))
    add(dataclasses.replace(first, float_ends=True))
    return out


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
    onnx_quant: OnnxQuantConfig = OnnxQuantConfig(),
    torch_quant: TorchQuantConfig = TorchQuantConfig(),
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
        formats: artifact names to make (see `FORMATS`).
        calib_clips: calibration clips; fewer than `MIN_CALIBRATION_CLIPS` is allowed (tests)
            but warned about.
        selection_clips: validation clips used to choose between int8 settings.
        test_clips: cap on the test clips scored (``None``: the whole split).
        onnx_quant: the ONNX int8 setting tried first.
        torch_quant: the TorchScript int8 setting tried first.
        select_quantization: when the first setting flips more than 0.5% of the fp32
            decisions on the selection clips, also try the settings `_candidates` lists
            (other weight granularity, reduced range, other calibration, float first
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
    if threads is not None and threads < 1:
        raise ExportError(f"threads must be >= 1, got {threads}")
    with scorecard.torch_threads(threads) if threads else contextlib.nullcontext():
        log = log or (lambda line: None)
        unknown = [f for f in formats if f not in ARTIFACT_FILES]
        if unknown:
            raise ExportError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        if not formats:
            raise ExportError("no formats requested")
        formats = [f for f in FORMATS if f in formats]
        try:
            ckpt = load_checkpoint(checkpoint_path)
        except ValueError as error:
            raise ExportError(str(error)) from None
        out_dir = Path(out_dir)
        _check_out_dir(out_dir, force)
        spec, labels, model = ckpt.spec, list(ckpt.labels), ckpt.model.cpu().eval()
        input_shape = ["batch", 1, spec.n_mels, spec.n_frames]
        warnings_: list = []

        def warn(message: str) -> None:
            warnings_.append(message)
            log(f"warning: {message}")

        # ---- data: calibration (training split), selection (validation split), test (testing split)
        settings = split_options(ckpt.config)
        if settings["salt"] is not None and (calib_root is not None or test_root is not None):
            log(f"splits: by speaker with the checkpoint's salt {settings['salt']!r}")
        calib_reader = select_set = None
        calib_counts: list = []
        indexed: dict = {}
        if calib_root is not None:
            train = _examples(calib_root, labels, "training", spec, settings, indexed)
            chosen = _balanced(train, calib_clips, seed)
            if not chosen:
                raise ExportError(f"{calib_root}: its training split has no clips for the task; pass another --calib folder")
            if len(chosen) < calib_clips:
                warn(f"only {len(chosen)} calibration clips in {calib_root}'s training split (asked for {calib_clips})")
            if len(chosen) < MIN_CALIBRATION_CLIPS:
                warn(f"int8 calibrated on {len(chosen)} clips, fewer than the recommended {MIN_CALIBRATION_CLIPS}")
            calib_reader = LogMelReader([p for p in chosen], spec, _load_pair, onnx_export.INPUT_NAME, batch_size=32)
            calib_counts = np.bincount([p[1] for p in chosen], minlength=len(labels)).tolist()
            log(f"calibration: {len(chosen)} clips from {calib_root} (training split), per class {calib_counts}")
            valid = _balanced(_examples(calib_root, labels, "validation", spec, settings, indexed), selection_clips, seed)
            if valid:
                select_set = scorecard.EvalSet(valid, [p[1] for p in valid], spec, _load_pair)
                log(f"int8 setting selection: {len(valid)} clips from the validation split")
        test_set = None
        if test_root is not None:
            tests = _examples(test_root, labels, "testing", spec, settings, indexed)
            tests = _balanced(tests, test_clips, seed) if test_clips else tests
            if not tests:
                raise ExportError(f"{test_root}: its testing split has no clips for the task; pass another --test folder")
            test_set = scorecard.EvalSet(tests, [p[1] for p in tests], spec, _load_pair)
            log(f"test: {len(tests)} clips from {test_root} (testing split)")
        if test_set is not None:
            verify_set = test_set
        elif select_set is not None:
            verify_set = select_set
            warn("no test data: artifacts verified on validation clips; the scorecard has no accuracy")
        else:
            synthetic = _synthetic_clips(spec, 32, seed)
            verify_set = scorecard.EvalSet(list(synthetic), [0] * len(synthetic), spec, _identity_clip)
            warn("no test data: artifacts verified on synthetic clips; the scorecard has no accuracy")
        if select_set is None and calib_reader is not None:
            # no validation split: choose on the calibration clips themselves
            select_set = scorecard.EvalSet(calib_reader.clips, [p[1] for p in calib_reader.clips], spec, _load_pair)

        try:  # read every clip now: a broken file is an input error, not an artifact failure
            x_verify = verify_set.features()
            if select_set is not None:
                select_set.features()
            if calib_reader is not None:
                calib_reader.features()
        except (AudioError, DatasetError) as error:
            raise ExportError(f"{error}; remove or replace the file") from None
        _prepare_out_dir(out_dir, force)
        fp32_logits = _eager_logits(model, x_verify)
        fp32_top1 = np.argmax(fp32_logits, axis=1)
        select_fp32 = _eager_logits(model, select_set.features()) if select_set is not None else None

        results: dict = {}
        entries: dict = {}
        state: dict = {}  # intermediate objects shared between artifacts (traced module, quantized model)

        def io(kind_in, shape_in, kind_out, name_in=onnx_export.INPUT_NAME, name_out=onnx_export.OUTPUT_NAME):
            return {
                "input": {"name": name_in, "kind": kind_in, "shape": shape_in},
                "output": {"name": name_out, "kind": kind_out, "shape": ["batch", len(labels)]},
            }

        tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))

        # ---- the artifacts, each a function that writes its file and returns (entry fields, runner)
        def torchscript_fp32(path):
            example = torch.from_numpy(x_verify[:2])
            traced = torchscript.trace(model, example)
            torchscript.save_torchscript(traced, path)
            state["traced"] = traced
            runner = scorecard.torchscript_runner(path)
            check = _compare_float("torchscript_fp32", _batched(runner, x_verify), fp32_logits, FLOAT_ATOL)
            return {"format": "torchscript", "precision": "fp32", **io("log_mel", input_shape, "logits"), "verification": check}, runner

        def torchscript_lite(path):
            traced = state.get("traced") or torchscript.trace(model, torch.from_numpy(x_verify[:2]))
            notes = torchscript.save_lite(traced, path)
            if not notes["optimized_for_mobile"]:
                warn(f"{path.name}: {notes['reason']}")
            runner = scorecard.torchscript_runner(path, lite=True)
            check = _compare_float("torchscript_lite", _batched(runner, x_verify), fp32_logits, FLOAT_ATOL)
            return {"format": "torchscript-lite", "precision": "fp32", **io("log_mel", input_shape, "logits"), "notes": notes, "verification": check}, runner

        def quantized_torch():
            if "quantized" not in state:
                if calib_reader is None:
                    raise ExportError("int8 needs calibration data: pass calib_root (kws-export --calib DATA)")

                def build(config):
                    batches = (torch.from_numpy(b[onnx_export.INPUT_NAME]) for b in _dicts(calib_reader))
                    return torchscript.quantize_qnnpack(model, batches, config)

                def outputs(q):
                    with torchscript.quantized_engine(QUANTIZED_ENGINE), torch.no_grad():
                        return _batched(lambda x: q(torch.from_numpy(x)).numpy(), select_set.features())

                candidates = _candidates(torch_quant) if select_quantization else [torch_quant]
                q, config, tried = _select("torchscript_int8", candidates, build, outputs, select_fp32, log, try_all)
                with torchscript.quantized_engine(QUANTIZED_ENGINE):
                    traced = torchscript.trace(q, torch.from_numpy(x_verify[:2]))
                    with torch.no_grad():
                        eager = _batched(lambda x: q(torch.from_numpy(x)).numpy(), x_verify)
                state["quantized"] = (traced, eager, config, tried)
            return state["quantized"]

        def int8_notes(config, tried):
            return {
                "quantization": config.to_dict(),
                "selected": config.name,
                "candidates": tried,
                "calibration_clips": len(calib_reader.clips),
                "calibration_per_class": dict(zip(labels, calib_counts)),
                "calibration_split": "training",
            }

        def torchscript_int8(path):
            traced, eager, config, tried = quantized_torch()
            torchscript.save_torchscript(traced, path)
            runner = scorecard.torchscript_runner(path, engine=QUANTIZED_ENGINE)
            got = _batched(runner, x_verify)
            check = _compare_float("torchscript_int8 (against the eager quantized model)", got, eager, FLOAT_ATOL)
            check.update(_check_int8("torchscript_int8", got, fp32_logits))
            notes = {"engine": QUANTIZED_ENGINE, **int8_notes(config, tried), "load": "set torch.backends.quantized.engine = 'qnnpack' before loading"}
            return {"format": "torchscript", "precision": "int8", **io("log_mel", input_shape, "logits"), "notes": notes, "verification": check}, runner

        def torchscript_int8_lite(path):
            traced, eager, config, tried = quantized_torch()
            lite_notes = torchscript.save_lite(traced, path)
            runner = scorecard.torchscript_runner(path, lite=True, engine=QUANTIZED_ENGINE)
            got = _batched(runner, x_verify)
            check = _compare_float("torchscript_int8_lite (against the eager quantized model)", got, eager, FLOAT_ATOL)
            check.update(_check_int8("torchscript_int8_lite", got, fp32_logits))
            notes = {"engine": QUANTIZED_ENGINE, **int8_notes(config, tried), **lite_notes}
            return {"format": "torchscript-lite", "precision": "int8", **io("log_mel", input_shape, "logits"), "notes": notes, "verification": check}, runner

        def fp32_onnx_file():
            path = out_dir / ARTIFACT_FILES["onnx_fp32"]
            if "onnx_fp32" in entries:
                return path
            if "onnx_fp32_tmp" not in state:
                state["onnx_fp32_tmp"] = onnx_export.export_onnx(model, tmp_dir / "model.onnx", [1, 1, spec.n_mels, spec.n_frames])
            return state["onnx_fp32_tmp"]

        def onnx_fp32(path):
            onnx_export.export_onnx(model, path, [1, 1, spec.n_mels, spec.n_frames])
            onnx_export.check_onnx(path)
            runner = scorecard.onnx_runner(path)
            check = _compare_float("onnx_fp32", _batched(runner, x_verify), fp32_logits, FLOAT_ATOL)
            notes = {"opset": onnx_export.OPSET, "exporter": "torch.onnx (TorchScript-based)"}
            return {"format": "onnx", "precision": "fp32", **io("log_mel", input_shape, "logits"), "notes": notes, "verification": check}, runner

        def onnx_int8(path):
            if calib_reader is None:
                raise ExportError("int8 needs calibration data: pass calib_root (kws-export --calib DATA)")
            source = fp32_onnx_file()

            def build(config):
                state["candidates"] = state.get("candidates", 0) + 1
                return quantize.quantize_onnx(source, tmp_dir / f"int8-{state['candidates']}.onnx", calib_reader, config)

            def outputs(candidate):
                return _batched(scorecard.onnx_runner(candidate), select_set.features())

            candidates = _candidates(onnx_quant) if select_quantization else [onnx_quant]
            chosen, config, tried = _select("onnx_int8", candidates, build, outputs, select_fp32, log, try_all)
            os.replace(chosen, path)
            onnx_export.check_onnx(path)
            runner = scorecard.onnx_runner(path)
            check = _check_int8("onnx_int8", _batched(runner, x_verify), fp32_logits)
            notes = {**int8_notes(config, tried), "tool": "onnxruntime.quantization quant_pre_process + quantize_static"}
            return {"format": "onnx", "precision": "int8", **io("log_mel", input_shape, "logits"), "notes": notes, "verification": check}, runner

        def onnx_e2e(path):
            e2e.export_e2e(model, spec, path)
            onnx_export.check_onnx(path)
            runner = scorecard.onnx_runner(path, input_kind="waveform", output_kind="probabilities")
            got = np.concatenate([runner(w) for w in verify_set.waveform_batches()])
            check = _compare_float("onnx_e2e (against kws_runtime.log_mel + the eager model)", got, _softmax(fp32_logits), E2E_ATOL)
            notes = {
                "opset": onnx_export.OPSET,
                "exporter": "torch.onnx (torch.export-based)",
                "features": "log-mel inside the graph (kws_train.frontend.LogMel: kws_runtime window and mel filterbank)",
                "input": f"float32 waveform in [-1, 1] at {spec.sample_rate} Hz, padded or cut to {spec.clip_samples} samples",
            }
            entry = {
                "format": "onnx",
                "precision": "fp32",
                **io("waveform", ["batch", spec.clip_samples], "probabilities", e2e.E2E_INPUT_NAME, e2e.E2E_OUTPUT_NAME),
                "notes": notes,
                "verification": check,
            }
            return entry, runner

        makers = {
            "torchscript_fp32": torchscript_fp32,
            "torchscript_lite": torchscript_lite,
            "torchscript_int8": torchscript_int8,
            "torchscript_int8_lite": torchscript_int8_lite,
            "onnx_fp32": onnx_fp32,
            "onnx_int8": onnx_int8,
            "onnx_e2e": onnx_e2e,
        }
        rows = []
        runners: dict = {}
        try:
            for fmt in formats:
                file = ARTIFACT_FILES[fmt]
                path = out_dir / file
                log(f"{fmt}: writing {file}")
                try:
                    fields, runner = makers[fmt](path)
                except Exception as exc:
                    if path.exists():
                        path.unlink()
                    message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ExportError, VerificationError)) else str(exc)
                    log(f"{fmt}: FAILED: {message}")
                    if os.environ.get("KWS_EXPORT_TRACEBACK"):
                        log(traceback.format_exc())
                    results[fmt] = ArtifactResult(fmt, file, False, message)
                    continue
                verification = fields.pop("verification")
                metrics = {"verification": verification}
                if test_set is not None:
                    log(f"{fmt}: scoring on {len(test_set)} test clips")
                    metrics.update(scorecard.evaluate(runner, test_set, fp32_top1))
                entry = {"file": file, **fields, "sha256": file_sha256(path), "size": path.stat().st_size, "metrics": metrics}
                entry.setdefault("notes", {})
                entries[fmt] = entry
                runners[fmt] = runner
                results[fmt] = ArtifactResult(fmt, file, True, entry=entry)
            if latency_runs and runners:
                log(f"latency: {latency_runs} runs per artifact, batch 1, one thread, artifacts taking turns")
                for fmt, ms in scorecard.median_latencies_ms(runners, test_set if test_set is not None else verify_set, runs=latency_runs).items():
                    entries[fmt]["metrics"]["latency_ms"] = ms
            for fmt, entry in entries.items():
                metrics = entry["metrics"]
                rows.append(
                    scorecard.ScoreRow(
                        fmt,
                        entry["file"],
                        entry["format"],
                        entry["precision"],
                        entry["size"],
                        metrics.get("accuracy"),
                        metrics.get("agreement_fp32"),
                        metrics.get("latency_ms"),
                        metrics.get("test_clips", 0),
                    )
                )
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

        for name_, result in results.items():
            if not result.ok:
                warn(f"{name_} was not written: {result.error}")
        _check_targets(rows, warn)

        model_name = name or _default_name(Path(checkpoint_path))
        manifest = {
            "format": "kws-bundle",
            "format_version": 1,
            "model": {"name": model_name, "architecture": ckpt.architecture, "variant": ckpt.variant},
            "labels": labels,
            "feature_spec": spec.to_dict(),
            "artifacts": entries,
            "scorecard": [r.to_dict() for r in rows],
            "export": {
                "checkpoint": Path(checkpoint_path).name,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "onnxruntime": _version("onnxruntime"),
                "machine": platform.machine(),
                "test_data": None if test_set is None else {"clips": len(test_set), "split": "testing"},
                "latency": "median per clip, batch 1, one thread (onnxruntime intra_op_num_threads=1, torch.set_num_threads(1))",
                "failed": {k: r.error for k, r in results.items() if not r.ok},
                "warnings": warnings_,
            },
        }
        manifest_path = None
        if entries:
            scorecard.write_scorecard(rows, out_dir, f"{model_name} ({ckpt.architecture}, {ckpt.variant})", [f"Warning: {w}" for w in warnings_])
            write_manifest(out_dir, manifest)
            manifest_path = out_dir / "manifest.json"
            load_bundle(out_dir)  # the runtime must accept what was written
            log(f"wrote {manifest_path}")
        else:
            warn("no artifact could be written: no manifest")
        return ExportReport(out_dir, manifest_path, results, warnings_, [r.to_dict() for r in rows])


def _dicts(reader):
    reader.rewind()
    yield from iter(reader.get_next, None)
    reader.rewind()


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
    if (out_dir / "manifest.json").exists():
        raise ExportError(f"{out_dir}: already holds a bundle (manifest.json); pass --force to replace it")
    if any(not p.name.startswith(".") for p in out_dir.iterdir()):
        raise ExportError(f"{out_dir}: is not empty and holds no bundle; choose an empty folder or pass --force")


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    _check_out_dir(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        # Without its manifest the old bundle is no longer a bundle, so a half-rewritten
        # folder can never be loaded with stale checksums.
        manifest.unlink()
        for name in list(ARTIFACT_FILES.values()) + ["scorecard.md", "scorecard.png"]:
            if (out_dir / name).exists():
                (out_dir / name).unlink()

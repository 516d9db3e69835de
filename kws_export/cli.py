"""``kws-export``: a checkpoint in, a verified model bundle out.

    kws-export runs/resnet/best.pt --out bundles/resnet --data ../speech_commands
    kws-export best.pt --out bundle --calib DATA --test DATA --formats onnx_fp32 onnx_int8
    kws-export requantize BUNDLE --calib DATA --test DATA --test-all   # its int8 ONNX files made again

Exit status (`kws_runtime.exit_codes`): 0 when every requested artifact was written and
verified, 1 when some failed (the others are in the bundle), 2 when nothing could be exported
(bad arguments, checkpoint, data or output folder), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Optional, Sequence

from kws_runtime import exit_codes

from .bundle import FORMATS, MIN_CALIBRATION_CLIPS, ExportError, ExportReport, export_bundle
from .executorch_export import Pt2eQuantConfig
from .makers import ARTIFACTS
from .quantize import ACTIVATION_TYPES, CALIBRATION_METHODS, OnnxQuantConfig
from .requantize import requantize_bundle
from .torchscript import TorchQuantConfig

# --formats groups, from the artifact table: every kind, each family, fp32 and int8.
GROUPS = {
    "all": FORMATS,
    **{family: tuple(k.name for k in ARTIFACTS if k.family == family) for family in dict.fromkeys(k.family for k in ARTIFACTS)},
    "fp32": tuple(k.name for k in ARTIFACTS if not k.int8),
    "int8": tuple(k.name for k in ARTIFACTS if k.int8),
}


def _formats(values: Sequence[str]) -> list:
    chosen = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name in GROUPS:
                chosen += GROUPS[name]
            elif name in FORMATS:
                chosen.append(name)
            else:
                raise ExportError(f"unknown format {name!r}; choose from {', '.join(FORMATS)} or {', '.join(GROUPS)}")
    return list(dict.fromkeys(chosen))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kws-export",
        description="Export a training checkpoint into a model bundle (TorchScript, ONNX fp32/int8, "
        "end-to-end ONNX, ExecuTorch with the mobile extra), verify every artifact and score them on test clips. "
        "'kws-export requantize BUNDLE' makes a bundle's int8 ONNX files again from its fp32 one (see its -h).",
    )
    p.add_argument("checkpoint", help="checkpoint file written by kws-train (e.g. runs/NAME/best.pt)")
    p.add_argument("--out", "-o", required=True, help="bundle folder to write")
    p.add_argument("--data", help="dataset root used for both --calib and --test")
    p.add_argument("--calib", help="dataset root whose training split calibrates the int8 models")
    p.add_argument("--test", help="dataset root whose testing split is scored")
    p.add_argument("--test-all", action="store_true",
                   help="score every clip of --test, whatever its split (a folder of speakers the run never met)")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["all"],
        metavar="FORMAT",
        help=f"artifacts to make: {', '.join(FORMATS)}, or a group ({', '.join(GROUPS)}); default all",
    )
    q = _add_int8_options(p)
    q.add_argument("--reduce-range", action="store_true", help="start from 7-bit TorchScript activations")
    q.add_argument("--try-all", action="store_true", help="try every int8 setting and keep the best")
    _add_scorecard_options(p)
    p.add_argument("--threads", type=int, help="torch threads while exporting (default: torch's choice)")
    p.add_argument("--name", help="model name in the manifest (default: the checkpoint's run folder or file name)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    return p


def build_requantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kws-export requantize",
        description="Make a bundle's int8 ONNX artifacts (onnx_int8, and onnx_e2e_int8 if it has one) again from its "
        "fp32 ONNX file, in place, without the checkpoint: for bundles exported with full-range int8 weights, which "
        "lose accuracy on x86 CPUs without VNNI. Clips come from the task's default composition of the folders given.",
    )
    p.add_argument("bundle", help="a bundle folder with an onnx_fp32 artifact")
    p.add_argument("--calib", required=True, help="dataset root whose training split calibrates the int8 models")
    p.add_argument("--test", help="dataset root the bundle's scorecard was scored on (required if it has accuracies)")
    p.add_argument("--test-all", action="store_true", help="score every clip of --test, as kws-export --test-all")
    _add_int8_options(p)
    _add_scorecard_options(p)
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    return p


def _add_int8_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    # defaults are export_bundle's and OnnxQuantConfig's own, never restated
    default = {name: param.default for name, param in inspect.signature(export_bundle).parameters.items()}
    first = OnnxQuantConfig()
    q = p.add_argument_group("int8")
    q.add_argument("--calib-clips", type=int, default=MIN_CALIBRATION_CLIPS, help=f"calibration clips, balanced across classes (default {MIN_CALIBRATION_CLIPS})")
    q.add_argument("--allow-few-calib", action="store_true", help=f"accept --calib-clips below {MIN_CALIBRATION_CLIPS}")
    q.add_argument("--calib-method", choices=sorted(CALIBRATION_METHODS), default=first.method,
                   help=f"ONNX activation calibration (default {first.method})")
    q.add_argument(
        "--activations",
        choices=sorted(ACTIVATION_TYPES),
        default=first.activations,
        help=f"ONNX activation type (default {first.activations}: onnxruntime's fast path on x86; int8 for ARM targets)",
    )
    q.add_argument("--per-tensor", action="store_true", help="start from per-tensor weight scales instead of per-channel")
    q.add_argument("--full-range-weights", action="store_true",
                   help="8-bit ONNX weights instead of 7-bit: only for ARM or VNNI CPUs; on other x86 CPUs "
                   "onnxruntime's int8 kernels saturate with them and lose accuracy")
    q.add_argument("--float-ends", action="store_true", help="start with the first convolution and the classifier kept in float")
    q.add_argument("--no-select", action="store_true", help="keep the first int8 setting even if it loses accuracy")
    q.add_argument("--selection-clips", type=int, default=default["selection_clips"],
                   help=f"validation clips that choose the int8 setting (default {default['selection_clips']})")
    return q


def _add_scorecard_options(p: argparse.ArgumentParser) -> None:
    default = inspect.signature(export_bundle).parameters["latency_runs"].default
    s = p.add_argument_group("scorecard")
    s.add_argument("--test-clips", type=int, help="score at most this many test clips (default all)")
    s.add_argument("--latency-runs", type=int, default=default,
                   help=f"timed runs per artifact, 0 to skip (default {default})")


def _check_counts(args) -> None:
    if args.calib_clips < 1 or args.selection_clips < 1 or (args.test_clips is not None and args.test_clips < 1):
        raise ExportError("--calib-clips, --selection-clips and --test-clips must be positive")
    if args.latency_runs < 0:
        raise ExportError("--latency-runs must be 0 or more")
    if args.calib_clips < MIN_CALIBRATION_CLIPS and not args.allow_few_calib:
        raise ExportError(
            f"--calib-clips {args.calib_clips} is below the {MIN_CALIBRATION_CLIPS} clips int8 calibration needs "
            "to be representative; raise it or pass --allow-few-calib"
        )


def _onnx_quant(args) -> OnnxQuantConfig:
    return OnnxQuantConfig(args.calib_method, not args.per_tensor, not args.full_range_weights, args.activations,
                           args.float_ends)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    requantize = bool(argv) and argv[0] == "requantize"
    args = (build_requantize_parser() if requantize else build_parser()).parse_args(argv[1:] if requantize else argv)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        _check_counts(args)
        report = _requantize(args, log) if requantize else _export(args, log)
    except (ExportError, OSError) as error:
        print(f"kws-export: error: {error}", file=sys.stderr)
        return exit_codes.CANNOT_RUN
    except KeyboardInterrupt:
        print("kws-export: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    return _summary(report, args.quiet)


def _requantize(args, log) -> ExportReport:
    return requantize_bundle(
        args.bundle, args.calib, args.test, test_split="all" if args.test_all else "testing", test_clips=args.test_clips,
        onnx_quant=_onnx_quant(args), calib_clips=args.calib_clips, selection_clips=args.selection_clips,
        select_quantization=not args.no_select, latency_runs=args.latency_runs, log=log,
    )


def _export(args, log) -> ExportReport:
    return export_bundle(
        args.checkpoint,
        args.out,
        calib_root=args.calib or args.data,
        test_root=args.test or args.data,
        formats=_formats(args.formats),
        calib_clips=args.calib_clips,
        selection_clips=args.selection_clips,
        test_clips=args.test_clips,
        test_split="all" if args.test_all else "testing",
        onnx_quant=_onnx_quant(args),
        torch_quant=TorchQuantConfig(not args.per_tensor, args.reduce_range, float_ends=args.float_ends),
        pt2e_quant=Pt2eQuantConfig(not args.per_tensor),
        select_quantization=not args.no_select,
        try_all=args.try_all,
        latency_runs=args.latency_runs,
        name=args.name,
        force=args.force,
        log=log,
        threads=args.threads,
    )


def _summary(report: ExportReport, quiet: bool) -> int:
    """Print one line per artifact (and, when quiet, the warnings); the exit status."""
    for result in report.artifacts.values():
        print(result.describe())
    if quiet:  # otherwise they were printed as they came
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if report.manifest_path is None:
        print(f"kws-export: no artifact could be written to {report.out_dir}", file=sys.stderr)
        return exit_codes.CANNOT_RUN
    if not report.ok:
        print(f"kws-export: wrote {report.out_dir} without {', '.join(report.failed)} (see above)", file=sys.stderr)
        return exit_codes.SOME_FAILED
    print(f"wrote {report.manifest_path} ({len(report.artifacts)} artifacts)")
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())

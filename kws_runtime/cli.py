"""``kws``: classify audio files with a model bundle, find keywords in streams, describe a bundle.

    kws predict BUNDLE PATH... [--top-k K] [--json] [--artifact NAME] [--threads N]
    kws stream BUNDLE FILE... [--json] [--threshold T] [--hop-ms MS]     (kws_runtime.stream_cli)
    kws listen BUNDLE [--device ID] [--list-devices]
    kws serve BUNDLE [--port P]                                          (kws_runtime.serve)
    kws info BUNDLE

Exit status (`kws_runtime.exit_codes`, shared by all the commands): 0 when every file was
classified, 1 when some file could not be, 2 for a bad bundle or bad arguments, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .audio import AUDIO_EXTENSIONS, AudioError, is_audio_file, load_audio
from .bundle import Bundle, BundleError, load_bundle, untrusted
from .files import os_error_reason

from .exit_codes import CANNOT_RUN as EXIT_BAD_USAGE
from .exit_codes import INTERRUPTED as EXIT_INTERRUPTED
from .exit_codes import OK as EXIT_OK
from .exit_codes import SOME_FAILED as EXIT_SOME_FAILED

# Files decoded and classified together: one session run per group.
_GROUP = 32


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_USAGE
    try:
        return args.run(args)
    except (BundleError, ValueError) as exc:
        # Bad bundle, artifact, thread count or provider: one line, no traceback.
        print(f"kws: error: {exc}", file=sys.stderr)
        return EXIT_BAD_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (kws predict ... | head): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_SOME_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kws",
        description="Keyword spotting with a model bundle (torch-free: numpy + onnxruntime).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="classify audio files",
        description="Classify audio files; folders are searched recursively for "
        f"{', '.join(sorted(AUDIO_EXTENSIONS))} files. One line per file: path, label, probability.",
    )
    predict.add_argument("bundle", metavar="BUNDLE", help="model bundle folder (with manifest.json)")
    predict.add_argument("paths", metavar="PATH", nargs="+", help="audio files or folders")
    predict.add_argument("--top-k", type=_positive, default=None, metavar="K", help="print the K most probable labels")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--artifact", metavar="NAME", help="ONNX artifact to run (default: onnx_int8, else onnx_fp32)")
    predict.add_argument("--threads", type=_positive, default=None, metavar="N", help="onnxruntime intra-op threads")
    predict.set_defaults(run=_predict)

    info = commands.add_parser("info", help="describe a bundle", description="Print a bundle's manifest as tables.")
    info.add_argument("bundle", metavar="BUNDLE", help="model bundle folder (with manifest.json)")
    info.set_defaults(run=_info)

    from . import serve, stream_cli

    stream_cli.add_commands(commands, _positive)
    serve.add_command(commands)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ------------------------------------------------------------------------------------ predict


def _predict(args) -> int:
    from .predict import Predictor

    predictor = Predictor(args.bundle, artifact=args.artifact, threads=args.threads)
    for reason in predictor.skipped:
        print(f"kws: note: {reason}; using {predictor.artifact.name} (--artifact picks one)", file=sys.stderr)
    failed = 0
    group: list = []

    def flush():
        if not group:
            return
        probs = predictor.probabilities(np.stack([clip for _, clip in group]))
        for (path, _), p in zip(group, probs):
            print(_format(path, predictor.labels, p, args.top_k, args.json), flush=False)
        sys.stdout.flush()
        group.clear()

    for path, problem in _audio_files(args.paths):
        if problem is None:
            try:
                group.append((path, load_audio(path, predictor.spec)))
            except AudioError as exc:
                problem = str(exc)
        if problem is not None:
            flush()  # keep the output in the order the files were found
            print(f"kws: error: {problem}", file=sys.stderr)
            failed += 1
        elif len(group) >= _GROUP:
            flush()
    flush()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _audio_files(paths: Sequence[str]) -> Iterator[tuple]:
    """``(path, None)`` for each file to classify, ``(path, reason)`` for each unusable argument
    and each folder on the way that cannot be read."""
    for arg in paths:
        path = Path(arg)
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except FileNotFoundError:
            if os.path.islink(path):
                yield path, None  # a dangling link: read_audio says so
            else:
                yield path, f"{path}: no such file or folder"
            continue
        except OSError as exc:
            yield path, f"{path}: {os_error_reason(exc)}"
            continue
        if not is_dir:
            yield path, None  # named explicitly: tried whatever its extension
            continue
        unreadable: list = []
        found = sorted(
            (Path(root) / name for root, _, names in os.walk(path, onerror=unreadable.append) for name in names
             if is_audio_file(name)),
            key=str,
        )
        for exc in unreadable:
            yield Path(exc.filename or path), f"{exc.filename or path}: folder cannot be read: {os_error_reason(exc)}"
        if not found and not unreadable:
            yield path, f"{path}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) in this folder"
        for file in found:
            yield file, None


def _format(path, labels: Sequence[str], probs: np.ndarray, top_k: Optional[int], as_json: bool) -> str:
    order = np.argsort(-probs, kind="stable")
    best = order[0]
    if as_json:
        record = {"path": str(path), "label": labels[best], "probability": round(float(probs[best]), 6)}
        if top_k:
            record["top"] = [{"label": labels[i], "probability": round(float(probs[i]), 6)} for i in order[:top_k]]
        else:
            record["probabilities"] = {label: round(float(p), 6) for label, p in zip(labels, probs)}
        return json.dumps(record, ensure_ascii=False)
    if top_k:
        return f"{path}  " + "  ".join(f"{labels[i]}:{probs[i]:.2f}" for i in order[:top_k])
    return f"{path}  {labels[best]}  {probs[best]:.2f}"


# --------------------------------------------------------------------------------------- info


def _info(args) -> int:
    bundle = load_bundle(args.bundle)
    print(describe(bundle))
    for artifact in bundle.artifacts.values():
        reason = untrusted(bundle, artifact)
        if reason:
            print(f"kws: warning: {reason}", file=sys.stderr)
    return EXIT_OK


def describe(bundle: Bundle) -> str:
    """The bundle's manifest as plain-text tables."""
    spec = bundle.spec
    model = bundle.model
    lines = [
        f"bundle    {bundle.path}",
        f"model     {model['name']} ({model['architecture']}, {model['variant']})",
        f"labels    {len(bundle.labels)}: {' '.join(bundle.labels)}",
        f"features  {spec.n_mels} mel bands x {spec.n_frames} frames: {spec.sample_rate} Hz, "
        f"{spec.clip_samples / spec.sample_rate:g} s clips, n_fft {spec.n_fft}, window {spec.win_length} "
        f"({spec.window}), hop {spec.hop_length}, {spec.fmin:g}-{spec.f_max:g} Hz, mel norm {spec.mel_norm}, "
        f"{'htk' if spec.htk else 'slaney'} scale, ref {spec.ref}, top_db {spec.top_db}",
        "",
        "artifacts",
    ]
    rows = [["name", "file", "format", "precision", "input", "output", "size", "sha256", "accuracy"]]
    for a in bundle.artifacts.values():
        accuracy = a.metrics.get("accuracy")
        rows.append(
            [
                a.name,
                a.file,
                a.format,
                a.precision,
                f"{a.input_kind} {_shape(a.input_shape)}",
                f"{a.output_kind} {_shape(a.output_shape)}",
                _size(a.size),
                a.sha256[:12],
                f"{100 * accuracy:.2f}%" if isinstance(accuracy, (int, float)) else "-",
            ]
        )
    lines += _table(rows)
    if bundle.scorecard:
        keys = list(dict.fromkeys(k for row in bundle.scorecard for k in row))
        lines += ["", "scorecard"]
        lines += _table([keys] + [[_cell(k, row.get(k)) for k in keys] for row in bundle.scorecard])
    return "\n".join(lines)


def _table(rows: list) -> list:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and key in ("accuracy", "agreement", "agreement_fp32"):
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    if key == "size" and isinstance(value, int):
        return _size(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())

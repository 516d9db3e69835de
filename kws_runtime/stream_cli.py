"""``kws stream`` and ``kws listen``: keyword events from long recordings and the microphone.

    kws stream BUNDLE FILE... [--json] [--threshold T] [--hop-ms MS] [--artifact NAME]
    kws listen BUNDLE [--device ID] [--list-devices] [--threshold T]
    kws evaluate-stream BUNDLE DATA --out DIR [--minutes M] [--snr DB...] [--seed S]

One line per event: ``12.40  yes  0.93`` (seconds from the start, word, averaged probability).
The detection settings are `kws_runtime.stream.DetectorConfig`'s, overridden by the bundle's
``detector`` entry when it has one, then by the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import exit_codes
from .audio import AudioError
from .bundle import load_bundle
from .stream import Detector, DetectorConfig, Event


def add_commands(commands, positive) -> None:
    """Add ``stream`` and ``listen`` to the ``kws`` subcommands."""
    stream = commands.add_parser("stream", help="find keywords in long recordings",
                                 description="Find keywords in recordings of any length (read in blocks), "
                                 "one line per event: seconds, word, score.")
    stream.add_argument("bundle", metavar="BUNDLE", help="model bundle folder")
    stream.add_argument("files", metavar="FILE", nargs="+", help="recordings (any rate, mono or stereo)")
    stream.add_argument("--json", action="store_true", help="one JSON object per event")
    stream.add_argument("--artifact", metavar="NAME", help="ONNX artifact to run (default as kws predict)")
    stream.add_argument("--threads", type=positive, default=None, metavar="N", help="onnxruntime intra-op threads")
    detector_options(stream)
    stream.set_defaults(run=_stream)

    listen = commands.add_parser("listen", help="find keywords live from the microphone",
                                 description="Find keywords live from a microphone (sounddevice) until Ctrl-C.")
    listen.add_argument("bundle", metavar="BUNDLE", nargs="?", help="model bundle folder")
    listen.add_argument("--device", help="input device index or name (see --list-devices)")
    listen.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    listen.add_argument("--artifact", metavar="NAME", help="ONNX artifact to run")
    detector_options(listen)
    listen.set_defaults(run=_listen)

    evaluate = commands.add_parser("evaluate-stream", help="hit rate and false alarms per hour on test streams",
                                   description="Build seeded test streams from a Speech Commands folder (its test "
                                   "split, or every clip when it has no lists) over its background noise, run the "
                                   "detector and sweep the threshold; writes the streams (WAV + CSV), report.json "
                                   "and, with matplotlib, curve.png.")
    evaluate.add_argument("bundle", metavar="BUNDLE", help="model bundle folder")
    evaluate.add_argument("data", metavar="DATA", help="a Speech Commands folder with _background_noise_/")
    evaluate.add_argument("--out", required=True, metavar="DIR", help="folder for the streams and the report")
    evaluate.add_argument("--minutes", type=float, default=5.0, help="length of each stream (default 5)")
    evaluate.add_argument("--snr", type=float, nargs="+", default=[20.0, 10.0, 0.0], metavar="DB",
                          help="signal-to-noise ratios, one stream each (default 20 10 0)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--artifact", metavar="NAME", help="ONNX artifact to run")
    detector_options(evaluate)
    evaluate.set_defaults(run=_evaluate)


def detector_options(p: argparse.ArgumentParser) -> None:
    d = DetectorConfig()
    p.add_argument("--threshold", type=float, metavar="T", help=f"averaged probability to fire (default {d.threshold:g})")
    p.add_argument("--hop-ms", type=float, metavar="MS", help=f"score the latest window every MS ms (default {d.hop_ms:g})")
    p.add_argument("--average-ms", type=float, metavar="MS", help=f"average the scores over MS ms (default {d.average_ms:g})")
    p.add_argument("--suppression-ms", type=float, metavar="MS",
                   help=f"nothing fires for MS ms after an event (default {d.suppression_ms:g})")


def detector_config(bundle, args) -> DetectorConfig:
    """`DetectorConfig` defaults, then the bundle's ``detector`` entry, then the options."""
    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    stored = bundle.manifest.get("detector") or {}
    if not isinstance(stored, dict) or set(stored) - fields:
        raise ValueError(f"{bundle.path}: manifest.json: detector must be an object with fields among {', '.join(sorted(fields))}")
    options = {"threshold": args.threshold, "hop_ms": args.hop_ms, "average_ms": args.average_ms,
               "suppression_ms": args.suppression_ms}
    return DetectorConfig(**{**stored, **{k: v for k, v in options.items() if v is not None}})


def _print_event(event: Event, path, as_json: bool) -> None:
    if as_json:
        record = {"time": event.time, "label": event.label, "score": round(event.score, 4)}
        print(json.dumps({"path": str(path), **record} if path is not None else record), flush=True)
    else:
        print(f"{event.time:.2f}  {event.label}  {event.score:.2f}", flush=True)


def _stream(args) -> int:
    from .listen import Recording, run

    bundle = load_bundle(args.bundle)
    detector = Detector(bundle, detector_config(bundle, args), artifact=args.artifact, threads=args.threads)
    for note in detector.notes:
        print(f"kws: note: {note}", file=sys.stderr)
    failed = 0
    for path in args.files:
        if len(args.files) > 1 and not args.json:
            print(f"# {path}", flush=True)
        try:
            run(detector, Recording(path, detector.spec.sample_rate, block_seconds=1.0),
                lambda event: _print_event(event, path if args.json else None, args.json))
        except AudioError as exc:
            print(f"kws: error: {exc}", file=sys.stderr)
            failed += 1
        detector.reset()
    return exit_codes.SOME_FAILED if failed else exit_codes.OK


def _evaluate(args) -> int:
    from .stream_eval import evaluate, report_table

    bundle = load_bundle(args.bundle)
    report = evaluate(bundle.path, args.data, args.out, minutes=args.minutes, snrs=args.snr, seed=args.seed,
                      config=detector_config(bundle, args), artifact=args.artifact,
                      log=lambda line: print(line, file=sys.stderr))
    print(report_table(report))
    return exit_codes.OK


def _listen(args) -> int:
    from .listen import Microphone, MicrophoneError, input_devices, run

    try:
        if args.list_devices:
            for index, name, channels, rate in input_devices():
                print(f"{index:3d}  {name}  ({channels} channels, {rate:g} Hz)")
            return exit_codes.OK
        if args.bundle is None:
            raise ValueError("kws listen needs a BUNDLE (or --list-devices)")
        bundle = load_bundle(args.bundle)
        detector = Detector(bundle, detector_config(bundle, args), artifact=args.artifact)
        device = int(args.device) if args.device is not None and args.device.isdigit() else args.device
        source = Microphone(detector.spec.sample_rate, device=device)
    except MicrophoneError as exc:
        print(f"kws: error: {exc}", file=sys.stderr)
        return exit_codes.CANNOT_RUN
    print("listening; Ctrl-C to stop", file=sys.stderr)
    try:
        run(detector, source, lambda event: _print_event(event, None, False))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return exit_codes.OK

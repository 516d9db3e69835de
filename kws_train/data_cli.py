"""`kws-data`: get, inspect and synthesize Speech Commands data.

    kws-data download --version 0.02 --out data/            # training archive
    kws-data download --version 0.02 --out data/ --test-set # official 12-class test set
    kws-data stats data/speech_commands_v0.02 [--json]
    kws-data synth data/synth --per-word 300 --noise data/speech_commands_v0.02
"""

from __future__ import annotations

import argparse
import json
import sys

from kws_runtime import exit_codes
from kws_runtime.audio import AudioError
from kws_runtime.files import WriteError, os_error_reason

from . import download as dl
from .dataset import SPLITS, DatasetError, describe_dataset
from .synth import SNR_DB, SynthError, default_jobs, synthesize_dataset

_MAX_PROBLEMS_SHOWN = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kws-data",
        description="Download, inspect and synthesize Speech Commands datasets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kws-data COMMAND -h` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "download",
        help="download and extract Speech Commands v0.01/v0.02 (or its official test set)",
        description="Download an official Speech Commands archive (resumable, checksum-verified) and extract it "
        "safely into OUT/speech_commands_v0.0x (or OUT/speech_commands_test_set_v0.0x). A verified dataset "
        "already there is not downloaded again.",
    )
    p.add_argument("--version", choices=dl.VERSIONS, default="0.02", help="dataset version (default 0.02)")
    p.add_argument("--out", required=True, metavar="DIR", help="parent folder for the dataset (created if needed)")
    p.add_argument("--test-set", action="store_true", help="the official 12-class test archive instead of the training data")
    p.add_argument(
        "--base-url", default=dl.OFFICIAL_BASE_URL, metavar="URL", help=f"mirror folder URL (default {dl.OFFICIAL_BASE_URL})"
    )
    p.add_argument("--keep-archive", action="store_true", help="keep the .tar.gz after extracting it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_download)

    p = sub.add_parser(
        "stats",
        help="clips per word and split, speakers, durations, problems",
        description="Check every clip of a dataset in the Speech Commands layout and summarize it.",
    )
    p.add_argument("root", metavar="ROOT", help="dataset folder (with <word>/ subfolders)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_stats)

    p = sub.add_parser(
        "synth",
        help="synthesize a Speech Commands-style dataset with eSpeak NG",
        description="Speak words with eSpeak NG in many voices, rates and pitches and write them as 1 s "
        "16 kHz clips in the Speech Commands layout, with validation/testing lists split by synthetic speaker. "
        "Same --seed, same files.",
    )
    p.add_argument("out", metavar="OUT", help="new (or empty) folder for the dataset")
    p.add_argument("--words", nargs="+", metavar="W", help="words to speak (default: the 35 Speech Commands v0.02 words)")
    p.add_argument("--per-word", type=int, default=100, metavar="N", help="clips per word (default 100)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument(
        "--noise", metavar="DIR", help="mix with background noise from DIR (noise files, or a dataset with _background_noise_/)"
    )
    p.add_argument(
        "--noise-probability", type=float, default=0.8, metavar="P", help="share of clips mixed with noise (default 0.8)"
    )
    p.add_argument(
        "--snr", type=float, nargs=2, default=SNR_DB, metavar=("LOW", "HIGH"), help="SNR range in dB (default %s %s)" % SNR_DB
    )
    p.add_argument(
        "--jobs", type=int, default=None, metavar="J", help=f"worker processes (default: {default_jobs()}, the CPUs available)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset at OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)
    return parser


def main(argv=None) -> int:
    """Entry point of the `kws-data` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (dl.DownloadError, DatasetError, SynthError, AudioError, OSError) as exc:
        print(f"kws-data {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exit_codes.CANNOT_RUN
    except KeyboardInterrupt:
        print(f"kws-data {args.command}: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED


def _one_line(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.filename:
        text = f"{exc.filename}: {os_error_reason(exc)}"
    return " ".join(text.split())


def _download(args) -> int:
    info = dl.archive_info(args.version, args.test_set)
    target = dl.download_speech_commands(
        args.out, args.version, args.test_set, base_url=args.base_url, keep_archive=args.keep_archive,
        progress=not args.no_progress,
    )  # fmt: skip
    stamp = json.loads((target / dl.STAMP_NAME).read_text())
    print(f"{target}  ({info.filename}, sha256 {stamp['sha256']})")
    if info.sha256 is None:
        print("note: no published checksum exists for this archive; the sha256 above was measured after download")
    return 0


def _stats(args) -> int:
    report = describe_dataset(args.root, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_stats(report))
    return 0


def format_stats(report: dict) -> str:
    """A `describe_dataset` report as a plain-text table."""
    lines = [f"{report['root']}: {report['clips']} clips, splits from the {report['split_source']}"]
    width = max([len(w) for w in report["words"]] + [5])
    lines.append(f"{'word':<{width}}  " + "  ".join(f"{s:>10}" for s in SPLITS) + f"  {'total':>7}")
    for word, counts in report["words"].items():
        row = "  ".join(f"{counts[s]:>10}" for s in SPLITS)
        lines.append(f"{word:<{width}}  {row}  {sum(counts.values()):>7}")
    row = "  ".join(f"{report['splits'][s]:>10}" for s in SPLITS)
    lines.append(f"{'total':<{width}}  {row}  {report['clips']:>7}")
    sp = report["speakers"]
    lines.append(f"speakers: {sp['total']} (" + ", ".join(f"{s} {sp[s]}" for s in SPLITS) + ")")
    d = report["duration_s"]
    if d["min"] is not None:
        lines.append(
            f"duration: {d['min']:.3f} to {d['max']:.3f} s, mean {d['mean']:.3f} s; "
            f"{report['short_clips']} clips shorter than 1 s"
        )
    rates = ", ".join(f"{r} Hz: {n}" for r, n in report["sample_rates"].items()) or "none"
    lines.append(f"sample rates: {rates}")
    noise = report["background_noise"]
    if noise:
        lines.append(f"background noise: {len(noise)} files, {sum(n['seconds'] for n in noise):.0f} s")
    else:
        lines.append("background noise: none (12-class silence needs _background_noise_/ from another dataset)")
    problems = report["problems"]
    lines.append(f"problems: {len(problems)}")
    for item in problems[:_MAX_PROBLEMS_SHOWN]:
        lines.append(f"  {item['path']}: {item['problem']}")
    if len(problems) > _MAX_PROBLEMS_SHOWN:
        lines.append(f"  ... and {len(problems) - _MAX_PROBLEMS_SHOWN} more (use --json for all)")
    return "\n".join(lines)


def _synth(args) -> int:
    report = synthesize_dataset(
        args.out, words=args.words, per_word=args.per_word, seed=args.seed, noise=args.noise, jobs=args.jobs,
        noise_probability=args.noise_probability, snr_db=tuple(args.snr), progress=not args.no_progress,
        overwrite=args.overwrite,
    )  # fmt: skip
    splits = ", ".join(f"{s} {report.splits[s]}" for s in SPLITS)
    print(
        f"{report.out}: {report.clips} clips from {report.speakers} synthetic speakers ({splits}) "
        f"in {report.seconds:.1f} s, {report.clips_per_second:.0f} clips/s with {report.jobs} processes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kws-train``: train, evaluate, predict with and profile the keyword-spotting models.

    kws-train -m shufflenet -d data/speech_commands_v0.02 -t -e 10 -b 128 -g -s   # train
    kws-train -m shufflenet -d clips/                 # predict: prints "file  label" lines
    kws-train eval runs/resnet18/best.pt data/speech_commands_test_set_v0.02 --json
    kws-train profile

A thin layer over `kws_train.trainer.train`, `kws_train.evaluate` and `kws_train.profile`.
Under ``torchrun --nproc_per_node N -m kws_train.cli ...`` training runs data-parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "kws-train"
SUBCOMMANDS = ("eval", "profile")
MODEL_CHOICES = ("resnet", "mobilenet", "shufflenet", "resnet18", "mobilenet_v2", "shufflenet_v2_x0_5")
DEFAULT_MODEL = "resnet18"
DEFAULT_FEATURES = "fine"


class CliError(Exception):
    """A problem with the command line or its inputs: printed as one line, exit status 1."""


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a keyword-spotting model (-t), or label audio files with one (without -t). "
        f"Subcommands: '{PROG} eval CKPT DATA' and '{PROG} profile' (see '{PROG} eval -h').",
    )
    p.add_argument("-m", "--model", choices=MODEL_CHOICES, default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"resnet, mobilenet, shufflenet (or resnet18, mobilenet_v2, shufflenet_v2_x0_5; default {DEFAULT_MODEL})")
    p.add_argument("-d", "--data", metavar="PATH",
                   help="training: a Speech Commands folder; prediction: an audio file or a folder of them")
    p.add_argument("-t", "--train", action="store_true", help="train (otherwise predict the audio files in -d)")
    p.add_argument("-e", "--epochs", type=int, default=30, metavar="N", help="epochs (default 30)")
    p.add_argument("-b", "--batch-size", type=int, default=128, metavar="N", help="clips per step and GPU (default 128)")
    p.add_argument("-g", "--gpu", action="store_true", help="use the GPU (an error if there is none)")
    p.add_argument("-s", "--save", action="store_true",
                   help="also copy best.pt to the model's default weights file (WEIGHTS_DIR/<architecture>.pt)")
    p.add_argument("--task", choices=("12", "35"), default="12", help="12 (10 words + silence + unknown) or 35 words")
    p.add_argument("--features", choices=("seed", "fine"), default=DEFAULT_FEATURES,
                   help=f"feature preset: fine (30 ms / 10 ms, 40x101) or seed (40x32) (default {DEFAULT_FEATURES})")
    p.add_argument("--variant", choices=("default", "seed"), default="default", help="model variant (default: default)")
    p.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default 2e-3 AdamW, 0.05 SGD)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.01, metavar="WD")
    p.add_argument("--warmup", type=float, default=1.0, metavar="EPOCHS", help="linear warm-up epochs (default 1)")
    p.add_argument("--label-smoothing", type=float, default=0.1, metavar="E")
    p.add_argument("--balance", choices=("loss", "sampler", "none"), default="loss",
                   help="class balancing: loss weights, a balanced sampler, or none (default loss)")
    p.add_argument("--no-augment", action="store_true", help="no time shift, noise, gain or SpecAugment")
    p.add_argument("--split", choices=("dataset", "speaker"), default="dataset",
                   help="dataset: its lists or hash rule; speaker: re-split speakers with --salt (default dataset)")
    p.add_argument("--salt", default="", help="salt of --split speaker")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="--split speaker: validation share")
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F", help="--split speaker: test share")
    p.add_argument("--extra-train", action="append", default=[], metavar="DIR",
                   help="another dataset (e.g. from 'kws-data synth') whose clips all join the training split; repeatable")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<architecture>-<variant>-<features>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue an interrupted run from --out's last.pt (or CKPT)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop this run after N epochs (resume later)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision: auto (bf16 or fp16 on GPUs, off on CPUs), off, bf16, fp16 (default auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cache-dir", metavar="DIR", help="decoded-audio caches (default: --out's parent/cache)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--checkpoint", metavar="CKPT", help="prediction: use this checkpoint instead of the default weights")
    p.add_argument("--weights-dir", metavar="DIR",
                   help="folder of the default weights files (default $KWS_WEIGHTS_DIR or ./weights)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} eval", description="Accuracy, per-class figures and confusion matrix of a checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint (best.pt, last.pt or a weights file)")
    p.add_argument("data", metavar="DATA", help="a Speech Commands folder")
    p.add_argument("--split", choices=("auto", "testing", "validation", "training", "all"), default="auto",
                   help="which clips: testing, validation, training, all; auto (default): every clip of the "
                   "official test archive (a folder with _unknown_/), else testing")
    p.add_argument("--salt", help="re-split by speaker with this salt first; with a run's --salt and fractions "
                   "this scores exactly the clips that run held out")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F")
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F")
    p.add_argument("-b", "--batch-size", type=int, default=256, metavar="N")
    p.add_argument("-g", "--gpu", action="store_true", help="use the GPU (an error if there is none)")
    p.add_argument("--plot", metavar="PNG", help="also write the confusion matrix as a PNG")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def _profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} profile", description="Parameters and multiply-accumulates of every model.")
    p.add_argument("--features", nargs="+", choices=("seed", "fine"), default=["seed", "fine"])
    p.add_argument("--batch", type=int, default=32, help="batch for the MACs-per-batch column (default 32)")
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p


def _device(gpu: bool) -> str:
    if not gpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise CliError("-g: no GPU is available (torch.cuda.is_available() is false); drop -g to run on the CPU")
    return "cuda"


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise CliError(f"{name} must be at least 1, got {value}")


def _run_train(args) -> int:
    from .models import canonical_architecture
    from .trainer import TrainConfig, default_weights_path, train

    if not args.data:
        raise CliError("-t needs -d DATA, a Speech Commands folder")
    if not Path(args.data).is_dir():
        raise CliError(f"-d {args.data}: no such folder (expected a Speech Commands dataset)")
    for flag, value in (("-e", args.epochs), ("-b", args.batch_size), ("--threads", args.threads), ("--stop-after", args.stop_after)):
        _positive(flag, value)
    device = _device(args.gpu)
    architecture = canonical_architecture(args.model)
    out = args.out or os.path.join("runs", f"{architecture}-{args.variant}-{args.features}")
    if Path(out).exists() and not Path(out).is_dir():
        raise CliError(f"--out {out}: exists and is not a folder")
    save_weights = str(default_weights_path(architecture, args.weights_dir)) if args.save else None
    config = TrainConfig(
        data=args.data, out=out, architecture=architecture, variant=args.variant, task=args.task,
        features=args.features, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup, label_smoothing=args.label_smoothing,
        balance=args.balance, augment=not args.no_augment, split=args.split, split_salt=args.salt,
        validation_fraction=args.val_fraction, testing_fraction=args.test_fraction, extra_train=args.extra_train,
        device=device, amp=args.amp, compile=args.compile, seed=args.seed, resume=args.resume,
        stop_after_epochs=args.stop_after, cache_dir=args.cache_dir, threads=args.threads,
        save_weights=save_weights, quiet=args.quiet,
    )
    result = train(config)
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {result.out}/ (best.pt: epoch {result.best_epoch}, validation {100 * result.best_val_accuracy:.2f}%)")
    return 0


def _audio_files(path: Path) -> list:
    from kws_runtime.audio import is_audio_file

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CliError(f"-d {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_audio_file(p) and not p.name.startswith("."))
    if not files:
        raise CliError(f"-d {path}: no audio files (.wav, .flac, .ogg) in it")
    return files


def _run_predict(args) -> int:
    from .evaluate import predict_files
    from .models import canonical_architecture
    from .trainer import default_weights_path

    if not args.data:
        raise CliError("nothing to do: pass -d FILES to label audio files, -t -d DATA to train, "
                       f"or a subcommand ({', '.join(SUBCOMMANDS)}); see {PROG} -h")
    device = _device(args.gpu)
    files = _audio_files(Path(args.data))
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = default_weights_path(canonical_architecture(args.model), args.weights_dir)
        if not checkpoint.is_file():
            raise CliError(f"no default weights at {checkpoint}: train with -t -s first, or pass --checkpoint CKPT")
    for path, label, _ in predict_files(checkpoint, files, device=device):
        print(f"{path}  {label}")
    return 0


def _run_eval(argv) -> int:
    from .evaluate import evaluate_checkpoint, format_report
    from .plots import plot_confusion_matrix

    args = _eval_parser().parse_args(argv)
    _positive("-b", args.batch_size)
    device = _device(args.gpu)
    if not Path(args.checkpoint).is_file():
        raise CliError(f"{args.checkpoint}: no such checkpoint file")
    if not Path(args.data).is_dir():
        raise CliError(f"{args.data}: no such folder (expected a Speech Commands dataset)")
    result = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, salt=args.salt, validation_fraction=args.val_fraction,
        testing_fraction=args.test_fraction, batch_size=args.batch_size, device=device,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.plot:
        plot_confusion_matrix(result.confusion, result.labels, args.plot,
                              title=f"{Path(args.checkpoint).name}, {args.split}: {100 * result.accuracy:.1f}%")
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_report(result))
    return 0


def _run_profile(argv) -> int:
    from .profile import format_table, profile_table

    args = _profile_parser().parse_args(argv)
    _positive("--batch", args.batch)
    _positive("--classes", args.classes)
    rows = profile_table(args.features, batch=args.batch, num_classes=args.classes)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``kws-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "eval":
            return _run_eval(argv[1:])
        if argv and argv[0] == "profile":
            return _run_profile(argv[1:])
        args = _train_parser().parse_args(argv)
        return _run_train(args) if args.train else _run_predict(args)
    except CliError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)
    except (ValueError, OSError, RuntimeError) as error:
        # DatasetError, CheckpointError, AudioError, SpecError, CacheError, TrainError, ...: their
        # messages already name the file and the fix; a traceback would only bury them.
        return _fail(str(error) or type(error).__name__)


def _fail(message: str, status: int = 1) -> int:
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

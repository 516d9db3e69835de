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
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from kws_runtime import exit_codes

PROG = "kws-train"
SUBCOMMANDS = ("eval", "profile")


class CliError(Exception):
    """A problem with the command line or its inputs: printed as one line, exit status 2."""


def _train_parser() -> argparse.ArgumentParser:
    # Defaults and choices come from the library's dataclasses and constants, never restated.
    from kws_runtime.spec import PRESET_ALIASES, PRESETS

    from .config import AMP_MODES, BALANCING, OPTIMIZERS, SCHEDULES, SGD_LR, TrainConfig
    from .dataset import TASKS, UNKNOWN_DRAWS
    from .models import ALIASES, ARCHITECTURES, VARIANT_NAMES

    default = TrainConfig.__dataclass_fields__
    model = default["architecture"].default
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a keyword-spotting model (-t), or label audio files with one (without -t). "
        f"Subcommands: '{PROG} eval CKPT DATA' and '{PROG} profile' (see '{PROG} eval -h').",
    )
    p.add_argument("-m", "--model", choices=tuple(ALIASES) + ARCHITECTURES, default=model, metavar="MODEL",
                   help=f"{', '.join(ALIASES)} (or {', '.join(ARCHITECTURES)}; default {model})")
    p.add_argument("-d", "--data", metavar="PATH",
                   help="training: a Speech Commands folder; prediction: an audio file or a folder of them")
    p.add_argument("-t", "--train", action="store_true", help="train (otherwise predict the audio files in -d)")
    per_architecture = "; ".join(f"{name} {s.epochs} epochs, lr {s.adamw_lr:g}, warm-up {s.warmup_epochs:g}"
                                 for name, s in SCHEDULES.items())
    p.add_argument("-e", "--epochs", type=int, metavar="N",
                   help=f"epochs (default per architecture: {per_architecture})")
    p.add_argument("-b", "--batch-size", type=int, default=default["batch_size"].default, metavar="N",
                   help=f"clips per step and GPU (default {default['batch_size'].default})")
    p.add_argument("-g", "--gpu", action="store_true", help="use the GPU (an error if there is none)")
    p.add_argument("-s", "--save", action="store_true",
                   help="also copy best.pt to the model's default weights file (WEIGHTS_DIR/<architecture>.pt)")
    p.add_argument("--task", choices=TASKS, default=default["task"].default,
                   help="12 (10 words + silence + unknown) or 35 words")
    p.add_argument("--features", choices=tuple(PRESETS) + tuple(PRESET_ALIASES), default=default["features"].default,
                   help="feature preset: fine (30 ms / 10 ms, 40x101) or librosa (librosa's default 2048/512 framing, "
                   f"40x32; 'seed' is accepted for it) (default {default['features'].default})")
    p.add_argument("--variant", choices=VARIANT_NAMES, default=default["variant"].default,
                   help="model variant: default (adapted to 40-band log-mel inputs) or imagenet (the original ImageNet "
                   f"layout; 'seed' is accepted for it) (default {default['variant'].default})")
    p.add_argument("--lr", type=float, metavar="LR",
                   help=f"peak learning rate (default: the architecture's with adamw, see -e; {SGD_LR:g} with sgd)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=default["optimizer"].default)
    p.add_argument("--weight-decay", type=float, default=default["weight_decay"].default, metavar="WD")
    p.add_argument("--warmup", type=float, metavar="EPOCHS",
                   help="linear warm-up epochs (default: the architecture's, see -e)")
    p.add_argument("--label-smoothing", type=float, default=default["label_smoothing"].default, metavar="E")
    p.add_argument("--balance", choices=BALANCING, default=default["balance"].default,
                   help=f"class balancing: loss weights, a balanced sampler, or none (default {default['balance'].default})")
    p.add_argument("--silence-share", type=float, default=default["silence_share"].default, metavar="F",
                   help="12-class task: silence windows cut from the background noise, as a fraction of the command "
                   f"clips (default {default['silence_share'].default:g})")
    p.add_argument("--unknown-share", type=float, default=default["unknown_share"].default, metavar="F",
                   help="12-class task: other-word clips drawn as _unknown_, as a fraction of the command clips "
                   f"(default {default['unknown_share'].default:g}; 1 takes every other-word clip of a folder this size)")
    p.add_argument("--unknown-draw", choices=UNKNOWN_DRAWS, default=default["unknown_draw"].default,
                   help="12-class task: draw the _unknown_ clips from the whole pool (random) or as many from each "
                   "other word (per-word, repeating a word's clips when it has fewer; "
                   f"default {default['unknown_draw'].default})")
    p.add_argument("--partial-share", type=float, default=default["partial_share"].default, metavar="F",
                   help="12-class task: command clips moved so only a fragment of the word stays, added to training "
                   "as _unknown_, as a fraction of the command clips (default "
                   f"{default['partial_share'].default:g}; trains for windows that slide over words)")
    p.add_argument("--training-speakers", type=float, default=default["training_speakers"].default, metavar="F",
                   help="train on this share of the training split's speakers, chosen by a hash of the speaker id "
                   "(default 1: all; smaller shares measure a learning curve)")
    _add_augment_options(p)
    _add_regularisation_options(p, default)
    _add_split_options(p)
    p.add_argument("--extra-train", action="append", default=[], metavar="DIR",
                   help="another dataset (e.g. from 'kws-data synth') whose clips all join the training split; repeatable")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/<architecture>-<variant>-<features>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue an interrupted run from --out's last.pt (or CKPT)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop this run after N epochs (resume later)")
    p.add_argument("--seed", type=int, default=default["seed"].default)
    p.add_argument("--amp", choices=AMP_MODES, default=default["amp"].default,
                   help="mixed precision: auto (bf16 or fp16 on GPUs, off on CPUs), off, bf16, fp16 "
                   f"(default {default['amp'].default})")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cache-dir", metavar="DIR", help="decoded-audio caches (default: --out's parent/cache)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--checkpoint", metavar="CKPT", help="prediction: use this checkpoint instead of the default weights")
    p.add_argument("--weights-dir", metavar="DIR",
                   help="folder of the default weights files (default $KWS_WEIGHTS_DIR or ./weights)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def _add_augment_options(p: argparse.ArgumentParser) -> None:
    from .augment import AugmentConfig
    from .recipe import default_of

    p.add_argument("--no-augment", action="store_true", help="no time shift, noise, gain or SpecAugment")
    p.add_argument("--shift-ms", type=float, metavar="MS",
                   help="largest random time shift either way, in ms (default "
                   f"{default_of(AugmentConfig, 'shift_ms'):g}; wider shifts train for windows that slide over words)")
    p.add_argument("--snr", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="signal-to-noise range of the background noise mixed into training clips, in dB (default "
                   f"{' '.join(f'{v:g}' for v in default_of(AugmentConfig, 'snr_db'))})")
    p.add_argument("--freq-mask-bands", type=int, metavar="N",
                   help="widest SpecAugment frequency mask, in mel bands (default "
                   f"{default_of(AugmentConfig, 'freq_mask_bands')}; 0: no frequency masks)")
    p.add_argument("--time-mask-ms", type=float, metavar="MS",
                   help="widest SpecAugment time mask, in ms (default "
                   f"{default_of(AugmentConfig, 'time_mask_ms'):g}; 0: no time masks)")
    p.add_argument("--speed", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="play each training clip at a random speed in [LOW, HIGH] (pitch and tempo together, "
                   "e.g. 0.9 1.1; default off)")


def _add_regularisation_options(p: argparse.ArgumentParser, default: dict) -> None:
    p.add_argument("--teacher", action="append", default=[], metavar="CKPT",
                   help="distil from this trained checkpoint (same task and features); repeat for an ensemble")
    p.add_argument("--teacher-bundle", action="append", default=[], metavar="BUNDLE",
                   help="distil from this exported bundle instead (same task and features): it scores every "
                   "training clip once, as recorded, before the first epoch; repeat for an ensemble")
    p.add_argument("--distill-weight", type=float, default=default["distill_weight"].default, metavar="W",
                   help=f"share of the distillation term in the loss (default {default['distill_weight'].default:g})")
    p.add_argument("--distill-temperature", type=float, default=default["distill_temperature"].default, metavar="T",
                   help=f"softmax temperature of distillation (default {default['distill_temperature'].default:g})")
    p.add_argument("--average-epochs", type=float, metavar="E",
                   help="keep a moving average of the weights with this time constant in epochs; validation, "
                   "best.pt and the test use it (default: none)")
    p.add_argument("--mixup", type=float, default=default["mixup"].default, metavar="ALPHA",
                   help="mix pairs of training examples and their labels with Beta(ALPHA, ALPHA) weights, e.g. 0.2 "
                   "(default 0: off)")


def _add_split_options(p: argparse.ArgumentParser) -> None:
    from .recipe import SPLIT_METHODS, SplitRule, default_of

    method = default_of(SplitRule, "method")
    p.add_argument("--split", choices=SPLIT_METHODS, default=method,
                   help=f"dataset: its lists or hash rule; speaker: re-split speakers with --salt (default {method})")
    p.add_argument("--salt", default=default_of(SplitRule, "salt"), help="salt of --split speaker")
    for flag, field in (("--val-fraction", "validation_fraction"), ("--test-fraction", "testing_fraction")):
        value = default_of(SplitRule, field)
        p.add_argument(flag, type=float, default=value, metavar="F",
                       help=f"--split speaker: {field.split('_')[0]} share of the speakers (default {value:g})")


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} eval", description="Accuracy, per-class figures and confusion matrix of a checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint (best.pt, last.pt or a weights file)")
    p.add_argument("data", metavar="DATA", help="a Speech Commands folder")
    p.add_argument("--split", choices=("auto", "testing", "validation", "training", "all"), default="auto",
                   help="which clips: testing, validation, training, all; auto (default): every clip of the "
                   "official test archive (a folder with _unknown_/), else testing. The split is composed with the "
                   "checkpoint's own recipe (split rule, salt, shares, seed) unless --salt says otherwise")
    p.add_argument("--salt", help="re-split by speaker with this salt instead of the run's split")
    p.add_argument("--val-fraction", type=float, metavar="F", help="with --salt: validation share (default the run's)")
    p.add_argument("--test-fraction", type=float, metavar="F", help="with --salt: testing share (default the run's)")
    from .evaluate import EVAL_BATCH_SIZE

    p.add_argument("-b", "--batch-size", type=int, default=EVAL_BATCH_SIZE, metavar="N",
                   help=f"clips per forward pass (default {EVAL_BATCH_SIZE})")
    p.add_argument("-g", "--gpu", action="store_true", help="use the GPU (an error if there is none)")
    p.add_argument("--plot", metavar="PNG", help="also write the confusion matrix as a PNG")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def _profile_parser() -> argparse.ArgumentParser:
    from kws_runtime.spec import PRESET_ALIASES, PRESETS

    p = argparse.ArgumentParser(prog=f"{PROG} profile", description="Parameters and multiply-accumulates of every model.")
    p.add_argument("--features", nargs="+", choices=tuple(PRESETS) + tuple(PRESET_ALIASES), default=list(PRESETS))
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


def unused_gpu_note(gpu: bool) -> Optional[str]:
    """The line to print when a run trains on the CPU beside an available GPU (else None):
    without -g, training stays on the CPU, as the original flags have it."""
    if gpu:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return f"{PROG}: training on the CPU although a GPU ({torch.cuda.get_device_name()}) is available; add -g to use it"


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise CliError(f"{name} must be at least 1, got {value}")


def _augment_options(args) -> dict:
    """The `AugmentConfig` fields the command line sets (the rest keep their defaults)."""
    options = {"shift_ms": args.shift_ms, "snr_db": args.snr, "speed": args.speed,
               "freq_mask_bands": args.freq_mask_bands, "time_mask_ms": args.time_mask_ms}
    return {field: value for field, value in options.items() if value is not None}


def _run_train(args) -> int:
    from .config import TrainConfig
    from .models import canonical_architecture
    from .trainer import default_weights_path, train

    if not args.data:
        raise CliError("-t needs -d DATA, a Speech Commands folder")
    if not Path(args.data).is_dir():
        raise CliError(f"-d {args.data}: no such folder (expected a Speech Commands dataset)")
    for flag, value in (("-e", args.epochs), ("-b", args.batch_size), ("--threads", args.threads), ("--stop-after", args.stop_after)):
        _positive(flag, value)
    device = _device(args.gpu)
    note = unused_gpu_note(args.gpu) if int(os.environ.get("RANK", "0")) == 0 else None
    if note:
        print(note, file=sys.stderr)
    architecture = canonical_architecture(args.model)
    out = args.out or os.path.join("runs", f"{architecture}-{args.variant}-{args.features}")
    if Path(out).exists() and not Path(out).is_dir():
        raise CliError(f"--out {out}: exists and is not a folder")
    save_weights = str(default_weights_path(architecture, args.weights_dir)) if args.save else None
    config = TrainConfig(
        data=args.data, out=out, architecture=architecture, variant=args.variant, task=args.task,
        features=args.features, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup, label_smoothing=args.label_smoothing,
        balance=args.balance, augment=not args.no_augment,
        augment_config=_augment_options(args), silence_share=args.silence_share, unknown_share=args.unknown_share,
        unknown_draw=args.unknown_draw,
        partial_share=args.partial_share, training_speakers=args.training_speakers,
        split=args.split, split_salt=args.salt,
        validation_fraction=args.val_fraction, testing_fraction=args.test_fraction, extra_train=args.extra_train,
        teachers=args.teacher, teacher_bundles=args.teacher_bundle, distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        average_epochs=args.average_epochs, mixup=args.mixup,
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
    from .checkpoint import load_checkpoint
    from .evaluate import evaluate_checkpoint, format_report
    from .plots import plot_confusion_matrix

    args = _eval_parser().parse_args(argv)
    _positive("-b", args.batch_size)
    device = _device(args.gpu)
    if not Path(args.checkpoint).is_file():
        raise CliError(f"{args.checkpoint}: no such checkpoint file")
    if not Path(args.data).is_dir():
        raise CliError(f"{args.data}: no such folder (expected a Speech Commands dataset)")
    ckpt = load_checkpoint(args.checkpoint)
    result = evaluate_checkpoint(ckpt, args.data, split=args.split, recipe=_eval_recipe(ckpt.recipe, args),
                                 batch_size=args.batch_size, device=device, progress=not args.json and sys.stderr.isatty())
    if args.plot:
        plot_confusion_matrix(result.confusion, result.labels, args.plot,
                              title=f"{Path(args.checkpoint).name}, {args.split}: {100 * result.accuracy:.1f}%")
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_report(result))
    return 0


def _eval_recipe(recipe, args):
    """The checkpoint's recipe, re-split by speaker when --salt asks for it."""
    if args.salt is None:
        if args.val_fraction is not None or args.test_fraction is not None:
            raise CliError("--val-fraction and --test-fraction go with --salt (a split by speaker)")
        return recipe
    from .recipe import SplitRule

    rule = recipe.split
    split = SplitRule("speaker", args.salt,
                      rule.validation_fraction if args.val_fraction is None else args.val_fraction,
                      rule.testing_fraction if args.test_fraction is None else args.test_fraction)
    return dataclasses.replace(recipe, split=split)


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
        return _fail("interrupted", status=exit_codes.INTERRUPTED)
    except (ValueError, OSError, RuntimeError) as error:
        # DatasetError, CheckpointError, AudioError, SpecError, CacheError, TrainError, ...: their
        # messages already name the file and the fix; a traceback would only bury them.
        return _fail(str(error) or type(error).__name__)


def _fail(message: str, status: int = exit_codes.CANNOT_RUN) -> int:
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

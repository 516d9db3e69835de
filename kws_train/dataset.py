"""Speech Commands on disk: clips, speaker splits, the 12- and 35-class tasks.

A dataset root has the official layout ``<word>/<speaker>_nohash_<n>.wav`` with optional
``validation_list.txt`` / ``testing_list.txt`` and ``_background_noise_/``. The official
12-class test archive adds ``_unknown_/<word>_<speaker>_nohash_<n>.wav`` and
``_silence_/*.wav``; those folders are read as test clips labelled ``_unknown_`` and
``_silence_``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kws_runtime.audio import AudioError, fit_length, is_audio_file, load_audio, read_audio
from kws_runtime.spec import FeatureSpec

SILENCE = "_silence_"
UNKNOWN = "_unknown_"
BACKGROUND_NOISE = "_background_noise_"
NOHASH = "_nohash_"
SPLITS = ("training", "validation", "testing")
# Each split draws its unknown and silence examples with the run's seed plus its offset, so
# the three splits draw differently and each split draws the same way every time.
SPLIT_SEED_OFFSET = {"training": 0, "validation": 1, "testing": 2}
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# How far a partial-word example moves its clip (either way), in ms: Speech Commands words
# last 0.4-0.8 s around the clip's middle, so a fragment of a quarter to a half stays inside.
PARTIAL_OFFSET_MS = (450, 700)
LABELS_12 = [SILENCE, UNKNOWN, *COMMANDS]
# v0.01 words, then the five v0.02 added.
LABELS_35 = [
    *COMMANDS,
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "backward", "forward", "follow", "learn", "visual",
]  # fmt: skip
TASKS = ("12", "35")
# How `build_task` draws other-word clips as ``_unknown_``: uniformly from the pool, or the same
# number from each word (repeating a word's clips when it has fewer), so words the pool holds
# few of are not also rare in training.
UNKNOWN_DRAWS = ("random", "per-word")

# TensorFlow's speech_commands input_data.py: the hash is taken modulo 2**27 and scaled by
# 100 / (2**27 - 1), so a speaker keeps its split as files are added.
_MAX_NUM_WAVS_PER_CLASS = 2**27 - 1
_NOHASH_RE = re.compile(r"_nohash_.*$")
_NOISE_MAX_SECONDS = 600.0


class DatasetError(ValueError):
    """A dataset folder or task request that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """One recording.

    Attributes:
        path: the audio file.
        word: its folder (``_unknown_`` / ``_silence_`` for the test archive's folders).
        speaker: speaker id (see `speaker_of`).
        split: ``"training"``, ``"validation"`` or ``"testing"``.
    """

    path: Path
    word: str
    speaker: str
    split: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled training input.

    ``start`` (samples) and ``gain`` matter for silence examples, which point at a long
    background-noise recording: the input is ``gain * noise[start:start + clip_samples]``.
    ``offset`` (samples) moves a word clip later (earlier when negative), zero-filled, so the
    window holds only part of its word (`build_task`'s ``partial_share``).
    """

    path: Path
    label: str
    speaker: str
    start: int = 0
    gain: float = 1.0
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """The examples of one split of a task; ``labels`` are in model output order."""

    labels: list
    examples: list

    def label_index(self, example: Example) -> int:
        """Class index of an example's label."""
        return self.labels.index(example.label)

    def counts(self) -> dict:
        """Examples per label, in label order."""
        c = collections.Counter(e.label for e in self.examples)
        return {label: c.get(label, 0) for label in self.labels}


def speaker_of(path) -> str:
    """Speaker id of a clip: the file name before ``_nohash_``.

    The test archive's ``_unknown_/<word>_<speaker>_nohash_<n>.wav`` gives ``<speaker>``.
    A name without ``_nohash_`` (e.g. ``_silence_/1037.wav``) is its own speaker: its stem.
    """
    name = Path(path).name
    if NOHASH not in name:
        return Path(name).stem
    prefix = name.split(NOHASH, 1)[0]
    return prefix.rsplit("_", 1)[-1]


def which_set(filename, validation_fraction: float = 0.1, testing_fraction: float = 0.1) -> str:
    """The dataset's own split rule (TensorFlow speech_commands ``which_set``).

    SHA-1 of the file name up to ``_nohash_``, as an integer modulo 2**27, scaled to a
    percentage (TensorFlow's unit): below ``100 * validation_fraction`` -> validation, below
    the sum -> testing.
    """
    hash_name = _NOHASH_RE.sub("", Path(filename).name)
    value = int(hashlib.sha1(hash_name.encode("utf-8")).hexdigest(), 16)
    percentage = (value % (_MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / _MAX_NUM_WAVS_PER_CLASS)
    if percentage < 100 * validation_fraction:
        return "validation"
    if percentage < 100 * (validation_fraction + testing_fraction):
        return "testing"
    return "training"


def index_dataset(root, validation_fraction: float = 0.1, testing_fraction: float = 0.1) -> list:
    """All clips under a dataset root, with their splits.

    Splits come from ``validation_list.txt`` and ``testing_list.txt`` (everything else is
    training); without both lists, from `which_set`. Clips in ``_unknown_/`` and
    ``_silence_/`` (folders only the official test archive has) are always ``testing``.

    Returns:
        Clips sorted by path relative to ``root``.

    Raises:
        DatasetError: ``root`` missing, not a folder, only one list present, or no clips.
    """
    root = _check_root(root)
    lists = {name: root / f"{name}_list.txt" for name in ("validation", "testing")}
    present = [name for name, p in lists.items() if p.is_file()]
    if len(present) == 1:
        missing = ({"validation", "testing"} - set(present)).pop()
        raise DatasetError(
            f"{root}: has {present[0]}_list.txt but no {missing}_list.txt; restore it, "
            "or remove both to split by the speaker hash rule"
        )
    listed = {}
    for name in present:
        for rel in read_list(lists[name]):
            listed[rel] = name
    clips = []
    for word, path in _audio_files(root):
        rel = path.relative_to(root).as_posix()
        if word in (UNKNOWN, SILENCE):
            split = "testing"
        elif present:
            split = listed.get(rel, "training")
        else:
            split = which_set(path.name, validation_fraction, testing_fraction)
        clips.append(Clip(path, word, speaker_of(path), split))
    if not clips:
        raise DatasetError(
            f"{root}: no clips found; expected the Speech Commands layout <word>/<speaker>_nohash_<n>.wav "
            "(run `kws-data download` or `kws-data synth` to make one)"
        )
    return clips


def read_list(path) -> list:
    """Relative clip paths from a ``*_list.txt`` file (one per line, blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip().replace("\\", "/") for line in f if line.strip()]


def split_by_speaker(
    clips: Iterable[Clip], validation_fraction: float = 0.1, testing_fraction: float = 0.1, salt: str = ""
) -> list:
    """Re-split clips by speaker: SHA-1 of ``salt + speaker`` as a fraction in [0, 1).

    For data whose official split does not suit an experiment (the real sample here is all
    official test set). Every clip of a speaker lands in the same split; a speaker keeps its
    split when clips are added; a different ``salt`` gives an independent split.
    """
    if not (0 <= validation_fraction and 0 <= testing_fraction and validation_fraction + testing_fraction <= 1):
        raise DatasetError(
            f"fractions must be >= 0 and sum to at most 1, got validation={validation_fraction}, testing={testing_fraction}"
        )
    out = []
    for clip in clips:
        u = _speaker_position(clip.speaker, salt)
        if u < validation_fraction:
            split = "validation"
        elif u < validation_fraction + testing_fraction:
            split = "testing"
        else:
            split = "training"
        out.append(dataclasses.replace(clip, split=split))
    return out


def _speaker_position(speaker: str, salt: str) -> float:
    """SHA-1 of ``salt + speaker`` as a number in [0, 1): where a speaker falls in a split."""
    digest = hashlib.sha1(f"{salt}{speaker}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def keep_training_speakers(clips: Iterable[Clip], fraction: float, salt: str = "training-speakers") -> list:
    """The clips, less those of the training split whose speaker falls outside ``fraction`` of
    the training speakers (by SHA-1 of ``salt + speaker``): a smaller training set of whole
    speakers, for learning curves. A smaller fraction keeps a subset of a larger one's
    speakers; validation and testing clips are all kept."""
    if not 0 < fraction <= 1:
        raise DatasetError(f"the share of training speakers must be in (0, 1], got {fraction}")
    return [c for c in clips if c.split != "training" or _speaker_position(c.speaker, salt) < fraction]


def noise_files(root) -> list:
    """Audio files in ``root/_background_noise_`` (or ``root`` itself if it holds them), sorted."""
    root = Path(root)
    folder = root / BACKGROUND_NOISE if (root / BACKGROUND_NOISE).is_dir() else root
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_audio_file(p) and not p.name.startswith("."))


def background_noise(root, sample_rate: int = 16000) -> list:
    """The background-noise recordings of a dataset as float32 mono arrays at ``sample_rate``."""
    return [_noise(str(p), sample_rate) for p in noise_files(root)]


@functools.lru_cache(maxsize=32)
def _noise(path: str, sample_rate: int) -> np.ndarray:
    audio = read_audio(path, sample_rate, max_seconds=_NOISE_MAX_SECONDS)
    audio.setflags(write=False)
    return audio


def build_task(
    clips: Sequence[Clip],
    task: str = "12",
    split: str = "training",
    root=None,
    silence_share: float = 0.1,
    unknown_share: float = 0.1,
    seed: int = 0,
    spec: FeatureSpec = FeatureSpec(),
    partial_share: float = 0.0,
    unknown_draw: str = "random",
) -> TaskSplit:
    """The examples of one split of a standard task.

    12-class: the ten commands keep their word; ``unknown_share`` (a fraction of the number
    of command clips) other-word clips are drawn as ``_unknown_`` (``unknown_draw``:
    ``"random"`` from the whole pool, ``"per-word"`` as many from each word), and ``silence_share``
    silence examples are cut from ``root``'s background noise at a random start and a gain
    uniform in [0, 1) -- as TensorFlow's recipe does. Clips already labelled ``_unknown_`` /
    ``_silence_`` (the test archive) are kept as they are and nothing is drawn for that label.
    ``partial_share`` command clips are drawn again, moved by `PARTIAL_OFFSET_MS` either way
    so only a fragment of the word stays in the window, as ``_unknown_``: what a stream's
    window sees as a word slides in or out, which should not fire.
    35-class: every clip of the 35 words, nothing added.

    Args:
        clips: from `index_dataset` (or `split_by_speaker`).
        task: ``"12"`` or ``"35"``.
        split: which split's clips to use.
        root: folder with ``_background_noise_/`` (needed only when silence is drawn).
        silence_share, unknown_share, partial_share: fractions of the command-word count.
        seed: drives every random choice; same inputs and seed -> same examples.
        spec: sample rate and clip length used to place silence windows.
        unknown_draw: one of `UNKNOWN_DRAWS`.

    Returns:
        A `TaskSplit`: targets in clip order, then unknown, then silence, then partial-word examples.
    """
    task = str(task)
    if task not in TASKS:
        raise DatasetError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    for name, value in (("silence_share", silence_share), ("unknown_share", unknown_share),
                        ("partial_share", partial_share)):
        if not (value >= 0 and math.isfinite(value)):
            raise DatasetError(f"{name} must be a finite number >= 0, got {value}")
    if unknown_draw not in UNKNOWN_DRAWS:
        raise DatasetError(f"unknown_draw {unknown_draw!r}: choose one of {', '.join(UNKNOWN_DRAWS)}")
    chosen = [c for c in clips if c.split == split]
    if task == "35":
        known = set(LABELS_35)
        return TaskSplit(list(LABELS_35), [_example(c, c.word) for c in chosen if c.word in known])

    rng = np.random.default_rng(seed)
    commands = set(COMMANDS)
    targets = [_example(c, c.word) for c in chosen if c.word in commands]
    given_unknown = [_example(c, UNKNOWN) for c in chosen if c.word == UNKNOWN]
    given_silence = [_example(c, SILENCE) for c in chosen if c.word == SILENCE]
    others = [c for c in chosen if c.word not in commands and c.word not in (UNKNOWN, SILENCE)]

    unknown = given_unknown
    if not given_unknown and others:
        n = min(len(others), math.ceil(len(targets) * unknown_share))
        draw = _draw_per_word if unknown_draw == "per-word" else _draw_random
        unknown = [_example(others[i], UNKNOWN) for i in draw(others, n, rng)]

    silence = given_silence
    n_silence = math.ceil(len(targets) * silence_share)
    if not given_silence and n_silence:
        silence = _silence_examples(root, n_silence, rng, spec)
    return TaskSplit(list(LABELS_12), targets + unknown + silence + _partial_examples(targets, partial_share, rng, spec))


def _draw_random(clips: list, n: int, rng: np.random.Generator) -> list:
    """``n`` distinct indices of ``clips``, sorted."""
    return sorted(rng.choice(len(clips), size=n, replace=False)) if n else []


def _draw_per_word(clips: list, n: int, rng: np.random.Generator) -> list:
    """``n`` indices of ``clips`` spread evenly over their words: each word gets ``n // words``
    (one more for ``n % words`` of them, chosen at random), its clips shuffled and, when it has
    fewer, taken round again; sorted."""
    by_word = collections.defaultdict(list)
    for i, clip in enumerate(clips):
        by_word[clip.word].append(i)
    words = sorted(by_word)
    extra = set(rng.choice(len(words), size=n % len(words), replace=False)) if n % len(words) else set()
    picks = []
    for k, word in enumerate(words):
        indices = [by_word[word][j] for j in rng.permutation(len(by_word[word]))]
        picks += [indices[j % len(indices)] for j in range(n // len(words) + (k in extra))]
    return sorted(picks)


def _partial_examples(targets: list, share: float, rng: np.random.Generator, spec: FeatureSpec) -> list:
    n = min(len(targets), math.ceil(len(targets) * share))
    if not n:
        return []
    picks = sorted(rng.choice(len(targets), size=n, replace=False))
    low, high = (ms * spec.sample_rate // 1000 for ms in PARTIAL_OFFSET_MS)
    offsets = rng.integers(low, high + 1, size=n) * rng.choice([-1, 1], size=n)
    return [dataclasses.replace(targets[i], label=UNKNOWN, offset=int(o)) for i, o in zip(picks, offsets)]


def _example(clip: Clip, label: str) -> Example:
    return Example(clip.path, label, clip.speaker)


def _silence_examples(root, n: int, rng: np.random.Generator, spec: FeatureSpec) -> list:
    files = noise_files(root) if root is not None else []
    if not files:
        raise DatasetError(
            f"silence examples are cut from background noise, but {root!s} has no {BACKGROUND_NOISE}/ recordings; "
            "pass root= a dataset that has them, or silence_share=0"
        )
    lengths = [len(_noise(str(p), spec.sample_rate)) for p in files]
    usable = [i for i, n_samples in enumerate(lengths) if n_samples >= spec.clip_samples]
    if not usable:
        raise DatasetError(f"every recording in {files[0].parent} is shorter than one clip ({spec.clip_samples} samples)")
    out = []
    for _ in range(n):
        i = usable[int(rng.integers(len(usable)))]
        start = int(rng.integers(0, lengths[i] - spec.clip_samples + 1))
        gain = float(rng.uniform(0.0, 1.0))
        out.append(Example(files[i], SILENCE, "", start, gain))
    return out


def load_example(example: Example, spec: FeatureSpec = FeatureSpec()) -> np.ndarray:
    """The waveform of an example: float32 ``(spec.clip_samples,)`` at ``spec.sample_rate``."""
    if example.label != SILENCE:
        audio = load_audio(example.path, spec)
        if example.offset:
            audio = moved(audio, example.offset)
    else:
        # Noise recordings are long and read for every silence example: keep them decoded.
        if example.start or Path(example.path).parent.name == BACKGROUND_NOISE:
            source = _noise(str(example.path), spec.sample_rate)
        else:
            source = read_audio(example.path, spec.sample_rate, max_seconds=_NOISE_MAX_SECONDS)
        if example.start >= len(source):
            raise DatasetError(
                f"{example.path}: silence window starts at sample {example.start}, past its end ({len(source)} samples)"
            )
        audio = fit_length(source[example.start : example.start + spec.clip_samples], spec.clip_samples)
    if example.gain != 1.0:
        audio = audio * np.float32(example.gain)
    # Always a fresh, writable array: the noise cache must not be changed through it.
    return np.array(audio, dtype=np.float32)


def moved(audio: np.ndarray, offset: int) -> np.ndarray:
    """``audio`` (``(..., samples)``) moved later by ``offset`` samples (earlier when negative),
    zero-filled, the same length."""
    out = np.zeros_like(audio)
    n = audio.shape[-1]
    if abs(offset) >= n:
        return out
    if offset >= 0:
        out[..., offset:] = audio[..., : n - offset]
    else:
        out[..., : n + offset] = audio[..., -offset:]
    return out


def describe_dataset(root, progress: bool = False, max_seconds: float = 1.0) -> dict:
    """Counts and problems of a dataset folder, as plain JSON-ready data.

    Every clip is opened (through the runtime's `read_audio` checks) so broken files show
    up here rather than mid-training.

    Returns:
        ``{"root", "split_source", "clips", "splits", "words": {word: {split: n}},
        "speakers": {"total", <split>: n}, "duration_s": {"min", "mean", "max"},
        "short_clips", "sample_rates": {rate: n}, "channels": {n: n},
        "background_noise": [{"file", "seconds", "sample_rate"}], "problems": [{"path", "problem"}]}``.
        Problems: unreadable files, sample rate not 16 kHz, more than one channel, longer than
        ``max_seconds``, all-zero audio, names without ``_nohash_``, a speaker in several
        splits, list entries with no file or in both lists.
    """
    from tqdm import tqdm

    root = _check_root(root)
    clips = index_dataset(root)
    has_lists = (root / "validation_list.txt").is_file()
    problems = _list_problems(root) if has_lists else []
    words: dict = collections.defaultdict(lambda: {s: 0 for s in SPLITS})
    speakers: dict = collections.defaultdict(set)
    formats = []
    for clip in tqdm(clips, unit=" clips", desc="checking", disable=not progress, leave=False):
        rel = clip.path.relative_to(root).as_posix()
        words[clip.word][clip.split] += 1
        if clip.word != SILENCE:
            speakers[clip.speaker].add(clip.split)
            if NOHASH not in clip.path.name:
                problems.append({"path": rel, "problem": "name has no _nohash_: cannot tell its speaker"})
        found, info = _clip_problems(clip.path, max_seconds)
        problems += [{"path": rel, "problem": problem} for problem in found]
        if info is not None:
            formats.append(info)
    problems += [{"path": speaker, "problem": f"speaker appears in several splits: {', '.join(sorted(splits))}"}
                 for speaker, splits in sorted(speakers.items()) if len(splits) > 1]
    noise, noise_problems = _describe_noise(root)
    problems += noise_problems
    split_counts = collections.Counter(c.split for c in clips)
    return {
        "root": str(root),
        "split_source": "validation_list.txt/testing_list.txt" if has_lists else "speaker hash rule",
        "clips": len(clips),
        "splits": {s: split_counts.get(s, 0) for s in SPLITS},
        "words": {w: words[w] for w in sorted(words)},
        "speakers": {"total": len(speakers), **{s: sum(1 for v in speakers.values() if s in v) for s in SPLITS}},
        **_format_summary(formats, max_seconds),
        "background_noise": noise,
        "problems": problems,
    }


def _list_problems(root: Path) -> list:
    """Entries of ``validation_list.txt`` / ``testing_list.txt`` with no file or in both lists."""
    problems, listed = [], {}
    for name in ("validation", "testing"):
        for rel in read_list(root / f"{name}_list.txt"):
            if rel in listed:
                problems.append({"path": rel, "problem": f"listed in both {listed[rel]}_list.txt and {name}_list.txt"})
            listed[rel] = name
            if not (root / rel).is_file():
                problems.append({"path": rel, "problem": f"in {name}_list.txt but the file does not exist"})
    return problems


def _clip_problems(path: Path, max_seconds: float):
    """What is wrong with one clip, and its soundfile info (None when it cannot be read)."""
    import soundfile

    try:
        info = soundfile.info(str(path))
        audio = read_audio(path, info.samplerate, max_seconds=_NOISE_MAX_SECONDS)
    except (AudioError, soundfile.SoundFileError, RuntimeError) as exc:
        return [f"unreadable: {exc.reason if isinstance(exc, AudioError) else exc}"], None
    problems = []
    seconds = info.frames / info.samplerate
    if info.samplerate != 16000:
        problems.append(f"sample rate {info.samplerate} Hz, expected 16000")
    if info.channels != 1:
        problems.append(f"{info.channels} channels, expected mono")
    if seconds > max_seconds + 1e-9:
        problems.append(f"{seconds:.3f} s long, over {max_seconds:g} s")
    if not np.any(audio):
        problems.append("digital silence (all samples are zero)")
    return problems, info


def _format_summary(infos: Sequence, max_seconds: float) -> dict:
    """Durations, sample rates and channel counts of the readable clips (soundfile infos)."""
    durations = [info.frames / info.samplerate for info in infos]
    stats = {"min": min, "mean": lambda d: float(np.mean(d)), "max": max}
    return {
        "duration_s": {name: round(stat(durations), 4) if durations else None for name, stat in stats.items()},
        "short_clips": sum(1 for seconds in durations if seconds < max_seconds - 1e-9),
        "sample_rates": {str(k): v for k, v in sorted(collections.Counter(i.samplerate for i in infos).items())},
        "channels": {str(k): v for k, v in sorted(collections.Counter(i.channels for i in infos).items())},
    }


def _describe_noise(root: Path) -> tuple:
    """``{"file", "seconds", "sample_rate"}`` of each readable background-noise file, and the problems of the others."""
    import soundfile

    folder = root / BACKGROUND_NOISE
    noise, problems = [], []
    for path in noise_files(folder) if folder.is_dir() else []:
        try:
            info = soundfile.info(str(path))
            noise.append({"file": path.name, "seconds": round(info.frames / info.samplerate, 2), "sample_rate": info.samplerate})
        except (soundfile.SoundFileError, RuntimeError) as exc:
            problems.append({"path": path.relative_to(root).as_posix(), "problem": f"unreadable: {exc}"})
    return noise, problems


def _check_root(root) -> Path:
    if root is None:
        raise DatasetError("no dataset folder given")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (expected a dataset root with <word>/ subfolders)")
    return root


def _audio_files(root: Path):
    """(word, path) for every clip: audio files one level below root, noise excluded."""
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if not folder.is_dir() or folder.name == BACKGROUND_NOISE or folder.name.startswith("."):
            continue
        for path in sorted(folder.iterdir(), key=lambda p: p.name):
            if path.is_file() and is_audio_file(path) and not path.name.startswith("."):
                yield folder.name, path


__all__ = [
    "BACKGROUND_NOISE", "COMMANDS", "LABELS_12", "LABELS_35", "SILENCE", "SPLITS", "SPLIT_SEED_OFFSET", "TASKS", "UNKNOWN",
    "UNKNOWN_DRAWS",
    "AudioError", "Clip", "DatasetError", "Example", "TaskSplit",
    "background_noise", "build_task", "describe_dataset", "index_dataset", "load_example", "noise_files", "read_list",
    "speaker_of", "split_by_speaker", "which_set",
]  # fmt: skip

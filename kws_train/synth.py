"""Synthetic Speech Commands from eSpeak NG.

eSpeak NG comes from the ``espeakng-loader`` wheel (shared library and voice data), called
through ctypes, so no system package is needed. A "speaker" is one voice with one variant
(``en-US+f3``, ``en-GB-scotland+klatt2`` ...); its id is a short hash of that pair and it
decides the split, exactly as a real speaker id does, so no voice leaks across splits.

Every random choice is drawn up front from ``seed`` into a list of jobs, so the output does
not depend on how many worker processes render it. eSpeak keeps global state and is not
thread-safe: each worker is a separate process with its own engine.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soundfile

from kws_runtime.audio import read_audio
from kws_runtime.files import make_shareable

from .dataset import BACKGROUND_NOISE, LABELS_35, NOHASH, noise_files, which_set

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
# Accents eSpeak NG ships for English (file names under espeak-ng-data/lang/gmw).
VOICES = ("en", "en-US", "en-US-nyc", "en-GB-scotland", "en-GB-x-rp", "en-GB-x-gbclan", "en-GB-x-gbcwmd", "en-029")
# Voice variants (espeak-ng-data/voices/!v): formant-shaped male/female voices, the Klatt
# synthesizer variants, and a few named characters. Robotic/whisper variants are left out.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "Alex", "Andy", "Annie", "belinda", "benjamin", "david", "edward",
    "grandma", "grandpa", "john", "linda", "max", "steph",
)  # fmt: skip
RATE_WPM = (120, 230)
PITCH = (25, 75)  # eSpeak 0..100, per speaker
PITCH_JITTER = 8  # per clip, around the speaker's pitch
PITCH_RANGE = (20, 90)
PEAK_DBFS = (-18.0, -1.0)
SNR_DB = (5.0, 25.0)
BATCH = 64  # clips rendered by one forked process (a fork costs a few ms)

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_EE_OK = 0
_WORD_RE = re.compile(r"^[a-z][a-z'-]*$")


class SynthError(RuntimeError):
    """Synthesis that cannot run: missing engine, unknown voice, bad arguments, busy output."""


@dataclasses.dataclass(frozen=True)
class SynthSpeaker:
    """A synthetic speaker: one eSpeak voice with one variant."""

    voice: str
    variant: str

    @property
    def name(self) -> str:
        """eSpeak's name for it, ``voice+variant``."""
        return f"{self.voice}+{self.variant}" if self.variant else self.voice

    @property
    def speaker_id(self) -> str:
        """8 hex digits like the real dataset's ids; stable across runs and machines."""
        return hashlib.sha1(f"espeak-ng:{self.name}".encode()).hexdigest()[:8]


def synthetic_speakers(voices: Sequence[str] = VOICES, variants: Sequence[str] = VARIANTS) -> list:
    """Every voice x variant pair, in a fixed order."""
    speakers = [SynthSpeaker(v, x) for v in voices for x in variants]
    ids = [s.speaker_id for s in speakers]
    if len(set(ids)) != len(ids):
        raise SynthError("two synthetic speakers hash to the same id; rename a voice or variant")
    return speakers


class Espeak:
    """One eSpeak NG engine in this process (synchronous mode, samples collected in memory)."""

    _instance: Optional["Espeak"] = None

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise SynthError("eSpeak NG is not installed: pip install espeakng-loader") from None
        try:
            self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as exc:
            raise SynthError(f"cannot load eSpeak NG from espeakng-loader: {exc}") from None
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if self.sample_rate <= 0:
            raise SynthError(f"eSpeak NG failed to initialise with data at {data_path}")
        self.version = lib.espeak_Info(None).decode()
        # Breathy and Klatt voices draw noise from libc's rand() (and newer eSpeak NG from its
        # own generator); seeding both per utterance makes a clip repeatable.
        self._seeders = []
        try:
            libc = ctypes.CDLL(None)
            libc.srand.argtypes = [ctypes.c_uint]
            self._seeders.append(libc.srand)
        except (OSError, AttributeError):
            pass
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            self._seeders.append(lib.espeak_ng_SetRandSeed)
        self._chunks: list = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: Optional[str] = None

    @classmethod
    def get(cls) -> "Espeak":
        """The process-wide engine, created on first use."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _collect(self, wav, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0

    def speak(
        self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50, seed: int = 0
    ) -> np.ndarray:
        """int16 samples at `sample_rate` (22050 Hz) of ``text`` in ``voice`` (``name+variant``).

        ``rate`` in words per minute, ``pitch`` and ``pitch_range`` 0..100; ``seed`` feeds the
        noise of breathy voices. The synthesizer also carries state from earlier utterances
        in this process (see `_render_batch`).
        """
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                self._voice = None
                raise SynthError(f"eSpeak NG has no voice {voice!r}")
            self._voice = voice
        settings = ((_ESPEAK_RATE, rate), (_ESPEAK_PITCH, pitch), (_ESPEAK_RANGE, pitch_range), (_ESPEAK_VOLUME, 100))
        for parameter, value in settings:
            self._lib.espeak_SetParameter(parameter, int(value), 0)
        for seeder in self._seeders:
            seeder(seed & 0x7FFFFFFF)
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise SynthError(f"eSpeak NG failed to speak {text!r} (error {status})")
        out = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks = []
        return out


def synthesize_word(
    word: str, speaker: SynthSpeaker, rate: int = 175, pitch: int = 50, pitch_range: int = 50, seed: int = 0
) -> np.ndarray:
    """One utterance, trimmed of leading/trailing silence: float32 at 16 kHz, <= 1 s."""
    import soxr

    engine = Espeak.get()
    raw = engine.speak(word, speaker.name, rate, pitch, pitch_range, seed).astype(np.float32) / 32768.0
    audio = soxr.resample(raw, engine.sample_rate, SAMPLE_RATE).astype(np.float32)
    return _trim(audio)[:CLIP_SAMPLES]


def _trim(audio: np.ndarray, threshold: float = 0.02, margin: int = 160) -> np.ndarray:
    # Relative threshold: eSpeak pads with digital silence and a little decay.
    loud = np.flatnonzero(np.abs(audio) > threshold * (np.abs(audio).max() + 1e-12))
    if loud.size == 0:
        return audio[:0]
    return audio[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


@dataclasses.dataclass(frozen=True)
class _Job:
    rel: str
    word: str
    speaker: SynthSpeaker
    rate: int
    pitch: int
    pitch_range: int
    offset: float  # fraction of the free space before the word
    peak_dbfs: float
    noise: int  # index into the noise list, -1 for none
    noise_start: float  # fraction of the noise recording
    snr_db: float
    seed: int  # for eSpeak's breath noise


@dataclasses.dataclass(frozen=True)
class SynthReport:
    """What `synthesize_dataset` wrote."""

    out: Path
    clips: int
    speakers: int
    splits: dict
    seconds: float
    jobs: int

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else float("inf")


def plan(
    words: Sequence[str],
    per_word: int,
    seed: int = 0,
    speakers: Optional[Sequence[SynthSpeaker]] = None,
    n_noise: int = 0,
    noise_probability: float = 0.8,
    snr_db=SNR_DB,
) -> list:
    """Every clip to render, with all its random parameters drawn from ``seed``."""
    speakers = list(speakers) if speakers is not None else synthetic_speakers()
    rng = np.random.default_rng(seed)
    base_pitch = {s: int(rng.integers(PITCH[0], PITCH[1] + 1)) for s in speakers}
    jobs = []
    counts: dict = {}
    for word in words:
        for _ in range(per_word):
            speaker = speakers[int(rng.integers(len(speakers)))]
            n = counts.get((word, speaker), 0)
            counts[(word, speaker)] = n + 1
            pitch = int(np.clip(base_pitch[speaker] + rng.integers(-PITCH_JITTER, PITCH_JITTER + 1), 0, 100))
            use_noise = n_noise > 0 and rng.random() < noise_probability
            jobs.append(
                _Job(
                    rel=f"{word}/{speaker.speaker_id}{NOHASH}{n}.wav",
                    word=word,
                    speaker=speaker,
                    rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                    pitch=pitch,
                    pitch_range=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
                    offset=float(rng.random()),
                    peak_dbfs=float(rng.uniform(*PEAK_DBFS)),
                    noise=int(rng.integers(n_noise)) if use_noise else -1,
                    noise_start=float(rng.random()),
                    snr_db=float(rng.uniform(*snr_db)),
                    seed=int(rng.integers(2**31)),
                )
            )
    # Rendering in speaker order keeps eSpeak voice switches (a few ms each) rare.
    order = {s: i for i, s in enumerate(speakers)}
    jobs.sort(key=lambda j: (order[j.speaker], j.rel))
    return jobs


_WORKER_NOISE: list = []


def _init_worker(noise_paths: Sequence[str]) -> None:
    global _WORKER_NOISE
    _WORKER_NOISE = [read_audio(p, SAMPLE_RATE, max_seconds=600.0) for p in noise_paths]
    Espeak.get()


def _render(job: _Job, out_dir: str) -> tuple:

    speech = synthesize_word(job.word, job.speaker, job.rate, job.pitch, job.pitch_range, job.seed)
    if speech.size == 0:
        raise SynthError(f"eSpeak NG produced no sound for {job.word!r} with {job.speaker.name}")
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    start = int(job.offset * (CLIP_SAMPLES - len(speech)))
    clip[start : start + len(speech)] = speech * np.float32(10 ** (job.peak_dbfs / 20) / np.abs(speech).max())
    if job.noise >= 0:
        noise = _WORKER_NOISE[job.noise]
        n0 = int(job.noise_start * (len(noise) - CLIP_SAMPLES))
        segment = noise[n0 : n0 + CLIP_SAMPLES]
        speech_rms = float(np.sqrt(np.mean(clip[start : start + len(speech)] ** 2)))
        noise_rms = float(np.sqrt(np.mean(segment**2)))
        if noise_rms > 0:
            clip += segment * np.float32(speech_rms / (noise_rms * 10 ** (job.snr_db / 20)))
        peak = float(np.abs(clip).max())
        if peak > 0.99:
            clip *= np.float32(0.99 / peak)
    path = os.path.join(out_dir, job.rel)
    soundfile.write(path, clip, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return job.rel, len(speech)


def _render_batch(args) -> list:
    """Render a batch in a child forked from this worker's pristine eSpeak.

    eSpeak's synthesizer keeps state between utterances (glottal phase, pitch flutter,
    filter memories), so a clip depends on what the process spoke before it. Forking a
    fresh child per batch -- batches fixed by the plan -- makes every file a function of
    the seed alone, however the batches are spread over workers.
    """
    batch, out_dir = args
    if not hasattr(os, "fork"):
        return [_render(job, out_dir) for job in batch]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: render, report, and leave without running the parent's cleanup
        os.close(read_fd)
        code = 0
        try:
            payload = pickle.dumps(("ok", [_render(job, out_dir) for job in batch]))
        except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
            payload, code = pickle.dumps(("error", f"{type(exc).__name__}: {exc}")), 1
        try:
            with os.fdopen(write_fd, "wb") as f:
                f.write(payload)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise SynthError(f"a synthesis process died (wait status {status}) while rendering {batch[0].rel}")
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise SynthError(value)
    return value


def check_words(words: Sequence[str]) -> list:
    """Lower-cased, de-duplicated words, each usable as a folder name and as eSpeak text."""
    out = []
    for word in words:
        w = word.strip().lower()
        if not _WORD_RE.match(w):
            raise SynthError(f"cannot synthesize {word!r}: use letters (and ' or -), e.g. yes, marvin")
        if w not in out:
            out.append(w)
    if not out:
        raise SynthError("no words to synthesize")
    return out


def default_jobs() -> int:
    """Worker processes: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def synthesize_dataset(
    out,
    words: Optional[Sequence[str]] = None,
    per_word: int = 100,
    seed: int = 0,
    noise=None,
    jobs: Optional[int] = None,
    noise_probability: float = 0.8,
    snr_db=SNR_DB,
    progress: bool = True,
    overwrite: bool = False,
    validation_fraction: float = 0.1,
    testing_fraction: float = 0.1,
) -> SynthReport:
    """Write a synthetic dataset in the Speech Commands layout.

    ``out/<word>/<speaker>_nohash_<n>.wav`` (16 kHz mono 16-bit, exactly 1 s: the word at a
    random offset and peak level, optionally over real background noise at a random SNR),
    ``validation_list.txt`` / ``testing_list.txt`` (the hash rule on the speaker id, so the
    lists and `which_set` agree), ``speakers.csv`` and ``synth.json`` (the recipe).
    The dataset is built in a temporary folder beside ``out`` and renamed into place.
    Workers are spawned processes: a script calling this must do so under
    ``if __name__ == "__main__":``, as with any multiprocessing code.

    Args:
        out: new (or empty) folder.
        words: default: the 35 words of Speech Commands v0.02.
        per_word: clips per word.
        seed: same seed -> byte-identical files, whatever ``jobs`` is.
        noise: folder of noise recordings, or a dataset root with ``_background_noise_/``.
        jobs: worker processes (default: the CPUs available).
        noise_probability: fraction of clips mixed with noise when ``noise`` is given.
        snr_db: (low, high) speech-to-noise ratio range in dB.
        overwrite: replace an existing synthetic dataset (one with ``synth.json``) at ``out``.

    Raises:
        SynthError: bad arguments, ``out`` not empty, no eSpeak NG, no noise recordings.
    """
    words = check_words(list(LABELS_35) if words is None else words)
    jobs = _check_options(per_word, noise_probability, snr_db, default_jobs() if jobs is None else int(jobs))
    out = Path(out)
    _check_out(out, overwrite)
    noise_paths = _noise_paths(noise)
    Espeak.get()  # fail here, with a clear message, rather than in every worker

    speakers = synthetic_speakers()
    todo = plan(words, per_word, seed, speakers, len(noise_paths), noise_probability, snr_db)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    make_shareable(staging, folder=True)  # mkdtemp makes it private; the dataset should not be
    t0 = time.perf_counter()
    try:
        for word in words:
            (staging / word).mkdir()
        _render_all(todo, staging, noise_paths, jobs, progress)
        seconds = time.perf_counter() - t0
        used, splits = _write_splits(staging, todo, validation_fraction, testing_fraction)
        recipe = {
            "generator": "kws_train.synth",
            "engine": f"eSpeak NG {Espeak.get().version}",
            "seed": seed,
            "words": words,
            "per_word": per_word,
            "voices": list(VOICES),
            "variants": list(VARIANTS),
            "rate_wpm": list(RATE_WPM),
            "pitch": list(PITCH),
            "pitch_range": list(PITCH_RANGE),
            "peak_dbfs": list(PEAK_DBFS),
            "noise_files": [Path(p).name for p in noise_paths],
            "noise_probability": noise_probability if noise_paths else 0.0,
            "snr_db": list(snr_db),
            "sample_rate": SAMPLE_RATE,
            "clips": len(todo),
            "speakers": len(used),
            "splits": splits,
        }
        (staging / "synth.json").write_text(json.dumps(recipe, indent=2) + "\n")
        _write_background_noise(staging / BACKGROUND_NOISE, noise_paths, seed)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SynthReport(out, len(todo), len(used), splits, seconds, jobs)


def _write_background_noise(folder: Path, noise_paths: Sequence[str], seed: int, seconds: int = 60) -> None:
    """Give the dataset its own ``_background_noise_/``, as Speech Commands has one.

    The trainer cuts ``_silence_`` examples from it and mixes it into training clips, so a
    synthetic dataset must carry noise to train the 12-class task offline. The given noise
    recordings are copied; without any, seeded white and pink noise (the two synthetic
    recordings of the real dataset) are generated.
    """
    folder.mkdir()
    if noise_paths:
        for path in noise_paths:
            shutil.copyfile(path, folder / Path(path).name)
        return
    rng = np.random.default_rng([seed, 0x6E6F697365])
    white = rng.standard_normal(seconds * SAMPLE_RATE)
    # Pink: shape white noise's spectrum by 1/sqrt(f), i.e. power falling 3 dB per octave.
    spectrum = np.fft.rfft(rng.standard_normal(seconds * SAMPLE_RATE))
    spectrum[1:] /= np.sqrt(np.arange(1, spectrum.size))
    spectrum[0] = 0.0
    pink = np.fft.irfft(spectrum, n=seconds * SAMPLE_RATE)
    for name, noise in (("white_noise.wav", white), ("pink_noise.wav", pink)):
        noise = 0.1 * noise / np.sqrt(np.mean(noise**2))  # -20 dBFS RMS
        soundfile.write(str(folder / name), np.clip(noise, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")


def _check_options(per_word: int, noise_probability: float, snr_db, jobs: int) -> int:
    if per_word < 1:
        raise SynthError(f"--per-word must be at least 1, got {per_word}")
    if not (0.0 <= noise_probability <= 1.0):
        raise SynthError(f"noise probability must be in [0, 1], got {noise_probability}")
    if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
        raise SynthError(f"SNR range must be (low, high) with low <= high, got {snr_db}")
    if jobs < 1:
        raise SynthError(f"--jobs must be at least 1, got {jobs}")
    return jobs


def _noise_paths(noise) -> list:
    if noise is None:
        return []
    noise = Path(noise)
    if not noise.is_dir():
        raise SynthError(f"--noise {noise}: no such folder")
    paths = [str(p) for p in noise_files(noise)]
    if not paths:
        raise SynthError(f"--noise {noise}: no audio files there (nor in {noise / BACKGROUND_NOISE})")
    return paths


def _write_splits(staging: Path, todo: list, validation_fraction: float, testing_fraction: float) -> tuple:
    """``validation_list.txt``, ``testing_list.txt`` (the hash rule on each speaker) and
    ``speakers.csv``; returns the speakers used and the clips per split."""
    used = sorted({j.speaker for j in todo}, key=lambda s: s.speaker_id)
    split_of = {s: which_set(f"{s.speaker_id}{NOHASH}0.wav", validation_fraction, testing_fraction) for s in used}
    for name in ("validation", "testing"):
        rels = sorted(j.rel for j in todo if split_of[j.speaker] == name)
        (staging / f"{name}_list.txt").write_text("".join(r + "\n" for r in rels))
    (staging / "speakers.csv").write_text(
        "speaker,voice,variant,split\n" + "".join(f"{s.speaker_id},{s.voice},{s.variant},{split_of[s]}\n" for s in used)
    )
    splits = {name: sum(1 for j in todo if split_of[j.speaker] == name) for name in ("training", "validation", "testing")}
    return used, splits


def _render_all(todo: list, staging: Path, noise_paths: list, jobs: int, progress: bool) -> None:
    from tqdm import tqdm

    # Fixed batches of consecutive jobs (one speaker mostly): the unit of determinism.
    batches = [(todo[i : i + BATCH], str(staging)) for i in range(0, len(todo), BATCH)]
    # spawn: workers start clean, never inheriting this process's threads or eSpeak state.
    ctx = multiprocessing.get_context("spawn")
    with tqdm(total=len(todo), unit=" clips", desc="synthesizing", disable=not progress, leave=False) as bar:
        with ctx.Pool(min(jobs, len(batches)), initializer=_init_worker, initargs=(noise_paths,)) as pool:
            for done in pool.imap_unordered(_render_batch, batches):
                bar.update(len(done))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} is a file; give a new folder for the synthetic dataset")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SynthError(f"{out} is not empty; choose a new folder or pass --overwrite to replace a synthetic dataset")
        if not (out / "synth.json").is_file():
            raise SynthError(f"{out} is not a synthetic dataset (no synth.json); refusing to replace it")


def _swap_into_place(staging: Path, out: Path) -> None:
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)

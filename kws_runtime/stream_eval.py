"""Stream evaluation: long test streams with known keyword times, and the detector's hit rate,
wrong words, false alarms per hour and latency on them.

A stream is background noise (the folder's ``_background_noise_`` recordings) with real clips
placed at known times: keywords at least ``gap`` seconds apart, unknown words (other folders)
between them as distractors, the noise scaled to a signal-to-noise ratio against the mean
power of the placed clips. A keyword-free stream (noise and unknown words) measures false
alarms. Streams are seeded, and written as WAV plus a CSV of what was placed where, so other
tools can score the same audio.

Each stream is scored once; the decisions are then replayed (`kws_runtime.stream.Smoother`)
under every threshold of the sweep.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .audio import AUDIO_EXTENSIONS, read_audio
from .files import atomic_path, write_json_atomic
from .stream import QUIET_LABELS, Detector, DetectorConfig, Event, Smoother

COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
_SKIP = ("_background_noise_", "_silence_", "_unknown_")


@dataclasses.dataclass(frozen=True)
class Placed:
    """A clip in a stream: ``label`` (the word, or ``_unknown_`` for a distractor), its start
    and end in seconds, and the file it came from."""

    label: str
    start: float
    end: float
    source: str


def _clips(root: Path) -> dict:
    lists = root / "testing_list.txt"
    if lists.is_file():  # a dataset with its own split: only its test speakers
        names = [line.strip() for line in lists.read_text().splitlines() if line.strip()]
        paths = [root / n for n in names]
    else:  # a folder of unseen speakers: all of it
        paths = [p for p in sorted(root.glob("*/*")) if p.suffix.lower() in AUDIO_EXTENSIONS]
    words: dict = {}
    for path in paths:
        if path.parent.name not in _SKIP:
            words.setdefault(path.parent.name, []).append(path)
    return words


def build_stream(root, seconds: float, snr_db: float, seed: int, keywords: bool = True, gap: float = 2.0,
                 sample_rate: int = 16000) -> tuple:
    """``(audio float32, [Placed, ...])``: a seeded stream of ``seconds`` from ``root``'s clips.

    Keywords (the ten commands) follow each other at least ``gap`` seconds apart, with an
    unknown word in every other gap; with ``keywords=False`` only unknown words are placed.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    words = _clips(root)
    commands = [w for w in COMMANDS if w in words]
    others = [w for w in words if w not in COMMANDS]
    if keywords and not commands:
        raise ValueError(f"{root}: no clips of the ten commands to place")
    noise_files = sorted(p for p in (root / "_background_noise_").glob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not noise_files:
        raise ValueError(f"{root}: no _background_noise_/ recordings to put the clips in")
    n = int(seconds * sample_rate)
    audio = np.zeros(n, dtype=np.float64)
    placed = []
    t = 1.0
    while True:
        kind = "keyword" if keywords and (not placed or placed[-1].label == "_unknown_" or not others) else "unknown"
        if kind == "unknown" and not others:
            break
        word = str(rng.choice(commands if kind == "keyword" else others))
        path = words[word][int(rng.integers(len(words[word])))]
        clip = read_audio(path, sample_rate)
        start = int(t * sample_rate)
        if start + len(clip) > n - sample_rate:
            break
        audio[start : start + len(clip)] += clip
        placed.append(Placed(word if kind == "keyword" else "_unknown_", start / sample_rate,
                             (start + len(clip)) / sample_rate, os.path.relpath(path, root)))
        t = (start + len(clip)) / sample_rate + (gap if kind == "keyword" else 0.5) * rng.uniform(1.0, 1.5)
    speech = np.mean([np.mean(audio[int(p.start * sample_rate) : int(p.end * sample_rate)] ** 2) for p in placed]) if placed else 1e-4
    noise = _noise(noise_files, n, rng, sample_rate)
    noise *= np.sqrt(speech / max(np.mean(noise**2), 1e-12) / 10 ** (snr_db / 10))
    mixed = audio + noise
    peak = np.abs(mixed).max()
    if peak > 0.99:  # keep the file in range; the ratio of speech to noise is unchanged
        mixed *= 0.99 / peak
    return mixed.astype(np.float32), placed


def _noise(files: list, n: int, rng, sample_rate: int) -> np.ndarray:
    pieces, have = [], 0
    while have < n:
        noise = read_audio(files[int(rng.integers(len(files)))], sample_rate, max_seconds=3600)
        start = int(rng.integers(max(1, len(noise) - 1)))
        piece = noise[start:][: n - have]
        pieces.append(piece)
        have += len(piece)
    return np.concatenate(pieces).astype(np.float64)


def write_stream(folder, name: str, audio: np.ndarray, placed: Sequence[Placed], sample_rate: int = 16000) -> Path:
    """``folder/name.wav`` and ``folder/name.csv`` (label, start, end, source); returns the WAV."""
    import soundfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wav = folder / f"{name}.wav"
    with atomic_path(wav, suffix=".wav") as tmp:
        soundfile.write(str(tmp), audio, sample_rate, subtype="PCM_16")
    with atomic_path(folder / f"{name}.csv", suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["label", "start", "end", "source"])
            for p in placed:
                writer.writerow([p.label, repr(p.start), repr(p.end), p.source])  # exact: they round-trip
    return wav


def read_truth(path) -> list:
    """The `Placed` rows of a stream's CSV."""
    with open(path, newline="", encoding="utf-8") as stream:
        return [Placed(r["label"], float(r["start"]), float(r["end"]), r["source"]) for r in csv.DictReader(stream)]


def match(events: Sequence[Event], truth: Sequence[Placed], tolerance: float = 1.0) -> dict:
    """Count hits (the right word fired between the keyword's start and ``tolerance`` seconds
    after its end), wrong words (another word fired there), misses and false alarms (events
    near no keyword), and the latency of each hit (event time minus keyword end)."""
    keywords = [p for p in truth if p.label not in QUIET_LABELS]
    claimed = [None] * len(keywords)
    false_alarms = 0
    for event in events:
        slot = next((i for i, k in enumerate(keywords) if k.start <= event.time <= k.end + tolerance and claimed[i] is None), None)
        if slot is None:
            false_alarms += 1
        else:
            claimed[slot] = event
    hits = [(k, e) for k, e in zip(keywords, claimed) if e is not None and e.label == k.label]
    wrong = sum(1 for k, e in zip(keywords, claimed) if e is not None and e.label != k.label)
    return {"keywords": len(keywords), "hits": len(hits), "wrong_word": wrong,
            "misses": len(keywords) - len(hits) - wrong, "false_alarms": false_alarms,
            "latency_s": [round(e.time - k.end, 3) for k, e in hits]}


def record_scores(detector: Detector, audio: np.ndarray) -> tuple:
    """``(times ms, probabilities)`` of every window of ``audio`` (the detector is reset)."""
    times, scores = [], []
    detector.on_scores = lambda t, p: (times.append(t), scores.append(p))
    try:
        detector.reset()
        detector.feed(audio)
        detector.flush()
    finally:
        detector.on_scores = None
    return np.array(times), np.array(scores)


def replay(times: np.ndarray, scores: np.ndarray, config: DetectorConfig, labels) -> list:
    """The events a detector with ``config`` makes from recorded window scores."""
    smoother = Smoother(config, labels)
    return [e for e in (smoother.update(t, p) for t, p in zip(times, scores)) if e is not None]


def evaluate(bundle, root, out, *, minutes: float = 5.0, snrs: Sequence[float] = (20.0, 10.0, 0.0), seed: int = 0,
             thresholds: Sequence[float] = tuple(np.round(np.arange(0.3, 0.96, 0.05), 2)),
             config: DetectorConfig = DetectorConfig(), artifact: Optional[str] = None, log=print) -> dict:
    """Build the streams into ``out``, score them, sweep the threshold; writes ``report.json``
    (and ``curve.png`` when matplotlib is installed). Returns the report."""
    out = Path(out)
    detector = Detector(bundle, config, artifact=artifact, threads=1)
    rate = detector.spec.sample_rate
    report = {"bundle": str(bundle), "data": str(root), "minutes": minutes, "seed": seed,
              "config": dataclasses.asdict(config), "tolerance_s": 1.0, "snr": {}}
    quiet_audio, quiet_truth = build_stream(root, 60 * minutes, snrs[len(snrs) // 2], seed + 1000, keywords=False, sample_rate=rate)
    write_stream(out, "keyword-free", quiet_audio, quiet_truth, rate)
    log(f"keyword-free stream: {minutes:g} min, {len(quiet_truth)} unknown words")
    quiet = record_scores(detector, quiet_audio)
    hours = len(quiet_audio) / rate / 3600
    grid = sorted(set(thresholds) | {config.threshold})
    configs = {t: dataclasses.replace(config, threshold=float(t)) for t in grid}
    quiet_events = {t: len(replay(*quiet, cfg, detector.labels)) for t, cfg in configs.items()}
    for snr in snrs:
        audio, truth = build_stream(root, 60 * minutes, snr, seed, sample_rate=rate)
        write_stream(out, f"stream-{snr:g}dB", audio, truth, rate)
        log(f"stream at {snr:g} dB: {minutes:g} min, {sum(p.label not in QUIET_LABELS for p in truth)} keywords")
        times, scores = record_scores(detector, audio)
        sweep = []
        stream_hours = len(audio) / rate / 3600
        for threshold, cfg in configs.items():
            counts = match(replay(times, scores, cfg, detector.labels), truth)
            # false alarms: the keyword-free stream's events and the events near no keyword here
            fa_per_hour = (quiet_events[threshold] + counts["false_alarms"]) / (hours + stream_hours)
            sweep.append({"threshold": float(threshold), "hit_rate": counts["hits"] / max(1, counts["keywords"]),
                          "wrong_word_rate": counts["wrong_word"] / max(1, counts["keywords"]),
                          "false_alarms_per_hour": fa_per_hour,
                          "median_latency_s": float(np.median(counts["latency_s"])) if counts["latency_s"] else None,
                          "keywords": counts["keywords"]})
        at_default = next(r for r in sweep if r["threshold"] == config.threshold)
        within = [r for r in sweep if r["false_alarms_per_hour"] <= 1.0]
        report["snr"][f"{snr:g}"] = {"default": at_default, "sweep": sweep,
                                     "best_at_1_fa_per_hour": max(within, key=lambda r: r["hit_rate"]) if within else None}
        log(f"  at threshold {config.threshold:g}: hits {100 * at_default['hit_rate']:.1f} %, "
            f"false alarms {at_default['false_alarms_per_hour']:.1f}/h")
    write_json_atomic(out / "report.json", report)
    _plot(report, out / "curve.png")
    return report


def _plot(report: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return None  # the runtime does not need matplotlib; the JSON has every point
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    for snr, result in report["snr"].items():
        sweep = result["sweep"]
        ax.plot([r["false_alarms_per_hour"] for r in sweep], [100 * (1 - r["hit_rate"]) for r in sweep], "o-",
                label=f"{snr} dB SNR", markersize=3)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("false alarms per hour")
    ax.set_ylabel("keywords missed or mistaken (%)")
    ax.set_title(Path(report["bundle"]).name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def report_table(report: dict) -> str:
    """The report as text lines, one per SNR."""
    lines = ["snr   hits  wrong  FA/h   median latency  best hits at <= 1 FA/h (threshold)"]
    for snr, r in report["snr"].items():
        d, best = r["default"], r["best_at_1_fa_per_hour"]
        latency = "-" if d["median_latency_s"] is None else f"{d['median_latency_s']:.2f} s"
        at_one = "-" if best is None else f"{100 * best['hit_rate']:.1f} % ({best['threshold']:g})"
        lines.append(f"{snr:>3} dB  {100 * d['hit_rate']:5.1f}  {100 * d['wrong_word_rate']:5.1f}  "
                     f"{d['false_alarms_per_hour']:5.1f}  {latency:>14}  {at_one}")
    return "\n".join(lines) + "\n" + json.dumps({"config": report["config"]})

"""Keyword detection on a continuous stream.

`Detector` keeps the latest window of audio (the bundle's clip length, 1 s), scores it every
hop (100 ms by default) and turns the scores into events: the semantics of TensorFlow's
RecognizeCommands (posteriors averaged over a window of recent results, a threshold, a minimum
number of results, a suppression time), with ``_silence_`` and ``_unknown_`` never firing.

The features are computed incrementally and are exactly what `log_mel` gives on the window:
a frame whose support lies inside the window is the same frame of the stream, so its mel power
is computed once and reused while the window slides over it; the frames that touch the window's
edges (they see its padding) and the per-window dB reference are recomputed every hop. That
needs the hop to be a whole number of feature hops; otherwise every hop recomputes the window
(``Detector.incremental`` is False and ``Detector.notes`` says why).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, List, Optional, Union

import numpy as np

from .bundle import Bundle
from . import features
from .audio import check_samples
from .features import frame_mel_power
from .predict import Predictor
from .spec import FeatureSpec

QUIET_LABELS = ("_silence_", "_unknown_")


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """How scores become events. Times in milliseconds.

    Attributes:
        hop_ms: how often the latest window is scored.
        average_ms: posteriors of the results within this span are averaged.
        threshold: the averaged probability a keyword must reach.
        min_count: results needed in the averaging span before anything fires.
        suppression_ms: after an event, nothing fires for this long; and the same word fires
            again only once its averaged probability has fallen below the threshold (one
            utterance, one event, however long it is).
    """

    # Chosen with `kws evaluate-stream` (docs/streaming.md): averaging over 800 ms halved the
    # false alarms of 300-500 ms at the same hit rate; 0.8 is the knee of the threshold sweep.
    hop_ms: float = 100.0
    average_ms: float = 800.0
    threshold: float = 0.8
    min_count: int = 3
    suppression_ms: float = 1000.0

    def __post_init__(self):
        for name in ("hop_ms", "average_ms", "suppression_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DetectorConfig.{name}={value!r}: must be a number of milliseconds >= 0")
        if self.hop_ms <= 0:
            raise ValueError(f"DetectorConfig.hop_ms={self.hop_ms!r}: must be positive")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"DetectorConfig.threshold={self.threshold!r}: must be in (0, 1]")
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise ValueError(f"DetectorConfig.min_count={self.min_count!r}: must be a positive integer")
        if self.min_count > max(1, math.ceil(self.average_ms / self.hop_ms)):
            raise ValueError(
                f"DetectorConfig.min_count={self.min_count}: at most {math.ceil(self.average_ms / self.hop_ms)} results "
                f"fall within average_ms={self.average_ms:g} at hop_ms={self.hop_ms:g}, so nothing would ever fire"
            )


@dataclasses.dataclass(frozen=True)
class Event:
    """A detected keyword: ``time`` is seconds from the stream start to the end of the window
    that fired, ``score`` the averaged probability."""

    label: str
    time: float
    score: float


class WindowFeatures:
    """`log_mel` of the latest window of a stream, reusing the frames that did not change.

    Args:
        spec: the bundle's feature spec; the window is ``spec.clip_samples`` long.
        hop: samples between two windows.
    """

    def __init__(self, spec: FeatureSpec, hop: int):
        self.spec, self.hop = spec, hop
        self.incremental = spec.center and hop % spec.hop_length == 0
        half = spec.n_fft // 2 if spec.center else 0
        t = np.arange(spec.n_frames)
        starts = t * spec.hop_length - half  # of each frame's support, in window samples
        self._interior = (starts >= 0) & (starts + spec.n_fft <= spec.clip_samples)
        self._starts = starts
        if self.incremental:
            self._plan_one_hop(half)
        self.reset()

    def _plan_one_hop(self, half: int) -> None:
        """What a window one hop after the previous one reuses and computes, worked out once:
        streams advance by exactly one hop, and per-hop numpy calls are what the time goes to."""
        spec = self.spec
        shift = self.hop // spec.hop_length
        source = np.arange(spec.n_frames) + shift
        inside = source < spec.n_frames
        reused = np.zeros(spec.n_frames, dtype=bool)
        reused[inside] = self._interior[inside] & self._interior[source[inside]]
        # The interior frames form one run, so the reused ones do: slices, not masks.
        first, last = np.flatnonzero(reused)[[0, -1]] if reused.any() else (0, -1)
        self._hop_reused = slice(first, last + 1)
        self._hop_source = slice(first + shift, last + 1 + shift)
        self._hop_computed = np.r_[0:first, last + 1 : spec.n_frames]
        self._analysis = features.analysis_window(spec)
        self._filterbank_t = np.ascontiguousarray(features.mel_filterbank(spec).T)
        # constant padding stays zero; of each window only the samples under the computed
        # frames (both ends, a fifth of it) are copied in, under a view of all frames made once
        self._padded = np.zeros(spec.clip_samples + 2 * half) if spec.pad_mode == "constant" else None
        self._frames = None if self._padded is None else _frame_view(self._padded, spec)
        self._hop_copies = [(max(0, self._starts[run[0]]), min(spec.clip_samples, self._starts[run[-1]] + spec.n_fft))
                            for run in _runs(self._hop_computed)]

    def reset(self) -> None:
        # (window start, log10 of the mel power of its frames): the per-value part of the dB
        # scale, the same in every window that holds the frame
        self._previous: Optional[tuple] = None

    def __call__(self, window: np.ndarray, window_start: int) -> np.ndarray:
        """float32 ``(n_mels, frames)`` of ``window`` (``clip_samples`` samples that start at
        stream sample ``window_start``), equal to ``log_mel(window, spec)``."""
        spec = self.spec
        if not self.incremental:
            padded = _pad(window, spec)
            return _to_db(frame_mel_power(padded, spec), spec)
        if self._previous is not None and window_start - self._previous[0] == self.hop:
            return self._one_hop_on(window, window_start)
        logs = np.empty((spec.n_frames, spec.n_mels), dtype=np.float32)
        # An interior frame t of this window is interior frame t + shift of the previous one;
        # the rest (the edge frames, and the newest frames next to the right edge, one run
        # with it) is computed.
        reused = np.zeros(spec.n_frames, dtype=bool)
        if self._previous is not None and (window_start - self._previous[0]) % spec.hop_length == 0:
            source = np.arange(spec.n_frames) + (window_start - self._previous[0]) // spec.hop_length
            inside = (source >= 0) & (source < spec.n_frames)
            reused[inside] = self._interior[inside] & self._interior[source[inside]]
            logs[reused] = self._previous[1][source[reused]]
        padded = _pad(window, spec)
        half = spec.n_fft // 2
        for run in _runs(np.flatnonzero(~reused)):
            lo, hi = self._starts[run[0]] + half, self._starts[run[-1]] + half + spec.n_fft
            logs[run[0] : run[-1] + 1] = _log_power(frame_mel_power(padded[lo:hi], spec), spec)
        self._previous = (window_start, logs)
        return _log_to_db(logs, spec)

    def _one_hop_on(self, window: np.ndarray, window_start: int) -> np.ndarray:
        """The same frames as the general path, for a window one hop on: one gather, one rfft
        and one product with the filterbank for every frame that is computed."""
        spec = self.spec
        if self._padded is not None:
            half = spec.n_fft // 2
            for lo, hi in self._hop_copies:
                self._padded[half + lo : half + hi] = window[lo:hi]
            all_frames = self._frames
        else:
            all_frames = _frame_view(_pad(window, spec), spec)
        frames = all_frames[self._hop_computed]
        frames *= self._analysis
        spectrum = np.fft.rfft(frames, axis=-1)
        if spec.power == 2.0:
            power = spectrum.real**2 + spectrum.imag**2
        else:
            power = np.abs(spectrum) ** spec.power
        logs = np.empty((spec.n_frames, spec.n_mels), dtype=np.float32)
        logs[self._hop_reused] = self._previous[1][self._hop_source]
        logs[self._hop_computed] = _log_power(power @ self._filterbank_t, spec)
        self._previous = (window_start, logs)
        return _log_to_db(logs, spec)


class Smoother:
    """Scores of successive windows in, events out: the decision half of the detector, kept
    apart so the stream evaluation can replay recorded scores under other thresholds."""

    def __init__(self, config: DetectorConfig, labels):
        self.config, self.labels = config, list(labels)
        self._quiet = {i for i, label in enumerate(self.labels) if label in QUIET_LABELS}
        self.reset()

    def reset(self) -> None:
        self._results: collections.deque = collections.deque()  # (time ms, probabilities)
        self._last_event: Optional[tuple] = None  # (label index, time ms)
        self._armed = True

    def update(self, now_ms: float, probabilities: np.ndarray) -> Optional[Event]:
        """The event the window ending at ``now_ms`` completes, if any."""
        config = self.config
        self._results.append((now_ms, np.asarray(probabilities, dtype=np.float64)))
        while self._results and self._results[0][0] <= now_ms - config.average_ms:
            self._results.popleft()
        if len(self._results) < config.min_count:
            return None
        # in float64, oldest first, then divided: as the browser page's Smoother adds them up
        average = sum(p for _, p in self._results) / len(self._results)
        top = int(np.argmax(average))
        score = float(average[top])
        last = self._last_event[0] if self._last_event is not None else None
        if top != last or score < config.threshold:
            self._armed = True  # another word won, or this one has ended: it may fire again
        if top in self._quiet or score < config.threshold or not self._armed:
            return None
        if self._last_event is not None and now_ms - self._last_event[1] < config.suppression_ms:
            return None
        self._last_event, self._armed = (top, now_ms), False
        return Event(self.labels[top], round(now_ms / 1000.0, 3), score)


class Detector:
    """Keyword events from audio fed in chunks of any size.

    Args:
        model: a `Predictor`, a `Bundle` or a bundle path.
        config: the `DetectorConfig`.
        artifact, threads: passed to `Predictor` when ``model`` is not one.

    ``feed(chunk)`` returns the events the chunk completed, ``flush()`` those of the end of a
    stream (it feeds half a window of silence, as a speaker falling silent would), ``reset()``
    starts a new stream. Chunks are float samples at the bundle's rate, mono.
    """

    def __init__(self, model: Union[Predictor, Bundle, str], config: DetectorConfig = DetectorConfig(),
                 artifact: Optional[str] = None, threads: Optional[int] = None):
        self.predictor = model if isinstance(model, Predictor) else Predictor(model, artifact=artifact, threads=threads)
        self.config = config
        self.spec = self.predictor.spec
        self.labels = list(self.predictor.labels)
        rate = self.spec.sample_rate
        self.hop = int(round(config.hop_ms * rate / 1000))
        if self.hop < 1 or self.hop > self.spec.clip_samples:
            raise ValueError(f"hop of {config.hop_ms} ms is not between one sample and the {self.spec.clip_samples}-sample window")
        self._waveform_input = self.predictor.artifact.input_kind == "waveform"
        self.features = WindowFeatures(self.spec, self.hop)
        self.notes: List[str] = []
        if self._waveform_input:
            self.incremental = False
            self.notes.append(f"{self.predictor.artifact.name} takes the waveform: features are computed in its graph")
        else:
            self.incremental = self.features.incremental
            if not self.incremental:
                self.notes.append(
                    f"the hop ({self.hop} samples) is not a multiple of the feature hop ({self.spec.hop_length}): "
                    "every window's features are computed whole"
                )
        self.smoother = Smoother(config, self.labels)
        self.on_scores: Optional[callable] = None  # called with (time ms, probabilities) of every window
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next sample fed is at time 0."""
        # The latest window is buffer[end - clip : end], the hop in progress follows it; when
        # a hop no longer fits, the window moves back to the start: one copy of it every
        # clip / hop hops, instead of one per hop. The stream starts from silence.
        clip = self.spec.clip_samples
        self._buffer = np.zeros(2 * clip, dtype=np.float32)
        self._end = clip
        self._pending_samples = 0
        self._position = 0  # samples of the stream scored so far (the end of the latest window)
        self.smoother.reset()
        self.features.reset()

    def feed(self, chunk) -> List[Event]:
        """Add samples; score each completed hop. Returns the events, oldest first.

        Raises:
            ValueError: samples that are NaN, infinite or absurd (`kws_runtime.audio.check_samples`).
        """
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        problem = check_samples(chunk)
        if problem:
            raise ValueError(f"audio chunk {problem}")
        events: List[Event] = []
        start = 0
        while start < len(chunk):
            if self._pending_samples == 0 and self._end + self.hop > len(self._buffer):
                clip = self.spec.clip_samples
                self._buffer[:clip] = self._buffer[self._end - clip : self._end]
                self._end = clip
            take = min(len(chunk) - start, self.hop - self._pending_samples)
            at = self._end + self._pending_samples
            self._buffer[at : at + take] = chunk[start : start + take]
            self._pending_samples += take
            start += take
            if self._pending_samples == self.hop:
                self._pending_samples = 0
                self._end += self.hop
                events += self._advance()
        return events

    @property
    def window(self) -> np.ndarray:
        """The latest scored window, ``(clip_samples,)`` float32 (a view, valid until the next `feed`)."""
        return self._buffer[self._end - self.spec.clip_samples : self._end]

    def flush(self) -> List[Event]:
        """End of the stream: complete the hop in progress and let the last sound reach the
        middle of the window with silence after it. The detector is reset afterwards."""
        events: List[Event] = []
        tail = self.spec.clip_samples // 2 + (self.hop - self._pending_samples) % self.hop
        events += self.feed(np.zeros(tail, dtype=np.float32))
        self.reset()
        return events

    def score(self, window: np.ndarray, window_start: int) -> np.ndarray:
        """Class probabilities of one window (the model run, with incremental features)."""
        if self._waveform_input:
            return self.predictor.probabilities(window[None])[0]
        return self.predictor.probabilities_of_features(self.features(window, window_start)[None])[0]

    # ------------------------------------------------------------------------------ internals

    def _advance(self) -> List[Event]:
        self._position += self.hop
        window_start = self._position - self.spec.clip_samples
        probabilities = self.score(self.window, window_start)
        now_ms = 1000.0 * self._position / self.spec.sample_rate
        if self.on_scores is not None:
            self.on_scores(now_ms, probabilities)
        event = self.smoother.update(now_ms, probabilities)
        return [event] if event is not None else []


def _pad(window: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    return features._pad(window[None], spec)[0]  # as log_mel pads a clip


def _frame_view(padded: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Read-only ``(n_frames, n_fft)`` view of a padded window's frames."""
    step = padded.strides[0]
    return np.lib.stride_tricks.as_strided(padded, (spec.n_frames, spec.n_fft), (spec.hop_length * step, step),
                                           writeable=False)


def _to_db(mel_power: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    return _log_to_db(_log_power(mel_power, spec), spec)


def _log_power(mel_power: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    # as log_mel does it: float32 before the logarithm
    return features._log_power_inplace(mel_power.astype(np.float32), spec)


def _log_to_db(logs: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """dB per window, ``(n_mels, frames)``, from `_log_power` of its frames (left unchanged)."""
    return np.ascontiguousarray(features._log_to_db_inplace(logs[None].copy(), spec)[0].T)


def _runs(indices: Iterable[int]) -> list:
    """Consecutive runs of sorted indices: [0, 1, 7, 8] -> [[0, 1], [7, 8]]."""
    runs: list = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs

"""The feature specification: every number that decides what a model's input looks like.

A `FeatureSpec` travels with every checkpoint and bundle, so the features a model is served
with are the features it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

SPEC_VERSION = 1
# Bounds that keep a spec from a copied bundle from asking for absurd memory: no audio
# format in use goes past 384 kHz, and a keyword clip is seconds long, not minutes.
MAX_SAMPLE_RATE = 384_000
MAX_CLIP_SECONDS = 60


class SpecError(ValueError):
    """A feature spec that cannot be used: unknown version or field, or a bad value."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Log-mel features of a fixed-length clip.

    The defaults reproduce ``librosa.feature.melspectrogram(y, sr=16000, n_mels=40)`` followed
    by ``librosa.power_to_db(S, ref=np.max)`` on 1 s clips: 40 mel bands x 32 frames.

    Attributes:
        sample_rate: Hz.
        clip_samples: clip length in samples; audio is zero-padded or cut to it.
        n_fft: FFT size in samples.
        win_length: analysis window length in samples (<= n_fft, centred inside the FFT frame).
        hop_length: samples between frames.
        n_mels: mel bands.
        fmin, fmax: band edges in Hz; ``fmax=None`` means ``sample_rate / 2``.
        center: pad ``n_fft // 2`` on both sides so frame ``t`` is centred on sample ``t * hop``.
        pad_mode: ``"constant"`` (zeros) or ``"reflect"``, used when ``center`` is true.
        power: exponent of the magnitude spectrogram (2.0 = power, 1.0 = magnitude).
        mel_norm: ``"slaney"`` (area normalised triangles) or ``None``.
        htk: HTK mel scale instead of Slaney's.
        ref: ``"max"`` (0 dB at each clip's loudest bin) or a fixed reference power.
        amin: floor on power before the logarithm.
        top_db: dynamic range kept below the peak, in dB; ``None`` keeps all.
        window: analysis window; only ``"hann"`` (periodic) is supported.
    """

    sample_rate: int = 16000
    clip_samples: int = 16000
    n_fft: int = 2048
    win_length: int = 2048
    hop_length: int = 512
    n_mels: int = 40
    fmin: float = 0.0
    fmax: Optional[float] = None
    center: bool = True
    pad_mode: str = "constant"
    power: float = 2.0
    mel_norm: Optional[str] = "slaney"
    htk: bool = False
    ref: Union[str, float] = "max"
    amin: float = 1e-10
    top_db: Optional[float] = 80.0
    window: str = "hann"

    def __post_init__(self):
        def bad(field, why):
            raise SpecError(f"FeatureSpec.{field}={getattr(self, field)!r}: {why}")

        for field in ("sample_rate", "clip_samples", "n_fft", "win_length", "hop_length", "n_mels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad(field, "must be a positive integer")
        if self.sample_rate > MAX_SAMPLE_RATE:
            bad("sample_rate", f"must be at most {MAX_SAMPLE_RATE} Hz")
        if self.clip_samples > MAX_CLIP_SECONDS * self.sample_rate:
            bad("clip_samples", f"must be at most {MAX_CLIP_SECONDS} s ({MAX_CLIP_SECONDS * self.sample_rate} samples)")
        if self.center is False and self.clip_samples < self.n_fft:
            bad("clip_samples", f"is shorter than n_fft={self.n_fft} and center is off: no frame fits")
        for field in ("n_fft", "hop_length"):
            if getattr(self, field) > self.clip_samples:
                bad(field, f"must not exceed the clip length clip_samples={self.clip_samples}")
        if self.win_length > self.n_fft:
            bad("win_length", f"must not exceed n_fft={self.n_fft}")
        if self.n_mels > self.n_fft // 2 + 1:
            bad("n_mels", f"must not exceed the {self.n_fft // 2 + 1} frequency bins of n_fft={self.n_fft}")
        nyquist = self.sample_rate / 2
        if not _is_number(self.fmin) or not 0 <= self.fmin < nyquist:
            bad("fmin", f"must be in [0, {nyquist}) Hz")
        if self.fmax is not None and (not _is_number(self.fmax) or not self.fmin < self.fmax <= nyquist):
            bad("fmax", f"must be in (fmin, {nyquist}] Hz or None")
        if not isinstance(self.center, bool):
            bad("center", "must be true or false")
        if self.pad_mode not in ("constant", "reflect"):
            bad("pad_mode", "must be 'constant' or 'reflect'")
        if not _is_number(self.power) or self.power <= 0:
            bad("power", "must be a positive number")
        if self.mel_norm not in ("slaney", None):
            bad("mel_norm", "must be 'slaney' or None")
        if not isinstance(self.htk, bool):
            bad("htk", "must be true or false")
        if self.ref != "max" and (not _is_number(self.ref) or self.ref <= 0):
            bad("ref", "must be 'max' or a positive number")
        if not _is_number(self.amin) or self.amin <= 0:
            bad("amin", "must be a positive number")
        if self.top_db is not None and (not _is_number(self.top_db) or self.top_db < 0):
            bad("top_db", "must be a non-negative number or None")
        if self.window != "hann":
            bad("window", "only 'hann' is supported")

    @property
    def f_max(self) -> float:
        """Upper band edge in Hz, with ``None`` resolved."""
        return float(self.sample_rate / 2 if self.fmax is None else self.fmax)

    @property
    def n_frames(self) -> int:
        """Frames per clip."""
        return self.frames_for(self.clip_samples)

    def frames_for(self, n_samples: int) -> int:
        """Frames of ``n_samples`` samples of audio, as librosa frames them (below 1: too short).

        The one frame-count formula: the numpy, torch and ONNX feature code all use it.
        """
        padded = n_samples + (2 * (self.n_fft // 2) if self.center else 0)
        return 1 + (padded - self.n_fft) // self.hop_length

    @property
    def shape(self) -> tuple:
        """Feature shape of one clip: ``(n_mels, n_frames)``."""
        return (self.n_mels, self.n_frames)

    def to_dict(self) -> dict:
        """JSON-safe dict, with the format version."""
        return {"version": SPEC_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> "FeatureSpec":
        """Build a spec from `to_dict` output; unknown versions and fields are refused."""
        return cls(**versioned_fields(data, cls, SPEC_VERSION, "feature spec", SpecError,
                                      "upgrade the toolkit or re-export the model"))

    @classmethod
    def preset(cls, name: str) -> "FeatureSpec":
        """A named configuration (`PRESETS`): ``"librosa"`` (the default spec, 40 x 32) or
        ``"fine"`` (30 ms / 10 ms, 40 x 101); ``"seed"`` is accepted for ``"librosa"``."""
        return PRESETS[canonical_preset(name)]


def versioned_fields(data: Any, cls, version: int, what: str, error, fix: str = "upgrade the toolkit",
                     extra: tuple = ()) -> dict:
    """The fields of a versioned JSON object written by a dataclass's ``to_dict``: checks it is
    an object of ``version`` naming only ``cls``'s fields (and ``extra`` keys), else raises
    ``error`` saying what is wrong."""
    if not isinstance(data, dict):
        raise error(f"{what} must be a JSON object, got {type(data).__name__}")
    fields = dict(data)
    found = fields.pop("version", None)
    if found != version:
        raise error(f"{what} version {found!r} is not supported (this version reads {version}); {fix}")
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise error(f"{what} has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return fields


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def canonical_preset(name: str) -> str:
    """The preset name for ``name`` or an accepted older spelling (`PRESET_ALIASES`)."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise SpecError(f"unknown feature preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


PRESETS = {
    # librosa's melspectrogram defaults (2048-sample window and FFT, 512 hop): what the
    # project's first models were trained on.
    "librosa": FeatureSpec(),
    # 30 ms Hann window, 10 ms hop: the usual speech front end; 101 frames per second.
    "fine": FeatureSpec(n_fft=512, win_length=480, hop_length=160),
}
# The first name of the librosa preset, kept so that older command lines still work.
PRESET_ALIASES = {"seed": "librosa"}

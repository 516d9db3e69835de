"""Batch data augmentation on the device: speed, time shift, background noise, gain, SpecAugment.

Everything runs on whole batches on the device the audio is on, driven by a
`torch.Generator` on that device, so a seed reproduces a run on the same device and torch
version (CPU and CUDA draw different streams). Each module is a no-op in eval mode.

Each module splits its work into ``draw(...) -> params`` (the random choices, a dict of
tensors) and ``apply(x, params)`` (deterministic), so what was drawn can be inspected.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from kws_runtime.spec import FeatureSpec

from .frontend import Frontend

__all__ = ["AugmentConfig", "WaveformAugment", "SpecAugment", "build_frontend", "resample_about_centre"]


def _check_batch(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a float tensor of shape (clips, samples), got {shape}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What the augmentation does; a JSON-safe record for checkpoints (`to_dict`/`from_dict`).

    Attributes:
        speed: (low, high) speed factor drawn uniformly per clip; the clip is resampled
            about its centre, so tempo and pitch change together, like a shorter or longer
            vocal tract (speed perturbation, Ko et al., Interspeech 2015). (1, 1) is off.
        shift_ms: maximum time shift either way, in ms; the gap is filled with zeros.
        noise_prob: probability that a clip gets background noise mixed in.
        snr_db: (low, high) signal-to-noise ratio in dB, drawn uniformly per clip; the
            signal power is the clip's mean power.
        gain_db: (low, high) gain in dB applied to the mix, drawn uniformly per clip.
        clip: clamp the result to [-1, 1], as a recording would saturate.
        freq_masks: SpecAugment frequency masks per clip.
        freq_mask_bands: widest frequency mask, in mel bands (width uniform in 0..this).
        time_masks: SpecAugment time masks per clip.
        time_mask_ms: widest time mask in ms (converted to frames with the spec's hop).
        mask_fill: ``"mean"`` (each clip's mean dB), ``"min"`` (its floor) or a dB value.
    """

    shift_ms: float = 100.0
    noise_prob: float = 0.8
    snr_db: tuple = (0.0, 20.0)
    gain_db: tuple = (-6.0, 6.0)
    clip: bool = True
    freq_masks: int = 2
    freq_mask_bands: int = 7
    time_masks: int = 2
    time_mask_ms: float = 100.0
    mask_fill: Union[str, float] = "mean"
    speed: tuple = (1.0, 1.0)

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"AugmentConfig.{field}={getattr(self, field)!r}: {why}")

        for field in ("shift_ms", "time_mask_ms"):
            if not _finite(getattr(self, field)) or getattr(self, field) < 0:
                bad(field, "must be a number >= 0")
        if not _finite(self.noise_prob) or not 0 <= self.noise_prob <= 1:
            bad("noise_prob", "must be in [0, 1]")
        for field in ("snr_db", "gain_db", "speed"):
            value = getattr(self, field)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or not all(_finite(v) for v in value)
                or value[0] > value[1]
            ):
                bad(field, "must be a (low, high) pair of numbers with low <= high")
            object.__setattr__(self, field, (float(value[0]), float(value[1])))
        if not 0.5 <= self.speed[0] <= self.speed[1] <= 2.0:
            bad("speed", "factors must lie in [0.5, 2]")
        for field in ("freq_masks", "freq_mask_bands", "time_masks"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(field, "must be an integer >= 0")
        if not isinstance(self.clip, bool):
            bad("clip", "must be true or false")
        if self.mask_fill not in ("mean", "min") and not _finite(self.mask_fill):
            bad("mask_fill", "must be 'mean', 'min' or a number (dB)")

    @classmethod
    def off(cls) -> "AugmentConfig":
        """A config that changes nothing."""
        return cls(shift_ms=0.0, noise_prob=0.0, gain_db=(0.0, 0.0), freq_masks=0, time_masks=0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["snr_db"], d["gain_db"], d["speed"] = list(self.snr_db), list(self.gain_db), list(self.speed)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "AugmentConfig":
        if not isinstance(data, dict):
            raise ValueError(f"augmentation config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"augmentation config has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


class _Seeded(nn.Module):
    """A module with its own generator, created on first use on the input's device."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)
        self._generator: Optional[torch.Generator] = None

    def manual_seed(self, seed: int) -> None:
        """Restart the random stream from ``seed`` (e.g. ``base_seed + rank`` under DDP)."""
        self.seed = int(seed)
        self._generator = None

    def generator(self, device) -> torch.Generator:
        device = torch.device(device)
        g = self._generator
        if g is None or g.device.type != device.type or (device.index is not None and g.device.index != device.index):
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generator = g
        return g


def resample_about_centre(audio: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
    """Play each clip of ``(N, samples)`` at its own ``speed`` ``(N,)``, keeping its centre
    in place and its length: sample ``t`` of the result is the clip at ``c + (t - c) * speed``
    (linear interpolation, zero outside the clip), so speeds above 1 shorten the word and
    raise its pitch. No anti-aliasing filter: at speed 1.1 only content above 7.3 kHz folds
    back, where speech has little energy."""
    n, length = audio.shape
    centre = (length - 1) / 2.0
    t = torch.arange(length, device=audio.device, dtype=torch.float32)
    position = centre + (t[None, :] - centre) * speed[:, None].float()
    left = position.floor()
    weight = position - left
    left = left.long()

    def at(index: torch.Tensor) -> torch.Tensor:
        inside = (index >= 0) & (index < length)
        return audio.gather(1, index.clamp(0, length - 1)) * inside

    return torch.lerp(at(left), at(left + 1), weight)


class WaveformAugment(_Seeded):
    """Speed, time shift, background noise at a random SNR, and random gain, on ``(N, samples)``.

    Order: resample the clip at the drawn speed (when ``config.speed`` is not (1, 1)), shift
    it (zero fill), mix a random segment of a random noise recording scaled to the drawn SNR
    (with probability ``noise_prob``), multiply by the drawn gain, clamp to [-1, 1]. With
    ``ref="max"`` features, gain changes the log-mel only through saturation and the ``amin``
    floor; it matters for fixed-reference specs and for waveform-input models.

    Args:
        spec: sample rate (for ms -> samples) and clip length.
        noise: background recordings, 1-D float arrays at ``spec.sample_rate`` (e.g.
            `kws_train.dataset.background_noise(root)`); those shorter than a clip are
            skipped. Needed when ``config.noise_prob > 0``.
        config: see `AugmentConfig`.
        seed: seed of the device generator.
    """

    def __init__(
        self,
        spec: FeatureSpec = FeatureSpec(),
        noise: Optional[Sequence] = None,
        config: AugmentConfig = AugmentConfig(),
        seed: int = 0,
    ):
        super().__init__(seed)
        self.spec = spec
        self.config = config
        self.max_shift = int(round(config.shift_ms * spec.sample_rate / 1000.0))
        usable = [np.asarray(n, dtype=np.float32).reshape(-1) for n in (noise or [])]
        usable = [n for n in usable if n.size >= spec.clip_samples]
        if config.noise_prob > 0 and not usable:
            if not noise:
                why = "no noise recordings were given"
            else:
                why = f"every noise recording is shorter than {spec.clip_samples} samples"
            raise ValueError(
                f"noise mixing is on (noise_prob={config.noise_prob}) but {why}; pass "
                "noise=kws_train.dataset.background_noise(root) or set noise_prob=0"
            )
        lengths = [n.size for n in usable]
        bank = torch.from_numpy(np.concatenate(usable)) if usable else torch.zeros(0)
        self.register_buffer("noise_bank", bank, persistent=False)
        self.register_buffer("noise_offsets", torch.tensor(np.cumsum([0] + lengths[:-1]), dtype=torch.long), persistent=False)
        self.register_buffer("noise_lengths", torch.tensor(lengths, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"shift=+-{self.max_shift} samples, noise_prob={c.noise_prob}, snr_db={c.snr_db}, "
            f"gain_db={c.gain_db}, speed={c.speed}, noise_files={len(self.noise_lengths)}, seed={self.seed}"
        )

    def draw(self, n: int, device) -> dict:
        """Random choices for ``n`` clips: ``shift`` (samples, long), ``noise`` (bool),
        ``noise_file`` and ``noise_start`` (long), ``snr_db``, ``gain_db`` and ``speed`` (float)."""
        g = self.generator(device)
        c = self.config
        # Every stream position is consumed whatever the config, so changing one knob
        # does not reshuffle the others' draws.
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (n,), generator=g, device=device)
        use_noise = torch.rand(n, generator=g, device=device) < c.noise_prob
        n_files = max(len(self.noise_lengths), 1)
        noise_file = torch.randint(0, n_files, (n,), generator=g, device=device)
        position = torch.rand(n, generator=g, device=device, dtype=torch.float64)
        snr = c.snr_db[0] + (c.snr_db[1] - c.snr_db[0]) * torch.rand(n, generator=g, device=device)
        gain = c.gain_db[0] + (c.gain_db[1] - c.gain_db[0]) * torch.rand(n, generator=g, device=device)
        if len(self.noise_lengths):
            room = (self.noise_lengths.to(device)[noise_file] - self.spec.clip_samples + 1).double()
            noise_start = (position * room).long()
        else:
            use_noise = torch.zeros_like(use_noise)
            noise_start = torch.zeros_like(noise_file)
        if c.speed == (1.0, 1.0):
            # drawn only when on, so runs without it keep the streams they always had
            speed = torch.ones(n, device=device)
        else:
            speed = c.speed[0] + (c.speed[1] - c.speed[0]) * torch.rand(n, generator=g, device=device)
        return {
            "shift": shift,
            "noise": use_noise,
            "noise_file": noise_file,
            "noise_start": noise_start,
            "snr_db": snr,
            "gain_db": gain,
            "speed": speed,
        }

    def noise_segments(self, params: dict, length: int) -> torch.Tensor:
        """The noise segments the params pick, ``(N, length)`` float32 (unscaled)."""
        start = self.noise_offsets[params["noise_file"]] + params["noise_start"]
        # every window of the bank is a row of this view; picking rows copies only those
        return self.noise_bank.unfold(0, length, 1)[start]

    def apply(self, audio: torch.Tensor, params: dict) -> torch.Tensor:
        """Apply drawn params to ``(N, samples)`` float audio; returns a new tensor."""
        x = audio
        n, length = x.shape
        if self.config.speed != (1.0, 1.0):
            x = resample_about_centre(x, params["speed"])
        if self.max_shift:
            # row i of the result is the window of the zero-padded clip that starts max_shift - shift_i in
            padded = nn.functional.pad(x, (self.max_shift, self.max_shift))
            x = padded.unfold(1, length, 1)[torch.arange(n, device=x.device), self.max_shift - params["shift"]]
        if self.config.noise_prob > 0 and len(self.noise_lengths):  # no `.any()`: it would sync with the device
            noise = self.noise_segments(params, length)
            p_signal = x.square().mean(dim=1)
            p_noise = noise.square().mean(dim=1)
            ratio = torch.pow(10.0, params["snr_db"] / 10.0)
            scale = torch.sqrt(p_signal / (p_noise * ratio).clamp_min(1e-20))
            # a silent clip has no SNR to honour: it stays silent rather than becoming pure noise
            scale = torch.where(params["noise"] & (p_noise > 0), scale, scale.new_zeros(()))
            x = torch.addcmul(x, scale[:, None], noise)
        if self.config.gain_db != (0.0, 0.0):
            x = x * torch.pow(10.0, params["gain_db"] / 20.0)[:, None]
        if self.config.clip:
            x = x.clamp(-1.0, 1.0)
        return x

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return audio
        _check_batch(audio, "audio")
        if audio.shape[1] != self.spec.clip_samples:
            # noise segments are drawn to fit a clip of the spec's length
            raise ValueError(
                f"audio clips have {audio.shape[1]} samples; this augmenter expects "
                f"spec.clip_samples={self.spec.clip_samples}"
            )
        return self.apply(audio.float(), self.draw(audio.shape[0], audio.device))


class SpecAugment(_Seeded):
    """Frequency and time masks on log-mel batches ``(N, n_mels, frames)`` (Park et al., 2019).

    Each of ``freq_masks`` masks covers ``f ~ U{0..freq_mask_bands}`` consecutive bands at a
    uniform start, each of ``time_masks`` covers ``t ~ U{0..time_mask_frames}`` frames; masked
    cells take ``fill``. Widths are capped at the axis length.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_mask_bands: int = 7,
        time_masks: int = 2,
        time_mask_frames: int = 10,
        fill: Union[str, float] = "mean",
        seed: int = 0,
    ):
        super().__init__(seed)
        counts = {
            "freq_masks": freq_masks,
            "freq_mask_bands": freq_mask_bands,
            "time_masks": time_masks,
            "time_mask_frames": time_mask_frames,
        }
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SpecAugment {name}={value!r}: must be an integer >= 0")
        if fill not in ("mean", "min") and not _finite(fill):
            raise ValueError(f"SpecAugment fill={fill!r}: must be 'mean', 'min' or a number")
        self.freq_masks, self.freq_mask_bands = freq_masks, freq_mask_bands
        self.time_masks, self.time_mask_frames = time_masks, time_mask_frames
        self.fill = fill

    @classmethod
    def from_config(cls, spec: FeatureSpec, config: AugmentConfig, seed: int = 0) -> "SpecAugment":
        frames = int(round(config.time_mask_ms * spec.sample_rate / 1000.0 / spec.hop_length))
        return cls(config.freq_masks, config.freq_mask_bands, config.time_masks, frames, config.mask_fill, seed)

    def extra_repr(self) -> str:
        return (
            f"freq_masks={self.freq_masks}x<={self.freq_mask_bands} bands, "
            f"time_masks={self.time_masks}x<={self.time_mask_frames} frames, fill={self.fill!r}, seed={self.seed}"
        )

    def draw(self, n: int, n_mels: int, n_frames: int, device) -> dict:
        """Random masks: ``freq`` ``(N, n_mels)`` and ``time`` ``(N, n_frames)`` boolean (True = masked),
        plus the drawn ``freq_width``/``freq_start`` ``(N, freq_masks)`` and ``time_width``/``time_start``."""
        g = self.generator(device)
        out = {}
        axes = (
            ("freq", self.freq_masks, self.freq_mask_bands, n_mels),
            ("time", self.time_masks, self.time_mask_frames, n_frames),
        )
        for axis, count, widest, size in axes:
            widest = min(widest, size)
            width = torch.randint(0, widest + 1, (n, count), generator=g, device=device)
            start = (torch.rand(n, count, generator=g, device=device) * (size - width + 1)).long()
            pos = torch.arange(size, device=device)
            inside = (pos[None, None, :] >= start[..., None]) & (pos[None, None, :] < (start + width)[..., None])
            out[axis] = inside.any(dim=1)
            out[f"{axis}_width"], out[f"{axis}_start"] = width, start
        return out

    def apply(self, features: torch.Tensor, params: dict) -> torch.Tensor:
        """Fill the masked bands and frames of ``(N, n_mels, frames)``; returns a new tensor."""
        if self.fill == "mean":
            value = features.mean(dim=(1, 2), keepdim=True)
        elif self.fill == "min":
            value = features.amin(dim=(1, 2), keepdim=True)
        else:
            value = features.new_tensor(float(self.fill))
        masked = params["freq"][:, :, None] | params["time"][:, None, :]
        return torch.where(masked, value, features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training or (self.freq_masks == 0 and self.time_masks == 0):
            return features
        if features.ndim != 3:
            raise ValueError(f"features must have shape (clips, n_mels, frames), got {tuple(features.shape)}")
        n, n_mels, n_frames = features.shape
        return self.apply(features, self.draw(n, n_mels, n_frames, features.device))


def build_frontend(
    spec: FeatureSpec = FeatureSpec(),
    config: Optional[AugmentConfig] = AugmentConfig(),
    noise: Optional[Sequence] = None,
    seed: int = 0,
) -> Frontend:
    """The training front end: `WaveformAugment` -> `LogMel` -> `SpecAugment` (augmentation
    only in training mode). ``config=None`` gives a plain log-mel front end. The two
    augmenters are seeded ``seed`` and ``seed + 1``; give each DDP rank its own ``seed``.
    Move it with ``.to(device)``; it returns ``(N, 1, n_mels, frames)``."""
    if config is None:
        return Frontend(spec)
    return Frontend(spec, WaveformAugment(spec, noise, config, seed), SpecAugment.from_config(spec, config, seed + 1))


"""Classify clips with a bundle's ONNX model: files or waveforms in, labels out."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import numpy as np

from .audio import check_samples, fit_length, load_audio
from .bundle import Artifact, Bundle, BundleError, load_bundle, untrusted
from .features import log_mel

# Clips per session run: bounds the memory of one call, large enough to amortise the run.
BATCH_SIZE = 64

# Preference when no artifact is named: int8 is smaller and faster, features computed here.
_DEFAULT_ORDER = ("onnx_int8", "onnx_fp32")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model's answer for one clip.

    Attributes:
        label: the most probable class.
        probability: its probability.
        probabilities: every label -> probability, in the bundle's label order.
    """

    label: str
    probability: float
    probabilities: dict

    def top(self, k: int = 3) -> list:
        """The ``k`` most probable ``(label, probability)`` pairs, most probable first."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:k]


class Predictor:
    """One onnxruntime session over one ONNX artifact of a bundle.

    Args:
        bundle: a `Bundle` or the path of a bundle folder.
        artifact: the artifact's name in the manifest; by default the int8 ONNX model fed
            with log-mel features, else the fp32 one, else any ONNX artifact; an int8 model
            that cannot be trusted here (`kws_runtime.bundle.untrusted`: low agreement with
            fp32, or full-range weights on a CPU that saturates them) is passed over when
            another is there. `skipped` says which was passed over and why.
        providers: onnxruntime execution providers, e.g. ``["CUDAExecutionProvider",
            "CPUExecutionProvider"]``; default CPU only. Asking for one this onnxruntime
            build does not offer is an error, not a silent fallback.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).

    `predict` keeps no state on the instance, so one predictor may serve several threads.

    Raises:
        BundleError: unusable bundle or artifact.
        ValueError: bad ``providers`` or ``threads``.
    """

    def __init__(
        self,
        bundle: Union[Bundle, str, os.PathLike],
        artifact: Optional[str] = None,
        providers: Optional[Sequence] = None,
        threads: Optional[int] = None,
    ):
        # Imported here: feature-only users of kws_runtime do not pay for onnxruntime.
        import onnxruntime

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.artifact = choose_artifact(self.bundle, artifact)
        self.skipped = [] if artifact is not None else [
            reason for a in self.bundle.artifacts.values() if a is not self.artifact and a.format == "onnx"
            and (reason := untrusted(self.bundle, a)) is not None
        ]
        self.labels = self.bundle.labels
        self.spec = self.bundle.spec

        options = onnxruntime.SessionOptions()
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive integer, got {threads!r}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = _check_providers(providers, onnxruntime.get_available_providers())
        # From the path, not from bytes: onnxruntime then holds one copy of the weights
        # instead of two, which matters on a small device.
        model = str(self.artifact.verify())
        try:
            self._session = onnxruntime.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(
                f"{self.artifact.path}: onnxruntime cannot load it ({_first_line(exc)}); "
                "the onnxruntime here may be older than the exporter's: upgrade it or re-export the bundle"
            ) from None
        missing = [p for p in _provider_names(providers) if p not in self._session.get_providers()]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} could not be started for {self.artifact.file} "
                f"(active: {', '.join(self._session.get_providers())}); check the GPU driver and CUDA libraries"
            )
        self._check_io()

    @property
    def providers(self) -> list:
        """Execution providers of the session, in priority order."""
        return self._session.get_providers()

    def predict(self, x) -> Union[Prediction, list]:
        """Classify one clip or a list of clips.

        Args:
            x: an audio file path, a waveform (1-D float array in [-1, 1] at the bundle's
                sample rate; padded or cut to its clip length), or a list of these.

        Returns:
            A `Prediction`, or a list of them for a list.

        Raises:
            AudioError: an unreadable audio file (the message names it).
            ValueError: a waveform that is not a 1-D float array of finite samples.
        """
        if not isinstance(x, (list, tuple)):
            return self._predict_clips(self._clip(x, None)[None])[0]
        predictions = []
        for start in range(0, len(x), BATCH_SIZE):  # decoded a batch at a time: bounded memory
            items = x[start : start + BATCH_SIZE]
            predictions += self._predict_clips(np.stack([self._clip(item, start + i) for i, item in enumerate(items)]))
        return predictions

    def probabilities(self, clips: np.ndarray) -> np.ndarray:
        """Class probabilities ``(clips, labels)`` float32 for waveforms ``(clips, clip_samples)``."""
        clips = np.asarray(clips, dtype=np.float32)
        if clips.ndim != 2 or clips.shape[1] != self.spec.clip_samples:
            raise ValueError(f"clips must have shape (n, {self.spec.clip_samples}), got {clips.shape}")
        outputs = [self._run(clips[i : i + BATCH_SIZE]) for i in range(0, len(clips), BATCH_SIZE)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.labels)), np.float32)

    # ------------------------------------------------------------------------------- internals

    def _clip(self, item, index: Optional[int]) -> np.ndarray:
        if isinstance(item, (str, os.PathLike)):
            return load_audio(item, self.spec)
        where = "waveform" if index is None else f"item {index}"
        if not isinstance(item, np.ndarray):
            raise ValueError(f"{where}: expected a file path or a numpy waveform, got {type(item).__name__}")
        if item.ndim != 1:
            raise ValueError(
                f"{where}: a waveform must be 1-D (samples,), got shape {item.shape}; "
                "average the channels first, and pass several clips as a list"
            )
        if item.dtype.kind != "f":
            raise ValueError(f"{where}: a waveform must be floating point in [-1, 1], got {item.dtype}")
        if item.size == 0:
            raise ValueError(f"{where}: the waveform is empty")
        problem = check_samples(item)
        if problem:
            raise ValueError(f"{where}: the waveform {problem}")
        return fit_length(item.astype(np.float32, copy=False), self.spec.clip_samples)

    def _predict_clips(self, clips: np.ndarray) -> list:
        probs = self.probabilities(clips)
        best = probs.argmax(axis=1)
        return [
            Prediction(self.labels[b], float(p[b]), dict(zip(self.labels, p.tolist())))
            for b, p in zip(best, probs)
        ]

    def probabilities_of_features(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities ``(clips, labels)`` for log-mel features ``(clips, n_mels, frames)``
        computed elsewhere (the streaming detector's incremental ones); log-mel artifacts only."""
        if self.artifact.input_kind != "log_mel":
            raise ValueError(f"{self.artifact.name} takes the waveform, not log-mel features")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 3 or features.shape[1:] != self.spec.shape:
            raise ValueError(f"features must have shape (n, {self.spec.n_mels}, {self.spec.n_frames}), got {features.shape}")
        return self._run_model(np.ascontiguousarray(features[:, None]), len(features))

    def _run(self, clips: np.ndarray) -> np.ndarray:
        if self.artifact.input_kind == "waveform":
            feed = np.ascontiguousarray(clips, dtype=np.float32)
        else:
            feed = log_mel(clips, self.spec)[:, None]
        return self._run_model(feed, len(clips))

    def _run_model(self, feed: np.ndarray, n: int) -> np.ndarray:
        try:
            (out,) = self._session.run([self.artifact.output_name], {self.artifact.input_name: feed})
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise BundleError(f"{self.artifact.path}: onnxruntime failed to run it ({_first_line(exc)})") from None
        if out.ndim != 2 or out.shape != (n, len(self.labels)):
            raise BundleError(
                f"{self.artifact.path}: returned shape {out.shape} for {n} clips, expected "
                f"({n}, {len(self.labels)}) for the bundle's labels; re-export the bundle"
            )
        if self.artifact.output_kind == "logits":
            return _softmax(out)
        return out.astype(np.float32, copy=False)

    def _check_io(self) -> None:
        art = self.artifact
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if art.input_name not in inputs or art.output_name not in outputs:
            raise BundleError(
                f"{art.path}: the model's inputs {sorted(inputs)} / outputs {sorted(outputs)} do not include "
                f"the manifest's {art.input_name!r} / {art.output_name!r}; re-export the bundle"
            )
        shape = inputs[art.input_name].shape
        expected = (1, self.spec.n_mels, self.spec.n_frames) if art.input_kind == "log_mel" else (self.spec.clip_samples,)
        fixed = shape[1:]
        if len(fixed) != len(expected) or any(isinstance(a, int) and a != e for a, e in zip(fixed, expected)):
            raise BundleError(
                f"{art.path}: the model takes {art.input_kind} input of shape {shape}, but the bundle's feature "
                f"spec gives (batch, {', '.join(map(str, expected))}); re-export the bundle"
            )
        classes = outputs[art.output_name].shape[-1] if outputs[art.output_name].shape else None
        if isinstance(classes, int) and classes != len(self.labels):
            raise BundleError(
                f"{art.path}: the model has {classes} classes but the bundle has {len(self.labels)} labels; "
                "re-export the bundle"
            )


def choose_artifact(bundle: Bundle, name: Optional[str] = None) -> Artifact:
    """The ONNX artifact a `Predictor` runs: ``name``, or the default choice (see `Predictor`)."""
    onnx = {n: a for n, a in bundle.artifacts.items() if a.format == "onnx"}
    if name is not None:
        if name not in bundle.artifacts:
            raise BundleError(
                f"{bundle.path}: has no artifact {name!r}; it has {', '.join(bundle.artifacts)}"
            )
        if name not in onnx:
            raise BundleError(
                f"{bundle.path}: {name} is a {bundle.artifacts[name].format} file; this runtime runs ONNX "
                f"artifacts only ({', '.join(onnx) or 'none in this bundle'})"
            )
        return onnx[name]
    candidates = [n for n in _DEFAULT_ORDER if n in onnx]
    candidates += sorted((n for n in onnx if n not in candidates), key=lambda n: _rank(onnx[n]))
    if not candidates:
        raise BundleError(
            f"{bundle.path}: has no ONNX artifact (it has {', '.join(bundle.artifacts)}); export one with kws-export"
        )
    # an int8 model that disagrees with fp32 too often, or would on this CPU, is used only when asked for by name
    trusted = [n for n in candidates if untrusted(bundle, onnx[n]) is None]
    return onnx[(trusted or candidates)[0]]


def _rank(artifact: Artifact) -> tuple:
    return (artifact.input_kind != "log_mel", artifact.precision != "int8", artifact.name)


def _check_providers(providers, available: list) -> list:
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    providers = list(providers)
    if not providers:
        raise ValueError("providers must name at least one onnxruntime execution provider")
    for name in _provider_names(providers):
        if name not in available:
            hint = (
                "install onnxruntime-gpu in place of onnxruntime (pip install 'kws-toolkit[gpu]')"
                if name == "CUDAExecutionProvider"
                else "check the name"
            )
            raise ValueError(f"{name} is not available in this onnxruntime (it offers {', '.join(available)}); {hint}")
    return providers


def _provider_names(providers: list) -> list:
    # onnxruntime accepts "Name" or ("Name", {options}).
    return [p[0] if isinstance(p, (tuple, list)) else p for p in providers]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

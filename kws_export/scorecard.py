"""The scorecard: every artifact on the same test clips through the same features.

For each artifact: accuracy, top-1 agreement with the fp32 model, file size, and median latency
per clip at batch 1 on one thread (onnxruntime ``intra_op_num_threads=1``,
``torch.set_num_threads(1)`` for TorchScript). Written as manifest rows, a Markdown table and
a PNG (accuracy against latency).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from kws_runtime.bundle import INT8_AGREEMENT_FLOOR
from kws_runtime.files import atomic_path, write_text_atomic
from kws_runtime.spec import FeatureSpec

from .quantize import LogMelReader

__all__ = [
    "EvalSet",
    "Runner",
    "ScoreRow",
    "agreement",
    "evaluate",
    "median_latencies_ms",
    "onnx_runner",
    "plot_scorecard",
    "scorecard_markdown",
    "torch_threads",
    "torchscript_runner",
    "write_scorecard",
]


class EvalSet:
    """Labelled clips and their log-mel features, computed once.

    Args:
        clips: anything ``load`` turns into a waveform.
        targets: class index of each clip, in the model's label order.
        spec: feature spec.
        load: ``load(clip, spec) -> float32 (spec.clip_samples,)``.
        batch_size: clips per feature batch.
    """

    def __init__(self, clips: Sequence, targets: Sequence[int], spec: FeatureSpec, load: Callable, batch_size: int = 64):
        if len(clips) != len(targets):
            raise ValueError(f"{len(clips)} clips but {len(targets)} targets")
        self.clips = list(clips)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.spec = spec
        self.load = load
        self.batch_size = batch_size
        self._features: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.clips)

    def features(self) -> np.ndarray:
        """float32 ``(clips, 1, n_mels, frames)``, from `kws_runtime.log_mel`."""
        if self._features is None:
            self._features = LogMelReader(self.clips, self.spec, self.load, batch_size=self.batch_size).features()
        return self._features

    def waveforms(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """float32 ``(clips, clip_samples)`` of ``clips[start:stop]``."""
        return np.stack([self.load(c, self.spec) for c in self.clips[start:stop]])

    def waveform_batches(self) -> Iterator[np.ndarray]:
        for i in range(0, len(self), self.batch_size):
            yield self.waveforms(i, i + self.batch_size)


class Runner:
    """A loaded artifact as a function ``x -> outputs`` on numpy batches.

    Attributes:
        input_kind: ``"log_mel"`` (``(N, 1, n_mels, frames)``) or ``"waveform"`` (``(N, samples)``).
        output_kind: ``"logits"`` or ``"probabilities"``.
        framework: ``"onnxruntime"``, ``"torch"`` or ``"executorch"`` (which thread setting applies).
    """

    def __init__(self, fn: Callable, input_kind: str, output_kind: str, framework: str):
        self.fn = fn
        self.input_kind = input_kind
        self.output_kind = output_kind
        self.framework = framework

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


def onnx_runner(path, input_kind: str = "log_mel", output_kind: str = "logits", threads: Optional[int] = 1) -> Runner:
    """An onnxruntime CPU session on ``path`` (``threads`` intra-op threads)."""
    from .onnx_export import onnx_session

    session = onnx_session(path, threads=threads)
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return Runner(run, input_kind, output_kind, "onnxruntime")


def torchscript_runner(path, lite: bool = False, engine: Optional[str] = None) -> Runner:
    """A TorchScript (``lite=False``) or lite-interpreter file, run with quantized ``engine`` if given."""
    import torch

    from .torchscript import load_lite, load_torchscript, quantized_engine

    # Quantized weights are packed for the engine that is current when the file is loaded.
    with quantized_engine(engine) if engine else contextlib.nullcontext():
        module = load_lite(path) if lite else load_torchscript(path)

    def run(x):
        with torch.no_grad(), (quantized_engine(engine) if engine else contextlib.nullcontext()):
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return Runner(run, "log_mel", "logits", "torch")


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` inside the block."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_batched(runner: Runner, data: EvalSet, batch_size: int = 64) -> np.ndarray:
    """Outputs of ``runner`` on every clip of ``data``, ``(clips, classes)``."""
    if runner.input_kind == "waveform":
        return np.concatenate([runner(w) for w in data.waveform_batches()])
    x = data.features()
    return np.concatenate([runner(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose argmax is the same in ``a`` and ``b``."""
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def _one_clip_inputs(runner: Runner, data: EvalSet, n: int) -> list:
    if runner.input_kind == "waveform":
        return [w[None] for w in data.waveforms(0, n)]
    return [f[None] for f in data.features()[:n]]


def median_latencies_ms(runners: dict, data: EvalSet, runs: int = 50, warmup: int = 5) -> dict:
    """Median wall time of one clip at batch 1 on one thread, in milliseconds, per runner.

    The runners take turns clip by clip, so a change in machine load during the measurement
    affects them all alike; each sees the same clips (``data``'s first ones, cycling).
    Torch runners run with ``torch.set_num_threads(1)``; onnxruntime runners are expected to
    have been made with one intra-op thread (`onnx_runner`'s default).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    n = min(len(data), runs)
    inputs = {name: _one_clip_inputs(r, data, n) for name, r in runners.items()}
    times: dict = {name: [] for name in runners}
    with torch_threads(1):
        for i in range(warmup + runs):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner(inputs[name][i % n])
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


@dataclasses.dataclass
class ScoreRow:
    """One artifact's line on the scorecard. Fractions in [0, 1]; ``None`` when not measured."""

    artifact: str
    file: str
    format: str
    precision: str
    size: int
    accuracy: Optional[float] = None
    agreement: Optional[float] = None
    latency_ms: Optional[float] = None
    clips: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(runner: Runner, data: EvalSet, reference_top1: np.ndarray) -> dict:
    """Accuracy and agreement with the reference's top-1 of one artifact on ``data``."""
    top1 = np.argmax(run_batched(runner, data), axis=1)
    return {
        "accuracy": float(np.mean(top1 == data.targets)),
        "agreement_fp32": float(np.mean(top1 == reference_top1)),
        "test_clips": len(data),
    }


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def scorecard_markdown(rows: Sequence[ScoreRow], title: str = "Scorecard", notes: Sequence[str] = ()) -> str:
    """The rows as a Markdown table (sizes in MB, latency in ms per clip)."""
    lines = [
        f"# {title}",
        "",
        "| artifact | file | format | precision | accuracy | agreement with fp32 | size | latency (ms, batch 1, 1 thread) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        latency = "-" if r.latency_ms is None else f"{r.latency_ms:.3f}"
        agreement = _pct(r.agreement)
        if r.precision == "int8" and r.agreement is not None and r.agreement < INT8_AGREEMENT_FLOOR:
            agreement += f" (below {100 * INT8_AGREEMENT_FLOOR:.0f}%)"
        lines.append(
            f"| {r.artifact} | {r.file} | {r.format} | {r.precision} | {_pct(r.accuracy)} | {agreement} | {_size(r.size)} | {latency} |"
        )
    clips = {r.clips for r in rows if r.clips}
    if clips:
        lines += ["", f"Test clips: {', '.join(map(str, sorted(clips)))}."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_scorecard(rows: Sequence[ScoreRow], path, title: str = "Accuracy against latency") -> Optional[Path]:
    """Scatter of accuracy (%) against latency (ms), one labelled point per artifact; PNG, atomic.

    Returns ``None`` (and writes nothing) when no row has both numbers.
    """
    points = [r for r in rows if r.accuracy is not None and r.latency_ms is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.subplots()
    # Artifacts often share an accuracy (and lite files a latency): a legend, not labels on points.
    for r in points:
        marker = "o" if r.precision == "fp32" else "s"
        ax.scatter(r.latency_ms, 100 * r.accuracy, marker=marker, s=50, alpha=0.8, label=f"{r.artifact} ({r.latency_ms:.2f} ms)")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("median latency per clip, batch 1, 1 thread (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_scorecard(rows: Sequence[ScoreRow], out_dir, title: str, notes: Sequence[str] = ()) -> list:
    """Write ``scorecard.md`` and (when there are latencies and accuracies) ``scorecard.png``; returns the paths."""
    out_dir = Path(out_dir)
    md = write_text_atomic(out_dir / "scorecard.md", scorecard_markdown(rows, title, notes))
    written = [md]
    png = plot_scorecard(rows, out_dir / "scorecard.png", title)
    if png:
        written.append(png)
    return written

"""Streaming detection: incremental features equal to log_mel, decisions with RecognizeCommands'
semantics, kws stream / listen / evaluate-stream on streams built from real clips."""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from kws_runtime import FeatureSpec, log_mel
from kws_runtime.cli import main
from kws_runtime.listen import Recording, run
from kws_runtime.stream import Detector, DetectorConfig, Smoother, WindowFeatures
from kws_runtime.stream_eval import build_stream, match, read_truth, record_scores, replay, write_stream

from bundle_builders import build_bundle

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = REPO / "pretrained" / "shufflenet-v2-0.5x"
LABELS = ["_silence_", "_unknown_", "yes", "no"]


@pytest.mark.parametrize("preset, hop, incremental", [("fine", 1600, True), ("librosa", 1536, True), ("librosa", 1600, False),
                                                      ("fine", 1000, False), ("fine reflect", 1600, True)])
def test_window_features_equal_log_mel_hop_after_hop(preset, hop, incremental):
    spec = FeatureSpec.preset(preset.split()[0])
    if preset.endswith("reflect"):
        spec = dataclasses.replace(spec, pad_mode="reflect")
    rng = np.random.default_rng(0)
    stream = np.concatenate([np.zeros(spec.clip_samples), 0.1 * rng.standard_normal(spec.clip_samples * 3)]).astype(np.float32)
    features = WindowFeatures(spec, hop)
    assert features.incremental == incremental
    for k in range(1, 25):
        end = spec.clip_samples + k * hop
        window = stream[end - spec.clip_samples : end]
        got = features(window, end - 2 * spec.clip_samples)
        np.testing.assert_allclose(got, log_mel(window, spec), rtol=0, atol=1e-4)


def test_the_detector_sees_log_mel_of_its_window_whatever_the_chunks(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    detector = Detector(path, DetectorConfig(hop_ms=96.0))  # 3 of the bundle's 512-sample feature hops
    assert detector.incremental and not detector.notes
    audio = (0.2 * np.random.default_rng(1).standard_normal(16000 * 3)).astype(np.float32)

    def scores(chunk_size, samples):
        seen = []
        detector.on_scores = lambda t, p: seen.append(p)
        detector.reset()
        for i in range(0, samples, chunk_size):
            detector.feed(audio[i : min(i + chunk_size, samples)])
        return np.array(seen)

    whole = scores(len(audio), len(audio))
    for size in (7, 1536, 5000):
        assert np.array_equal(scores(size, len(audio)), whole)
    one_by_one = scores(1, 20000)
    assert np.array_equal(one_by_one, whole[: len(one_by_one)])
    # the model's input is log_mel of the latest window: the same as classifying that clip
    np.testing.assert_allclose(one_by_one[-1], detector.predictor.probabilities(detector.window[None])[0], atol=1e-5)
    notes = Detector(path, DetectorConfig(hop_ms=100.0)).notes
    assert notes and "not a multiple of the feature hop" in notes[0]


def _run_smoother(sequence, **config):
    smoother = Smoother(DetectorConfig(**{"average_ms": 300.0, "min_count": 3, **config}), LABELS)
    return [e for e in (smoother.update(100.0 * i, np.array(p)) for i, p in enumerate(sequence, 1)) if e is not None]


def test_one_utterance_fires_once_and_quiet_labels_never():
    yes, silence, unknown = [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]
    events = _run_smoother([silence] * 5 + [yes] * 30 + [silence] * 5)  # a 3 s "yes": one event
    assert [e.label for e in events] == ["yes"]
    assert events[0].time == pytest.approx(0.8)  # after min_count results of it
    assert _run_smoother([silence] * 20 + [unknown] * 20) == []
    # the same word twice, with a pause between: twice; within the suppression time: once
    twice = _run_smoother([yes] * 5 + [silence] * 12 + [yes] * 5)
    assert [e.label for e in twice] == ["yes", "yes"]
    assert len(_run_smoother([yes] * 5 + [silence] * 4 + [yes] * 5, suppression_ms=1500.0)) == 1
    assert _run_smoother([[0.4, 0.0, 0.6, 0.0]] * 10, threshold=0.7) == []


@pytest.fixture(scope="module")
def clean_stream(real_data, tmp_path_factory):
    """A 40 s stream of real keywords and unknown words of unseen speakers over real noise at 30 dB."""
    folder = tmp_path_factory.mktemp("streams")
    audio, truth = build_stream(real_data, 40.0, 30.0, seed=3)
    return write_stream(folder, "clean", audio, truth), truth


def test_streams_are_seeded_and_keywords_stay_apart(real_data, clean_stream, tmp_path):
    wav, truth = clean_stream
    again, truth_again = build_stream(real_data, 40.0, 30.0, seed=3)
    assert truth_again == truth and read_truth(wav.with_suffix(".csv")) == truth
    keywords = [p for p in truth if p.label != "_unknown_"]
    assert len(keywords) >= 6
    assert all(b.start - a.end >= 2.0 for a, b in zip(keywords, keywords[1:]))
    assert soundfile.info(str(wav)).samplerate == 16000


def test_kws_stream_finds_the_words_at_their_times(clean_stream, capsys):
    wav, truth = clean_stream
    assert main(["stream", str(PRETRAINED), str(wav), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from kws_runtime.stream import Event

    counts = match([Event(e["label"], e["time"], e["score"]) for e in events], truth)
    assert counts["hits"] >= 0.6 * counts["keywords"], counts
    assert counts["false_alarms"] <= 2, counts


def test_a_long_stereo_file_at_another_rate_streams_in_blocks(clean_stream, tmp_path):
    wav, _ = clean_stream
    mono, rate = soundfile.read(str(wav), dtype="float32")
    import soxr

    stereo = np.stack([soxr.resample(mono, rate, 44100)] * 2, axis=1)
    soundfile.write(tmp_path / "stereo.flac", stereo, 44100)
    done = subprocess.run([sys.executable, "-m", "kws_runtime.cli", "stream", str(PRETRAINED), str(tmp_path / "stereo.flac"),
                           str(tmp_path / "missing.wav")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # one file could not be read; the other was processed
    lines = done.stdout.splitlines()
    assert lines[0] == f"# {tmp_path / 'stereo.flac'}" and len(lines) > 3
    assert done.stderr.strip().endswith("missing.wav: no such file")


def test_listen_runs_the_same_loop_on_a_recording(clean_stream, capsys):
    wav, _ = clean_stream
    detector = Detector(PRETRAINED)
    events = []
    run(detector, Recording(wav, 16000, block_seconds=0.05), events.append)
    assert main(["stream", str(PRETRAINED), str(wav)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [f"{e.time:.2f}  {e.label}  {e.score:.2f}" for e in events] == printed


def test_listen_without_sounddevice_is_one_line(tmp_path):
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("sounddevice is installed: this checks the message when it is not")
    done = subprocess.run([sys.executable, "-m", "kws_runtime.cli", "listen", str(PRETRAINED)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "kws: error: sounddevice is not installed: pip install 'kws-toolkit[mic]'"


def test_evaluate_stream_writes_streams_and_a_report(real_data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate-stream", str(PRETRAINED), str(real_data), "--out", str(out), "--minutes", "0.5",
                 "--snr", "10", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["snr"]) == {"10", "0"}
    for result in report["snr"].values():
        sweep = result["sweep"]
        assert [r["threshold"] for r in sweep] == sorted(r["threshold"] for r in sweep)
        assert all(0 <= r["hit_rate"] <= 1 and r["false_alarms_per_hour"] >= 0 for r in sweep)
        assert result["default"]["threshold"] == DetectorConfig().threshold
    for name in ("stream-10dB", "stream-0dB", "keyword-free"):
        assert (out / f"{name}.wav").is_file()
        with open(out / f"{name}.csv") as f:
            assert next(csv.reader(f)) == ["label", "start", "end", "source"]
    assert "hits" in capsys.readouterr().out


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_the_sweep_replays_what_a_live_detector_fires(real_data, threshold):
    """evaluate-stream scores a stream once and replays the scores at each threshold; the events
    must be those a detector with that threshold fires while listening. (Hits need not fall as
    the threshold rises: at a lower one another word can fire first and claim the keyword, or a
    false alarm's suppression cover it.)"""
    audio, _ = build_stream(real_data, 30, 10.0, seed=0)
    recorder = Detector(PRETRAINED, threads=1)
    replayed = replay(*record_scores(recorder, audio), DetectorConfig(threshold=threshold), recorder.labels)
    live = Detector(PRETRAINED, DetectorConfig(threshold=threshold), threads=1)
    heard = [event for start in range(0, len(audio), 4000) for event in live.feed(audio[start : start + 4000])]
    heard += live.flush()
    assert replayed and [(e.label, e.time) for e in replayed] == [(e.label, e.time) for e in heard]


def test_a_config_that_could_never_fire_is_refused():
    with pytest.raises(ValueError, match="nothing would ever fire"):
        DetectorConfig(average_ms=300.0, hop_ms=100.0, min_count=4)
    with pytest.raises(ValueError, match="threshold"):
        DetectorConfig(threshold=1.5)

"""Predictor: real onnxruntime sessions over small ONNX models with known weights."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile

from kws_runtime import AudioError, BundleError, Prediction, Predictor, load_audio, load_bundle
from kws_runtime.bundle import write_manifest

from bundle_builders import (
    LABELS, SEED, artifact_entry, build_bundle, linear_onnx, linear_weights, manifest_for, read_manifest, waveform_onnx,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle"), int8=True, waveform=True, torchscript=True)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(7)
    t = np.arange(SEED.clip_samples) / SEED.sample_rate
    tones = [0.3 * np.sin(2 * np.pi * f * t) for f in (200, 900, 3100)]
    noise = list(0.2 * rng.standard_normal((5, SEED.clip_samples)))
    return np.stack(tones + noise).astype(np.float32)


def as_array(predictions):
    return np.array([[p.probabilities[label] for label in LABELS] for p in predictions])


def test_fp32_predictions_match_the_model_computed_in_numpy(bundle, clips):
    path, expected = bundle
    predictor = Predictor(path, artifact="onnx_fp32", threads=1)
    predictions = predictor.predict(list(clips))
    want = expected["onnx_fp32"](clips)
    assert np.abs(as_array(predictions) - want).max() < 1e-5
    assert [p.label for p in predictions] == [LABELS[i] for i in want.argmax(axis=1)]
    for p in predictions:
        assert isinstance(p, Prediction)
        assert list(p.probabilities) == LABELS
        assert p.probability == max(p.probabilities.values()) == p.probabilities[p.label]
        assert abs(sum(p.probabilities.values()) - 1) < 1e-5
        assert p.top(3)[0] == (p.label, p.probability) and len(p.top(3)) == 3


def test_default_artifact_is_int8_log_mel_then_fp32(bundle, tmp_path):
    path, expected = bundle
    predictor = Predictor(path)
    assert predictor.artifact.name == "onnx_int8"
    assert predictor.providers == ["CPUExecutionProvider"]
    only_fp32, _ = build_bundle(tmp_path / "fp32", waveform=True)
    assert Predictor(only_fp32).artifact.name == "onnx_fp32"
    only_e2e, _ = build_bundle(tmp_path / "e2e", fp32=False, waveform=True)
    assert Predictor(only_e2e).artifact.name == "onnx_e2e"


def test_int8_artifact_runs_its_own_weights(bundle, clips):
    path, expected = bundle
    got = as_array(Predictor(path, threads=1).predict(list(clips)))
    # onnxruntime may quantize the activations too, so allow its rounding, but the int8
    # model's columns are reversed: the fp32 answer would be far off.
    assert np.abs(got - expected["onnx_int8"](clips)).max() < 0.05
    assert np.abs(got - expected["onnx_fp32"](clips)).max() > 0.1


def test_waveform_artifact_is_fed_audio_and_its_probabilities_used_as_they_are(bundle, clips, tmp_path):
    path, expected = bundle
    got = as_array(Predictor(path, artifact="onnx_e2e").predict(list(clips)))
    assert np.abs(got - expected["onnx_e2e"](clips)).max() < 1e-5

    # A "probabilities" output that does not sum to one is still not renormalised.
    weights = (np.random.default_rng(3).standard_normal((SEED.clip_samples, len(LABELS))) / 20).astype(np.float32)
    waveform_onnx(tmp_path / "sig.onnx", weights, activation="Sigmoid")
    write_manifest(tmp_path, manifest_for({"sig": artifact_entry(tmp_path, "sig.onnx", kind="waveform", output_kind="probabilities")}))
    got = as_array(Predictor(tmp_path).predict(list(clips)))
    assert np.abs(got - 1 / (1 + np.exp(-(clips.astype(np.float64) @ weights)))).max() < 1e-5
    assert np.abs(got.sum(axis=1) - 1).max() > 0.5


def test_paths_waveforms_and_lists(bundle, tmp_path, clips):
    path, _ = bundle
    predictor = Predictor(path, artifact="onnx_fp32")
    files = []
    for i, clip in enumerate(clips[:3]):
        files.append(tmp_path / f"c{i}.wav")
        soundfile.write(files[-1], clip, SEED.sample_rate, subtype="FLOAT")
    by_path = predictor.predict(str(files[0]))
    assert isinstance(by_path, Prediction)
    assert by_path == predictor.predict(load_audio(files[0]))
    mixed = predictor.predict([files[0], clips[1], str(files[2])])
    assert [p.label for p in mixed] == [p.label for p in predictor.predict(list(clips[:3]))]
    assert predictor.predict([]) == []
    assert isinstance(predictor.predict((clips[0],)), list)


def test_short_and_long_waveforms_are_padded_or_cut(bundle, clips):
    path, expected = bundle
    predictor = Predictor(path, artifact="onnx_fp32")
    short = clips[0][:5000]
    padded = np.concatenate([short, np.zeros(SEED.clip_samples - 5000, np.float32)])
    assert predictor.predict(short) == predictor.predict(padded)
    long = np.concatenate([clips[1], clips[2]])
    assert predictor.predict(long) == predictor.predict(clips[1])
    assert predictor.predict(clips[0].astype(np.float64)).label == predictor.predict(clips[0]).label


def test_lists_longer_than_a_batch_are_split_and_agree(bundle):
    path, expected = bundle
    predictor = Predictor(path, artifact="onnx_fp32")
    many = (np.random.default_rng(11).standard_normal((70, SEED.clip_samples)) * 0.1).astype(np.float32)
    got = as_array(predictor.predict(list(many)))
    assert np.abs(got - expected["onnx_fp32"](many)).max() < 1e-5


def test_concurrent_predictions_equal_serial_ones(bundle, clips):
    path, _ = bundle
    predictor = Predictor(path, artifact="onnx_fp32", threads=1)
    rng = np.random.default_rng(5)
    jobs = [clips[i % len(clips)] if i % 3 else list(clips[rng.integers(0, len(clips), 4)]) for i in range(40)]
    serial = [predictor.predict(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(predictor.predict, jobs))
    assert parallel == serial


def test_real_recordings(bundle, real_data):
    path, expected = bundle
    files = sorted((real_data / "yes").glob("*.wav"))[:4] + sorted((real_data / "no").glob("*.wav"))[:4]
    predictor = Predictor(path, artifact="onnx_fp32")
    got = as_array(predictor.predict(files))
    want = expected["onnx_fp32"](np.stack([load_audio(f) for f in files]))
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize(
    "item, error, message",
    [
        (np.zeros(16000, np.int16), ValueError, "floating point"),
        (np.zeros((16000, 2), np.float32), ValueError, "must be 1-D"),
        (np.array([0.0, np.nan], np.float32), ValueError, "NaN"),
        (np.array([np.inf], np.float32), ValueError, "NaN or infinite"),
        (np.zeros(0, np.float32), ValueError, "empty"),
        (3, ValueError, "a file path or a numpy waveform, got int"),
        ("no/such/file.wav", AudioError, r"no/such/file\.wav: no such file"),
    ],
)
def test_bad_inputs_raise_clear_errors(bundle, item, error, message):
    predictor = Predictor(bundle[0], artifact="onnx_fp32")
    with pytest.raises(error, match=message):
        predictor.predict(item)
    with pytest.raises(error, match=message):
        predictor.predict([np.zeros(16000, np.float32), item])


def test_non_audio_file_is_an_audio_error(bundle, tmp_path):
    (tmp_path / "notes.wav").write_text("not audio at all\n" * 20)
    with pytest.raises(AudioError, match="notes.wav: not a readable audio file"):
        Predictor(bundle[0]).predict(tmp_path / "notes.wav")


def test_artifact_choice_errors(bundle, tmp_path):
    path, _ = bundle
    with pytest.raises(BundleError, match="has no artifact 'onnx_fp16'; it has onnx_fp32, onnx_int8"):
        Predictor(path, artifact="onnx_fp16")
    with pytest.raises(BundleError, match="torchscript_fp32 is a torchscript file; this runtime runs ONNX artifacts only"):
        Predictor(path, artifact="torchscript_fp32")
    ts_only, _ = build_bundle(tmp_path / "ts", fp32=False, torchscript=True)
    with pytest.raises(BundleError, match="has no ONNX artifact"):
        Predictor(ts_only)


def test_threads_and_providers(bundle):
    path, _ = bundle
    bundle_obj = load_bundle(path)
    assert Predictor(bundle_obj, threads=2).predict(np.zeros(16000, np.float32)).label in LABELS
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            Predictor(bundle_obj, threads=bad)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
            Predictor(bundle_obj, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ValueError, match="NoSuchExecutionProvider is not available"):
        Predictor(bundle_obj, providers="NoSuchExecutionProvider")
    assert Predictor(bundle_obj, providers=[("CPUExecutionProvider", {})]).providers == ["CPUExecutionProvider"]


def test_artifact_changed_after_loading_is_refused(tmp_path):
    path, _ = build_bundle(tmp_path / "b")
    loaded = load_bundle(path)
    data = bytearray((path / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 .* does not match"):
        Predictor(loaded)


def _single_artifact_bundle(folder: Path, file: str, **entry):
    write_manifest(folder, manifest_for({"m": artifact_entry(folder, file, **entry)}))
    return folder


def test_model_that_does_not_fit_the_bundle_is_refused(tmp_path):
    # checksummed garbage
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf")
    with pytest.raises(BundleError, match="m.onnx: onnxruntime cannot load it"):
        Predictor(_single_artifact_bundle(tmp_path / "a", "m.onnx"))
    # wrong input name in the manifest
    (tmp_path / "b").mkdir()
    linear_onnx(tmp_path / "b" / "m.onnx", *linear_weights())
    with pytest.raises(BundleError, match="do not include the manifest's 'features'"):
        Predictor(_single_artifact_bundle(tmp_path / "b", "m.onnx", input_name="features"))
    # a model for the "fine" features in a bundle whose spec is "seed"
    (tmp_path / "c").mkdir()
    fine = SEED.preset("fine")
    linear_onnx(tmp_path / "c" / "m.onnx", *linear_weights(fine), spec=fine)
    with pytest.raises(BundleError, match=r"takes log_mel input of shape \['batch', 1, 40, 101\]"):
        Predictor(_single_artifact_bundle(tmp_path / "c", "m.onnx"))
    # ten outputs for twelve labels
    (tmp_path / "d").mkdir()
    linear_onnx(tmp_path / "d" / "m.onnx", *linear_weights(n_labels=10))
    with pytest.raises(BundleError, match="10 classes but the bundle has 12 labels"):
        Predictor(_single_artifact_bundle(tmp_path / "d", "m.onnx"))


def test_every_broken_audio_file_is_an_audio_error(bundle, tmp_path):
    from broken_audio import broken_files

    predictor = Predictor(bundle[0], artifact="onnx_fp32")
    for name, (data, message) in broken_files(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AudioError, match=message) as info:
            predictor.predict([np.zeros(100, np.float32), tmp_path / name])
        assert type(info.value) is AudioError and str(tmp_path / name) in str(info.value)


@pytest.mark.parametrize("agreement, chosen", [(0.90, "onnx_fp32"), (0.99, "onnx_int8"), (None, "onnx_int8")])
def test_an_int8_model_that_disagrees_with_fp32_is_not_the_default(tmp_path, agreement, chosen, capsys):
    from kws_runtime.cli import main

    path, _ = build_bundle(tmp_path / "b", int8=True)
    manifest = read_manifest(path)
    if agreement is not None:
        manifest["artifacts"]["onnx_int8"]["metrics"] = {"agreement_fp32": agreement, "test_clips": 300}
    write_manifest(path, manifest)
    predictor = Predictor(path)
    assert predictor.artifact.name == chosen
    assert bool(predictor.skipped) == (chosen == "onnx_fp32")
    assert Predictor(path, artifact="onnx_int8").artifact.name == "onnx_int8"  # asked for by name: used
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, np.zeros(SEED.clip_samples, np.float32), SEED.sample_rate)
    assert main(["predict", str(path), str(clip)]) == 0
    assert main(["info", str(path)]) == 0
    err = capsys.readouterr().err
    if chosen == "onnx_fp32":
        assert "kws: note: onnx_int8 agrees with the fp32 model on only 90.0% of 300 test clips" in err
        assert "using onnx_fp32" in err and "kws: warning: onnx_int8 agrees" in err
    else:
        assert err == ""


@pytest.mark.parametrize("reduce_range, saturates, chosen", [
    (False, True, "onnx_fp32"), (False, False, "onnx_int8"), (True, True, "onnx_int8"), (None, True, "onnx_int8"),
])
def test_full_range_int8_weights_are_not_the_default_where_they_saturate(tmp_path, monkeypatch, reduce_range,
                                                                         saturates, chosen):
    import kws_runtime.bundle

    # Which CPU runs the tests is not the test's to choose: the answer of the CPU check is.
    monkeypatch.setattr(kws_runtime.bundle, "int8_pairs_saturate", lambda: saturates)
    path, _ = build_bundle(tmp_path / "b", int8=True)
    manifest = read_manifest(path)
    if reduce_range is not None:  # bundles from other tools may say nothing
        manifest["artifacts"]["onnx_int8"]["notes"] = {"quantization": {"reduce_range": reduce_range}}
    write_manifest(path, manifest)
    predictor = Predictor(path)
    assert predictor.artifact.name == chosen
    if chosen == "onnx_fp32":
        assert "full-range int8 weights" in predictor.skipped[0] and "kws-export requantize" in predictor.skipped[0]
    assert Predictor(path, artifact="onnx_int8").artifact.name == "onnx_int8"  # asked for by name: used


def test_the_cpu_check_reads_vnni_from_the_flags():
    from kws_runtime.cpu import flags_have_vnni

    assert flags_have_vnni("processor : 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert flags_have_vnni("flags : fpu avx2 avx_vnni\n")
    assert not flags_have_vnni("flags : fpu sse avx2 fma\nbugs : avx512_vnni\n")  # only the flags line counts

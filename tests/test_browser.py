"""The web page of ``kws serve`` in a real browser: onnxruntime-web runs the shipped bundle's
int8 end-to-end model, from a fake microphone playing a recording and from the file picker,
and finds what ``kws stream`` finds in the same recording."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import browser
from kws_runtime import BundleError, load_bundle
from kws_runtime.serve import ORT_FILES, PAGE_FILES, PageServer, ServeError, choose_e2e
from kws_runtime.stream import Detector, DetectorConfig
from kws_runtime.stream_eval import build_stream, record_scores, replay, write_stream

BUNDLE = Path(__file__).resolve().parents[1] / "pretrained" / "shufflenet-v2-0.5x"
SECONDS = 12.0
HOP_S = 0.1


# The fake microphone's audio is resampled twice on its way to the page, and under load a real-time
# capture can differ by more; a distractor the reference scores just under the threshold may then
# fire in the browser alone (a "dog" the reference averaged 0.79 for "down" fired at 0.82 there).
# The recording is chosen so that the reference fires the same words at this much lower a threshold.
MARGIN = 0.15


@pytest.fixture(scope="module")
def recording(real_data, tmp_path_factory) -> Path:
    """12 s of real clips over real noise at 20 dB, two keywords among distractors none of
    which comes near the threshold."""
    default = DetectorConfig()
    detector = Detector(BUNDLE, default, artifact="onnx_e2e_int8", threads=1)
    lowered = DetectorConfig(threshold=default.threshold - MARGIN)
    for seed in range(3, 30):
        audio, placed = build_stream(real_data, SECONDS, 20.0, seed=seed)
        if sum(p.label != "_unknown_" for p in placed) < 2:
            continue
        scored = record_scores(detector, audio)  # scored once, replayed at both thresholds
        fired = [[e.label for e in replay(*scored, config, detector.labels)] for config in (default, lowered)]
        if fired[0] == fired[1]:
            return write_stream(tmp_path_factory.mktemp("browser"), "stream", audio, placed)
    pytest.fail(f"no seed gave a recording whose words fire alike at a threshold {MARGIN} lower")


@pytest.fixture(scope="module")
def expected(recording) -> list:
    """What ``kws stream`` finds with the same artifact: the reference the page must match."""
    out = subprocess.run([sys.executable, "-m", "kws_runtime.cli", "stream", str(BUNDLE), str(recording), "--json",
                          "--artifact", "onnx_e2e_int8"], capture_output=True, text=True, check=True)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(events) >= 2, out.stdout
    return events


@pytest.fixture(scope="module")
def playwright():
    why = browser.missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def url():
    why = browser.ort_web_missing()
    if why:
        pytest.skip(why)
    with browser.kws_serve(BUNDLE) as address:
        yield address


def launch(playwright, *args):
    return playwright.chromium.launch(executable_path=browser.chromium_path(), args=browser.CHROMIUM_ARGS + list(args))


def assert_same_events(got: list, want: list, time_tolerance: float):
    assert [e["label"] for e in got] == [e["label"] for e in want], (got, want)
    for g, w in zip(got, want):
        assert abs(g["time"] - w["time"]) <= time_tolerance + 1e-9, (got, want)
        assert abs(g["score"] - w["score"]) < 0.1, (got, want)


# ------------------------------------------------------------------------------ in the browser


@pytest.mark.parametrize("threads", [1, 2])
def test_file_picker_finds_what_kws_stream_finds(playwright, url, recording, expected, threads):
    chromium = launch(playwright)
    try:
        page = browser.open_page(chromium, f"{url}?threads={threads}")
        state = page.evaluate("({threads: window.kws.threads, isolated: self.crossOriginIsolated})")
        assert state == {"threads": threads, "isolated": True}
        page.set_input_files("#file", str(recording))
        page.wait_for_function("window.kws.fileDone || window.kws.error", timeout=120_000)
        state = page.evaluate("window.kws")
        assert state["error"] is None
        # the same samples through the same int8 model: the same hops fire
        assert_same_events(state["events"], expected, time_tolerance=0)
        assert len(state["hopMs"]) == round((SECONDS + 0.5) / HOP_S)
        rows = page.locator("#events tbody tr").all_inner_texts()
        assert [r.split("\t")[1] for r in rows[::-1]] == [e["label"] for e in expected]
    finally:
        chromium.close()


@pytest.mark.parametrize("resample", ["browser", "page"])
def test_fake_microphone_finds_what_kws_stream_finds(playwright, url, recording, expected, resample):
    chromium = launch(playwright, *browser.fake_microphone_args(recording))
    try:
        page = browser.open_page(chromium, url + ("?resample=page" if resample == "page" else ""))
        page.click("#start")
        # real time: the recording plays once (Chromium then loops it)
        page.wait_for_function(f"window.kws.samplesFed >= {SECONDS + 0.5} * 16000 || window.kws.error",
                               timeout=int(SECONDS * 1000) + 30_000)
        state = page.evaluate("window.kws")
        assert state["error"] is None and state["mode"] == "listening"
        if resample == "page":
            assert state["resampledInPage"], "the audio context ran at the model's rate: nothing was resampled"
        first_pass = [e for e in state["events"] if e["time"] <= SECONDS + 0.5]
        # the browser resamples the fake device's audio twice: a hop either way is the same detection
        assert_same_events(first_pass, expected, time_tolerance=HOP_S)
        assert "listening" in page.inner_text("#status")
        # a recording chosen while listening stops the microphone first: its hops alone reach the detector
        page.set_input_files("#file", str(recording))
        page.wait_for_function("window.kws.fileDone || window.kws.error", timeout=120_000)
        state = page.evaluate("window.kws")
        assert state["mode"] == "idle" and state["error"] is None
        assert_same_events(state["events"], expected, time_tolerance=0)
    finally:
        chromium.close()


def test_refused_microphone_is_explained(playwright, url):
    chromium = launch(playwright, "--use-fake-device-for-media-stream")  # a device, but no permission
    try:
        page = browser.open_page(chromium, url)
        page.click("#start")
        page.wait_for_selector("#message:not([hidden])", timeout=20_000)
        assert "refused" in page.inner_text("#message") and "recording" in page.inner_text("#message")
        assert page.evaluate("window.kws.mode") == "idle"
    finally:
        chromium.close()


def test_missing_microphone_is_explained(playwright, url):
    chromium = launch(playwright)  # permission, but no device at all
    try:
        page = browser.open_page(chromium, url, permissions=["microphone"])
        page.click("#start")
        page.wait_for_selector("#message:not([hidden])", timeout=20_000)
        assert "No microphone" in page.inner_text("#message")
    finally:
        chromium.close()


def test_undecodable_file_is_explained(playwright, url, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    chromium = launch(playwright)
    try:
        page = browser.open_page(chromium, url)
        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#message:not([hidden])", timeout=20_000)
        assert "notes.wav" in page.inner_text("#message") and "cannot decode" in page.inner_text("#message")
    finally:
        chromium.close()


def test_page_resampler_matches_soxr(playwright, url):
    import soxr

    t = np.arange(48_000) / 48_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    chromium = launch(playwright)
    try:
        page = browser.open_page(chromium, url)
        got = page.evaluate(
            """async (samples) => {
                const { Resampler } = await import("./detector.js");
                const r = new Resampler(48000, 16000);
                const x = Float32Array.from(samples), out = [];
                for (let i = 0; i < x.length; i += 4800) out.push(...r.process(x.subarray(i, i + 4800)));
                return out;
            }""",
            tone.tolist(),
        )
    finally:
        chromium.close()
    want = soxr.resample(tone, 48_000, 16_000)
    got = np.asarray(got)
    n = min(len(got), len(want)) - 200  # the last outputs wait for more input
    assert abs(len(got) - len(want)) < 100
    assert np.abs(got[200:n] - want[200:n]).max() < 0.01


# -------------------------------------------------------------------------------- the server


def fetch(url: str):
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), b""


def test_server_serves_the_page_its_config_and_nothing_else(url):
    bundle = load_bundle(BUNDLE)
    status, headers, body = fetch(url + "config.json")
    config = json.loads(body)
    assert status == 200 and headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert config["artifact"] == "onnx_e2e_int8" and config["labels"] == list(bundle.labels)
    assert config["detector"]["hop_ms"] == 100.0 and config["quiet_labels"] == ["_silence_", "_unknown_"]
    status, headers, body = fetch(url + "model.onnx")
    assert body == bundle.artifacts["onnx_e2e_int8"].path.read_bytes()
    assert fetch(url + "ort/ort-wasm-simd-threaded.wasm")[1]["Content-Type"] == "application/wasm"
    for path in PAGE_FILES:
        assert fetch(url + path.lstrip("/"))[0] == 200, path
    for path in ("../manifest.json", "manifest.json", "ort/ort.all.min.mjs", "%2e%2e/%2e%2e/etc/passwd", "ort/"):
        assert fetch(url + path)[0] == 404, path


def test_server_serves_what_it_checked_at_start_up(tmp_path):
    missing = browser.ort_web_missing()
    if missing:
        pytest.skip(missing)
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy)
    model = copy / "model.e2e.int8.onnx"
    served = model.read_bytes()
    server = PageServer(load_bundle(copy), DetectorConfig(), port=0)
    server.start()
    try:
        model.write_bytes(b"changed after start-up")  # a later change never reaches the page
        assert fetch(server.url + "model.onnx")[2] == served
    finally:
        server.shutdown()
        server.server_close()
    bundle = load_bundle(copy, verify=False)
    with pytest.raises(BundleError, match=r"model\.e2e\.int8\.onnx: is 22 bytes but the manifest says"):
        PageServer(bundle, DetectorConfig(), port=0)


def test_server_passes_the_detector_options_on(url):
    with browser.kws_serve(BUNDLE, "--threshold", "0.6", "--hop-ms", "50") as address:
        detector = json.loads(fetch(address + "config.json")[2])["detector"]
    assert detector["threshold"] == 0.6 and detector["hop_ms"] == 50.0


def kws_serve(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kws_runtime.cli", "serve", *map(str, args)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_server_errors_are_one_line(tmp_path):
    out = kws_serve(BUNDLE, "--ort-dir", tmp_path, "--port", "0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "npm ci --prefix web" in out.stderr, out.stderr
    # The errors below come after the onnxruntime-web check, so they need its files present, not
    # working: they must hold without `npm ci` too.
    ort = tmp_path / "ort"
    ort.mkdir()
    for name in ORT_FILES:
        (ort / name).write_bytes(b"")
    out = kws_serve(BUNDLE, "--ort-dir", ort, "--artifact", "onnx_int8", "--port", "0")
    assert out.returncode == 2 and "not an end-to-end ONNX artifact" in out.stderr, out.stderr
    out = kws_serve(BUNDLE, "--ort-dir", ort, "--port", "70000")
    assert out.returncode == 2 and "0 to 65535" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bundle_without_an_end_to_end_model_is_refused():
    bundle = load_bundle(BUNDLE)
    only_features = type(bundle)(**{**bundle.__dict__, "artifacts": {"onnx_int8": bundle.artifacts["onnx_int8"]}})
    with pytest.raises(ServeError, match="--formats onnx_e2e_int8"):
        choose_e2e(only_features)
    assert choose_e2e(bundle).name == "onnx_e2e_int8"

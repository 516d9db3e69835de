"""The page of ``kws serve`` in headless Chromium: the model's time per hop in the browser
(onnxruntime-web, WebAssembly, one thread and with threads) against ``kws stream``'s on the
same recording, and what the page downloads.

    python tools/bench_browser.py pretrained/shufflenet-v2-0.5x [--seconds 30]

The page's file picker runs the recording's hops back to back and times each model run
(``session.run``); ``kws stream``'s detector runs the same int8 end-to-end artifact and, for
reference, its default (the int8 network on incremental features), both on one thread, taking
turns with the browser runs. The float end-to-end artifact is measured beside the int8 one. Needs Playwright, Chromium and onnxruntime-web (`tests/browser.py`).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS.parent), str(TOOLS.parent / "tests")]

import browser  # noqa: E402
from kws_runtime.stream import Detector, DetectorConfig  # noqa: E402

REAL = TOOLS.parents[1] / "shared" / "data" / "speech_commands_real"


def page_hops(playwright, url: str, recording: Path, threads: int) -> dict:
    """Per-hop model times of the page's file picker over ``recording``, and what the page loaded."""
    chromium = playwright.chromium.launch(executable_path=browser.chromium_path(), args=browser.CHROMIUM_ARGS)
    try:
        context = chromium.new_context()
        page = context.new_page()
        sizes = {}
        page.on("response", lambda r: sizes.__setitem__(r.url.split("/")[-1].split("?")[0] or "index.html", len(r.body())))
        start = time.perf_counter()
        page.goto(f"{url}?threads={threads}")
        page.wait_for_function("window.kws && (window.kws.ready || window.kws.error)", timeout=120_000)
        ready_s = time.perf_counter() - start
        page.set_input_files("#file", str(recording))
        page.wait_for_function("window.kws.fileDone || window.kws.error", timeout=600_000)
        state = page.evaluate("window.kws")
    finally:
        chromium.close()
    if state["error"]:
        raise RuntimeError(f"the page failed: {state['error']}")
    hops = sorted(state["hopMs"][3:])  # the first runs warm the WebAssembly code up
    return {"threads": state["threads"], "hops": len(hops), "median_ms": statistics.median(hops),
            "p90_ms": hops[int(0.9 * (len(hops) - 1))], "ready_s": ready_s, "events": state["events"], "files": sizes}


def stream_hop_ms(bundle: str, audio: np.ndarray, artifact=None) -> float:
    """``kws stream``'s detector, one thread: milliseconds per hop, features and smoothing included."""
    detector = Detector(bundle, DetectorConfig(), artifact=artifact, threads=1)
    detector.feed(audio[: detector.spec.clip_samples])  # warm-up
    detector.reset()
    start = time.perf_counter()
    detector.feed(audio)
    return 1e3 * (time.perf_counter() - start) / (len(audio) // detector.hop)


def measure(bundle: str, seconds: float = 30.0, thread_counts=(1, 2), artifacts=("onnx_e2e_int8", "onnx_e2e")) -> dict:
    from playwright.sync_api import sync_playwright

    from kws_runtime.stream_eval import build_stream, write_stream

    why = browser.missing()
    if why:
        return {"absent": why}
    audio, placed = build_stream(REAL, seconds, 10.0, seed=5)
    rows, files = [], {}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        recording = write_stream(tmp, "stream", audio, placed)
        for artifact in artifacts:
            with browser.kws_serve(bundle, "--artifact", artifact) as url:
                for threads in thread_counts:
                    row = page_hops(playwright, url, recording, threads)
                    files.setdefault(artifact, row.pop("files"))
                    # kws stream takes its turn after each browser run, so load hits both alike
                    rows.append({"artifact": artifact, **row, "kws_stream_ms": stream_hop_ms(bundle, audio, artifact)})
    page = files[artifacts[0]]
    return {
        "bundle": Path(bundle).name, "audio_s": seconds, "rows": rows,
        "kws_stream_default_ms": stream_hop_ms(bundle, audio),
        "download": {"files": page, "total_mb": sum(page.values()) / 1e6,
                     "wasm_gzip_mb": _gzip_mb(browser.ort_web_dir() / "ort-wasm-simd-threaded.wasm")},
        "same_events_every_run": all(r["events"] == rows[0]["events"] for r in rows if r["artifact"] == artifacts[0]),
    }


def _gzip_mb(path: Path) -> float:
    return len(gzip.compress(path.read_bytes(), 6)) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the recording (default 30)")
    args = parser.parse_args()
    r = measure(args.bundle, args.seconds)
    if "absent" in r:
        print(f"not measured: {r['absent']}")
        return 1
    for row in r["rows"]:
        print(f"{row['artifact']}, browser, {row['threads']} thread(s): median {row['median_ms']:.2f} ms per hop "
              f"(p90 {row['p90_ms']:.2f}, {row['hops']} hops), page ready in {row['ready_s']:.1f} s; "
              f"kws stream on the same artifact, 1 thread: {row['kws_stream_ms']:.2f} ms")
    print(f"kws stream's default (onnx_int8, incremental features), 1 thread: {r['kws_stream_default_ms']:.2f} ms per hop")
    d = r["download"]
    print(f"page download {d['total_mb']:.1f} MB ({', '.join(f'{k} {v / 1e6:.2f}' for k, v in d['files'].items())}); "
          f"the WebAssembly file gzipped {d['wasm_gzip_mb']:.1f} MB")
    print(f"same events in every browser run: {r['same_events_every_run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tools/bench.py --quick`: every area measured and written, the JSON and the Markdown agreeing.
Timings are not asserted (a shared machine's are noise); their presence and sense are."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AREAS = ("features", "inference", "end_to_end", "streaming", "browser", "footprint", "training_data", "gpu")


def test_quick_benchmark_writes_every_area(real_data, tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--data", str(real_data),
                           "--json", str(out_json), "--markdown", str(out_md)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out_json.read_text())
    assert r["quick"] and r["command"] == "python tools/bench.py --quick"
    assert r["machine"]["cores"] >= 1 and r["machine"]["versions"]["onnxruntime"]
    for area in AREAS:
        assert r[area]["seconds"] >= 0, area
    assert {row["preset"] for row in r["features"]["rows"]} == {"librosa", "fine"}
    assert all(row["max_diff_db"] < 1e-3 and row["rfft_floor_us"] > 0 for row in r["features"]["rows"])
    artifacts = {(row["bundle"], row["artifact"]) for row in r["inference"]["rows"]}
    assert ("shufflenet-v2-0.5x", "onnx_int8") in artifacts and ("shufflenet-v2-0.5x", "onnx_e2e") in artifacts
    assert all(row["latency_ms"] > 0 and row["throughput_clips_per_s"] > 0 for row in r["inference"]["rows"])
    (e2e,) = [row for row in r["end_to_end"]["rows"] if row["model"] == "shufflenet-v2-0.5x"]
    assert abs(e2e["parts_ms"] - (e2e["load_ms"] + e2e["features_ms"] + e2e["model_ms"])) < 1e-9
    assert e2e["vs_seed_path"] > 0 and e2e["seed_original_ms"] > 0
    assert all(row["incremental"] and 0 < row["real_time_factor"] < 1 for row in r["streaming"]["rows"])
    assert all(set(row["features_us"]) == {"warm", "after_model", "after_8mb_read"} and min(row["features_us"].values()) > 0
               for row in r["streaming"]["rows"])
    footprint = r["footprint"]
    assert footprint["import_s"]["kws_runtime"] > 0 and footprint["predict_peak_rss_mb"] > 10
    assert footprint["installed"]["runtime"]["mb"] < footprint["installed"]["training"]["mb"]
    assert r["training_data"]["rows"][0]["vs_baseline"] == 1.0
    assert r["gpu"]["rows"] or r["gpu"]["absent"]
    if "absent" not in r["browser"]:  # Chromium, Playwright and onnxruntime-web are here
        assert all(row["median_ms"] > 0 and row["hops"] > 10 for row in r["browser"]["rows"])
        assert r["browser"]["download"]["files"]["model.onnx"] > 1e5 and r["browser"]["same_events_every_run"]
    text = out_md.read_text()
    for heading in ("## Features", "## Inference per artifact", "## End to end", "## Streaming", "## In the browser", "## Footprint",
                    "## Training data pipeline", "## GPU"):
        assert heading in text, heading
    assert "| shufflenet-v2-0.5x | onnx_int8 | onnx | int8 |" in text

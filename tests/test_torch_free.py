"""kws_runtime works in an interpreter where torch, librosa and thop cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bundle_builders import LABELS, SEED, build_bundle

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "librosa", "thop")

CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys, time

    BLOCKED = set({blocked!r})

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not available in this interpreter")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        sys.modules[name] = None  # what "import torch" sees when torch is absent

    for name in BLOCKED:  # the block itself works
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{name}} imported despite the block")

    start = time.perf_counter()
    import kws_runtime
    import_seconds = time.perf_counter() - start
    lazy = "onnxruntime" not in sys.modules

    from kws_runtime import Predictor, load_bundle, log_mel, load_audio
    from kws_runtime.cli import main

    bundle = load_bundle(sys.argv[1])
    predictor = Predictor(bundle, threads=1)
    files = sys.argv[2:]
    predictions = predictor.predict(files)
    features = log_mel(load_audio(files[0]))
    code = main(["predict", sys.argv[1], *files, "--json", "--artifact", "onnx_fp32"])
    loaded = sorted({{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}} & BLOCKED)
    print(json.dumps({{
        "import_seconds": import_seconds,
        "lazy_onnxruntime": lazy,
        "artifact": predictor.artifact.name,
        "labels": [p.label for p in predictions],
        "probabilities": [[p.probabilities[l] for l in bundle.labels] for p in predictions],
        "features_shape": list(features.shape),
        "cli_code": code,
        "blocked_modules_loaded": loaded,
    }}))
    """
).format(blocked=BLOCKED)


def test_runtime_imports_and_predicts_without_torch_librosa_thop(tmp_path):
    bundle, expected = build_bundle(tmp_path / "bundle", int8=True)
    rng = np.random.default_rng(0)
    clips = (0.2 * rng.standard_normal((3, SEED.clip_samples))).astype(np.float32)
    files = []
    for i, clip in enumerate(clips):
        files.append(tmp_path / f"clip{i}.wav")
        soundfile.write(files[-1], clip, SEED.sample_rate, subtype="FLOAT")

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), *map(str, files)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    *cli_lines, report_line = result.stdout.strip().splitlines()
    report = json.loads(report_line)

    assert report["blocked_modules_loaded"] == []
    assert report["lazy_onnxruntime"], "import kws_runtime should not import onnxruntime"
    assert report["artifact"] == "onnx_int8"
    assert report["features_shape"] == [40, 32]
    got = np.array(report["probabilities"])
    assert np.abs(got - expected["onnx_int8"](clips)).max() < 0.05
    assert report["cli_code"] == 0
    cli = [json.loads(line) for line in cli_lines]
    assert [c["path"] for c in cli] == [str(f) for f in files]
    want = expected["onnx_fp32"](clips)
    assert [c["label"] for c in cli] == [LABELS[i] for i in want.argmax(axis=1)]
    assert "Traceback" not in result.stderr


LAUNCH = textwrap.dedent(
    """
    import sys

    for name in {blocked!r}:
        sys.modules[name] = None  # what "import torch" sees when torch is absent
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == sys.argv[1]]
    sys.argv = [script.name, *sys.argv[2:]]
    sys.exit(script.load()())
    """
)


@pytest.mark.parametrize(
    "command, args",
    [("kws-train", ["profile"]), ("kws-data", ["stats", "{tmp}/data"]),
     ("kws-export", ["{tmp}/best.pt", "--out", "{tmp}/bundle"])],
)
def test_training_commands_without_the_train_extra_say_which_extra_to_install(command, args, tmp_path):
    # the installed entry points, as a runtime-only install (no torch, tqdm, eSpeak) would run them
    child = LAUNCH.format(blocked=("torch", "tqdm", "librosa", "onnx", "matplotlib", "espeakng_loader"))
    args = [a.format(tmp=tmp_path) for a in args]
    (tmp_path / "data" / "yes").mkdir(parents=True)
    soundfile.write(tmp_path / "data" / "yes" / "a_nohash_0.wav", np.zeros(SEED.clip_samples, np.float32), SEED.sample_rate)
    result = subprocess.run([sys.executable, "-c", child, command, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{command}: error: ")
    assert "is not installed" in result.stderr and "pip install 'kws-toolkit[train]'" in result.stderr

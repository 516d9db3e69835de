"""Measure how fast `kws-data synth` renders clips on this machine.

    python tools/bench_synth.py                      # 35 words x 286 = 10,010 clips, all CPUs
    python tools/bench_synth.py --per-word 30 --jobs 1 --noise ../shared/data/speech_commands_real

Writes into a temporary folder that is deleted afterwards and prints one JSON line: clips,
seconds, clips per second, CPU milliseconds per clip, worker processes, CPUs, and the 1-minute
load average before and after (other work on the machine slows the wall-clock rate down;
report the load with the number; CPU time per clip is much less sensitive to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kws_train.synth import default_jobs, synthesize_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-word", type=int, default=286, help="clips per word (default 286: 10,010 clips)")
    parser.add_argument("--words", nargs="+", default=None, help="default: the 35 Speech Commands words")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: all CPUs)")
    parser.add_argument("--noise", default=None, help="noise folder or dataset root (mixing adds a little work)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    tmp = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    try:
        t0 = time.perf_counter()
        report = synthesize_dataset(
            tmp / "synth", words=args.words, per_word=args.per_word, seed=args.seed, noise=args.noise,
            jobs=args.jobs, progress=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "clips": report.clips,
        "wall_s": round(wall, 2),
        "render_s": round(report.seconds, 2),
        "clips_per_s": round(report.clips / wall, 1),
        # CPU time of the workers and their children: what the clips cost without contention.
        "cpu_ms_per_clip": round((_children_cpu() - cpu_before) / report.clips * 1000, 2),
        "jobs": report.jobs,
        "cpus": default_jobs(),
        "noise": bool(args.noise),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(json.dumps(result))
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput (clips per second) of every model and variant, per feature preset.

    python tools/bench_train.py                                   # CPU, batch 64, both presets
    python tools/bench_train.py --device cuda --batch 256 --amp auto --models resnet18

Times `kws_train.trainer.train_epoch`, the step the trainer runs: augmentation and log-mel on
the device, forward, backward and an AdamW step, on batches of random 1 s audio already on
the device (so the number is the compute cost, not the data loading). A few warm-up steps
are run first and not timed. Prints a table and, with --json, one JSON object per row.

The number depends on everything else the machine is doing: the script prints the 1-minute
load average before and after; report it with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kws_runtime.spec import FeatureSpec  # noqa: E402
from kws_train.augment import AugmentConfig, build_frontend  # noqa: E402
from kws_train.dataset import background_noise  # noqa: E402
from kws_train.models import ARCHITECTURES, VARIANTS, build_model, model_variants  # noqa: E402
from kws_train.trainer import resolve_autocast, train_epoch  # noqa: E402

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands_real"


def bench_one(architecture, variant, spec, noise, *, batch, steps, warmup, device, amp, channels_last, seed=0):
    torch.manual_seed(seed)
    device = torch.device(device)
    model = build_model(architecture, 12, variant).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    frontend = build_frontend(spec, AugmentConfig(), noise, seed=seed).to(device)
    frontend.log_mel.fft_dtype = torch.float32  # as the trainer does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dtype = resolve_autocast(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator(device=device).manual_seed(seed)

    def batches(n):
        return [(0.1 * torch.randn(batch, spec.clip_samples, generator=g, device=device),
                 torch.randint(0, 12, (batch,), generator=g, device=device)) for _ in range(n)]

    step = dict(device=device, autocast_dtype=dtype, channels_last=channels_last)
    train_epoch(model, frontend, batches(warmup), optimizer, scheduler, scaler, criterion, **step)
    timed = batches(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    train_epoch(model, frontend, timed, optimizer, scheduler, scaler, criterion, **step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
    return batch * steps / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--features", nargs="+", default=["fine", "librosa"], choices=["fine", "librosa"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    noise = background_noise(REAL_DATA) if REAL_DATA.is_dir() else []
    if not noise:  # any long noise will do for timing
        noise = [np.random.default_rng(0).standard_normal(160000).astype(np.float32) * 0.1]
    load_before = os.getloadavg()[0]
    rows = []
    for features in args.features:
        spec = FeatureSpec.preset(features)
        for architecture in args.models:
            for variant in (v for v in args.variants if v in model_variants(architecture)):
                clips_per_s = bench_one(architecture, variant, spec, noise, batch=args.batch, steps=args.steps,
                                        warmup=args.warmup, device=args.device, amp=args.amp,
                                        channels_last=torch.device(args.device).type == "cuda")
                row = {"model": architecture, "variant": variant, "features": features, "input": "x".join(map(str, spec.shape)),
                       "batch": args.batch, "train_clips_per_s": round(clips_per_s, 1)}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    machine = {
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "amp": args.amp,
        "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(machine))
        return 0
    header = ("model", "variant", "features", "input", "batch", "clips/s")
    lines = [(r["model"], r["variant"], r["features"], r["input"], str(r["batch"]), f"{r['train_clips_per_s']:.1f}") for r in rows]
    widths = [max(len(x[i]) for x in [header] + lines) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths)] + lines:
        print("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print(json.dumps(machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())

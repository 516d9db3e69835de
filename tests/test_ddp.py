"""Data-parallel training under torchrun: two CPU processes with the gloo backend.

Each rank is given its own output folder, so a file written by rank 1 would show up in its
folder; only rank 0 may write anything. Both ranks must end with the same weights.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from tiny_dataset import SALT, make_tiny_dataset

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from kws_train.models import build_model
    from kws_train.config import TrainConfig
    from kws_train.trainer import train

    data, base = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    config = TrainConfig(
        data=data, out=os.path.join(base, f"rank{rank}"), cache_dir=os.path.join(base, "cache"),
        architecture="mobilenet_v2", variant="seed", features="seed", epochs=1, batch_size=4,
        split="speaker", split_salt=sys.argv[3], validation_fraction=0.2, testing_fraction=0.2,
        device="cpu", threads=1, quiet=True, seed=5,
    )
    result = train(config)
    digest = hashlib.sha256()
    for name, p in sorted(result.model.named_parameters()):
        digest.update(name.encode()); digest.update(p.detach().numpy().tobytes())
    torch.manual_seed(config.seed)
    initial = build_model("mobilenet_v2", len(result.labels), "seed").state_dict()
    changed = any(not torch.equal(p.detach(), initial[n]) for n, p in result.model.named_parameters())
    report = {"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "params": digest.hexdigest(),
              "changed": changed, "val_acc": result.validation.accuracy}
    # the ranks share stdout, where lines can interleave: each reports in its own file
    with open(os.path.join(sys.argv[4], f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    """
)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_cpu_ranks_agree_and_only_rank0_writes(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    base = tmp_path / "runs"
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(data), str(base), SALT, str(reports_dir)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((reports_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world"] == 2 for r in reports)
    assert reports[0]["params"] == reports[1]["params"], "ranks ended with different weights"
    assert reports[0]["changed"], "training did not change the weights"
    # validation is sharded and summed: both ranks report the same figure
    assert reports[0]["val_acc"] == reports[1]["val_acc"]
    written = {p.name for p in (base / "rank0").iterdir()}
    assert {"best.pt", "last.pt", "metrics.jsonl", "curves.png", "confusion.png", "summary.json"} <= written
    assert not (base / "rank1").exists(), "rank 1 wrote files"

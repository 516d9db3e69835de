"""Briefly trained models, saved as checkpoints, for the export tests.

A model is trained for a few steps on 8 real clips per class (40 x 32 features, the cheapest)
and its batch norm statistics re-estimated, so that exported artifacts have decisions to keep:
enough to check formats, not to measure accuracy.
"""

import numpy as np
import torch

from kws_runtime import FeatureSpec, log_mel
from kws_train.checkpoint import save_checkpoint
from kws_train.dataset import build_task, index_dataset, load_example, split_by_speaker
from kws_train.models import build_model
from kws_train.config import TrainConfig

SPEC = FeatureSpec()  # 40 x 32: the cheapest features
SALT = ""
STEPS = 6


def run_config(real_data, arch) -> dict:
    """The run recipe a checkpoint records: the speaker split of ``real_data`` with `SALT`."""
    return TrainConfig(data=str(real_data), architecture=arch, features="seed", split="speaker", split_salt=SALT).to_dict()


def training_batch(real_data):
    """``(labels, features, targets)`` of 8 training clips per class (the split `run_config` names)."""
    clips = split_by_speaker(index_dataset(real_data), 0.1, 0.1, SALT)
    task = build_task(clips, "12", "training", root=real_data, spec=SPEC)
    by_label = {}
    for e in task.examples:
        by_label.setdefault(e.label, []).append(e)
    chosen = [e for label in task.labels for e in by_label[label][:8]]
    x = torch.from_numpy(log_mel(np.stack([load_example(e, SPEC) for e in chosen]), SPEC)[:, None])
    y = torch.tensor([task.labels.index(e.label) for e in chosen])
    return task.labels, x, y


def train_checkpoint(arch, batch, path, real_data):
    """Train ``arch`` for `STEPS` steps on ``batch`` (from `training_batch`) and save it to ``path``."""
    labels, x, y = batch
    torch.manual_seed(0)
    model = build_model(arch, len(labels))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        chosen = torch.randperm(len(x), generator=generator)[:32]
        loss = torch.nn.functional.cross_entropy(model(x[chosen]), y[chosen])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # A few steps leave batch norm's running statistics near their initial values, which blows
    # eval-mode activations up; re-estimate them on the training batch as a short fine-tune would.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(x)
    model.eval()
    return save_checkpoint(path, model, architecture=arch, variant="default", labels=labels, spec=SPEC,
                           config=run_config(real_data, arch))

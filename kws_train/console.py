"""The ``kws-train`` and ``kws-data`` entry points: one line naming the extra when a training
dependency is missing (``pip install .`` installs the runtime only)."""

from kws_runtime.extras import launch


def train() -> int:
    return launch("kws_train.cli", "kws-train")


def data() -> int:
    return launch("kws_train.data_cli", "kws-data")

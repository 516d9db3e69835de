"""The ``kws-export`` entry point: one line naming the extra when torch or onnx is missing."""

from kws_runtime.extras import launch


def main() -> int:
    return launch("kws_export.cli", "kws-export")

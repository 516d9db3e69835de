"""Console scripts whose code needs an optional extra of the distribution.

``pip install .`` installs the runtime alone, yet the distribution also carries the training
and export commands. Their entry points (``kws_train.console``, ``kws_export.console``) run
through `launch`: a missing package of an extra is then one line that names the extra to
install, not a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib
import sys

from . import exit_codes

DISTRIBUTION = "kws-toolkit"

# Top-level modules each extra brings (import names, not package names).
EXTRA_MODULES = {
    "train": ("torch", "librosa", "onnx", "onnxscript", "thop", "tqdm", "matplotlib", "espeakng_loader"),
    "mic": ("sounddevice",),
}


def missing_extra(exc: ModuleNotFoundError):
    """The extra that provides the module ``exc`` could not find, or None."""
    top = (exc.name or "").split(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def launch(module: str, prog: str) -> int:
    """Run ``module``'s ``main()``; a missing extra, at import or later in the run (the
    commands import torch only when they need it), is one line and exit status 2."""
    try:
        return importlib.import_module(module).main()
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        print(f"{prog}: error: {exc.name} is not installed; {prog} needs the '{extra}' extra: {install_hint(extra)}",
              file=sys.stderr)
        return exit_codes.CANNOT_RUN

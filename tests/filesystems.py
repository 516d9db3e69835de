"""Real file-system conditions for tests: a full disk (a small tmpfs), a read-only folder, and
commands run without the capabilities that let root ignore file permissions."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

_PR_CAPBSET_DROP = 24
# CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: what lets root read and write past file modes.
_DAC_CAPABILITIES = (1, 2)


@contextlib.contextmanager
def small_disk(folder: Path, size_kib: int, read_only: bool = False):
    """Mount a tmpfs of ``size_kib`` KiB at ``folder`` (skips where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k,mode=0755" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _drop_dac_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in _DAC_CAPABILITIES:
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_unprivileged(args, **kwargs) -> subprocess.CompletedProcess:
    """Run ``args`` as a user whom file permissions bind.

    Tests run as root here, and root reads a mode-000 file. Dropping the two DAC capabilities
    from the bounding set before ``exec`` leaves the child root by uid but bound by file modes
    like any other user (the interpreter under /root stays usable, unlike after ``setuid``).
    A non-root caller is already bound by permissions and runs the command as it is.
    """
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    if os.geteuid() == 0:
        kwargs["preexec_fn"] = _drop_dac_capabilities
    return subprocess.run(args, **kwargs)


def require_permission_checks(tmp_path: Path) -> None:
    """Skip unless a mode-000 file is really unreadable to `run_unprivileged` commands."""
    probe = tmp_path / "permission-probe"
    probe.write_text("secret")
    probe.chmod(0)
    try:
        done = run_unprivileged([sys.executable, "-c", f"open({str(probe)!r}).read()"])
    except OSError as exc:
        pytest.skip(f"cannot drop root's file-permission override here ({exc})")
    finally:
        probe.chmod(0o600)
    if done.returncode == 0:
        pytest.skip("file permissions are not enforced for this user here (cannot test permission errors)")

import os
from pathlib import Path

import pytest

# `pytest -n 2` runs two workers on a machine with about two cores: with torch's and OpenMP's
# default pools (a thread per core each) the workers' spinning threads wait on each other:
# test_models.py with test_checkpoint.py took 566 s that way, 99 s with one thread per worker.
# Set before any test imports torch; subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The real recordings live beside the checkout, never inside it.
REAL_DATA = Path(
    os.environ.get("KWS_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands_real")
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the real Speech Commands sample (official layout); skips when it is absent."""
    if not (REAL_DATA / "yes").is_dir():
        pytest.skip(f"real Speech Commands sample not found at {REAL_DATA} (set KWS_REAL_DATA)")
    return REAL_DATA

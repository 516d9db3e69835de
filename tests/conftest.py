import os
from pathlib import Path

import pytest

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

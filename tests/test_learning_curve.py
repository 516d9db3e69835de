"""`tools/learning_curve.py`: the power law it fits and the runs it names."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import learning_curve  # noqa: E402


def test_the_fit_recovers_a_power_law_and_ignores_the_unit_of_size():
    sizes = [2000, 4000, 8000, 16000]
    a, b = learning_curve.fit_power_law(sizes, [3.0 * n ** -0.4 for n in sizes])
    assert a == pytest.approx(3.0) and b == pytest.approx(0.4)
    _, b_rescaled = learning_curve.fit_power_law([n / 1000 for n in sizes], [3.0 * n ** -0.4 for n in sizes])
    assert b_rescaled == pytest.approx(0.4)
    _, flat = learning_curve.fit_power_law(sizes, [0.05] * 4)
    assert flat == pytest.approx(0.0, abs=1e-9)


def test_share_one_is_the_full_run_itself():
    assert learning_curve.run_name("bcresnet3", 1.0) == "bcresnet3"
    assert learning_curve.run_name("bcresnet3", 0.25) == "bcresnet3-speakers25"
    assert learning_curve.run_name("bcresnet3", 0.5) == "bcresnet3-speakers50"

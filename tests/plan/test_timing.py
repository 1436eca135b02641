"""``fit_time_budget`` with a stand-in for the step measurement whose answer is known (seconds proportional
to the network's multiply-accumulates), and one real, quick measurement."""

from __future__ import annotations

import pytest

from pipeline.plan import rules, timing
from pipeline.plan.cost import unet_cost

SECONDS_PER_MAC = 1e-9
NET = {"patch_size": [64, 64, 32], "depth": 4, "features": 32}


def _macs_seconds(patch, features, depth, patches, slower=1.0):
    return SECONDS_PER_MAC * slower * unet_cost(patch, features, depth, 1, 2, depth > 2).macs * patches


@pytest.fixture()
def calls(monkeypatch):
    """Replace the measurement: the reference is exact, planned networks take ``slowdown[0]`` x longer."""
    made, slowdown = [], [1.0]

    def fake(patch, features, depth, in_channels, out_channels, patches, device="cpu", repeats=3):
        made.append((list(patch), features))
        reference = list(patch) == timing.REFERENCE[len(patch)] and features == 8 and depth == 3
        return _macs_seconds(patch, features, depth, patches, 1.0 if reference else slowdown[0])

    monkeypatch.setattr(timing, "measure_step", fake)
    return made, slowdown


def test_halves_features_until_500_steps_fit(calls):
    made, _ = calls
    step16 = _macs_seconds([64, 64, 32], 16, 4, 2)
    budget = step16 * rules.MIN_STEPS / (1 - rules.VALIDATION_ALLOWANCE)  # 16 features fit exactly, 32 do not
    timed = timing.fit_time_budget(dict(NET), 1, 2, [64, 64, 32], [1, 1, 2.5], 1, 2, budget)
    assert timed.net == {**NET, "features": 16}
    assert timed.step_seconds == pytest.approx(step16)
    assert "features 32 -> 16" in timed.reason
    assert made == [([32, 32, 32], 8), ([64, 64, 32], 16)]  # the reference, then the chosen network only


def test_a_slower_measurement_shrinks_on(calls):
    made, slowdown = calls
    slowdown[0] = 3.0  # planned networks run 3x slower than the reference predicts
    step16 = _macs_seconds([64, 64, 32], 16, 4, 2)
    budget = step16 * rules.MIN_STEPS / (1 - rules.VALIDATION_ALLOWANCE)
    timed = timing.fit_time_budget(dict(NET), 1, 2, [64, 64, 32], [1, 1, 2.5], 1, 2, budget)
    assert timed.net["features"] == 8  # 16 measured 3x too slow; 8 is ~3.5x cheaper
    assert rules.fits_minimum(timed.step_seconds, budget)
    assert len(made) == 3


def test_no_shrinking_needed(calls):
    timed = timing.fit_time_budget(dict(NET), 1, 2, [64, 64, 32], [1, 1, 2.5], 1, 2, 1e9)
    assert timed.net == NET and "as planned" in timed.reason


def test_measure_step_runs_a_real_training_step():
    seconds = timing.measure_step([16, 16, 16], 4, 2, 1, 2, 2, repeats=1)
    assert 0 < seconds < 30

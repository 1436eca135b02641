"""Learning-rate schedules: linear warm-up, then poly or cosine decay to about zero at the last step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.schedule import build_scheduler

BASE_LR = 0.01


def learning_rates(schedule: str, total: int, warmup: int) -> np.ndarray:
    """The learning rate used at each optimiser step 0 .. total-1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = build_scheduler(optimizer, schedule, total, warmup)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_warmup_rises_linearly(schedule):
    rates = learning_rates(schedule, total=100, warmup=10)
    np.testing.assert_allclose(rates[:10], BASE_LR * np.arange(1, 11) / 11, rtol=1e-9)
    assert np.all(np.diff(rates[:11]) > 0)
    assert rates[10] == pytest.approx(BASE_LR)  # the peak, right after warm-up


def test_poly_decays_to_about_zero():
    total, warmup = 100, 10
    rates = learning_rates("poly", total, warmup)
    after = rates[warmup:]
    assert np.all(np.diff(after) < 0)
    progress = np.arange(total - warmup) / (total - warmup)
    np.testing.assert_allclose(after, BASE_LR * (1 - progress) ** 0.9, rtol=1e-9)
    assert rates[-1] < 0.03 * BASE_LR
    assert rates[warmup + (total - warmup) // 2] == pytest.approx(BASE_LR * 0.5**0.9)


def test_cosine_ends_at_about_zero():
    total, warmup = 100, 10
    rates = learning_rates("cosine", total, warmup)
    after = rates[warmup:]
    assert np.all(np.diff(after) < 0)
    progress = np.arange(total - warmup) / (total - warmup)
    np.testing.assert_allclose(after, BASE_LR * 0.5 * (1 + np.cos(np.pi * progress)), rtol=1e-9)
    assert rates[-1] < 0.002 * BASE_LR
    assert rates[warmup + (total - warmup) // 2] == pytest.approx(BASE_LR / 2)


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_no_warmup_starts_at_base_lr(schedule):
    rates = learning_rates(schedule, total=50, warmup=0)
    assert rates[0] == pytest.approx(BASE_LR)
    assert np.all(np.diff(rates) < 0) and rates[-1] < 0.05 * BASE_LR


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_warmup_longer_than_training_still_reaches_the_peak(schedule):
    rates = learning_rates(schedule, total=5, warmup=50)
    assert np.all(np.diff(rates[:4]) > 0)
    assert rates[4] == pytest.approx(BASE_LR)
    assert np.all(rates > 0)


def test_past_the_end_stays_at_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = build_scheduler(optimizer, "poly", 10, 2)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)

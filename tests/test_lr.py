"""`lr_at` against values worked out by hand: linear warm-up, multistep and cosine, 10 steps per epoch."""
from __future__ import annotations

import math

import pytest

from engine.config import load_config
from engine.optim import lr_at


def _sched(*overrides: str):
    return load_config(None, list(overrides)).schedule


@pytest.mark.parametrize("step, want", [
    (0, 0.1 * 1 / 20),  # warm-up over 2 epochs = 20 steps: (step + 1) / 20 of the peak
    (9, 0.1 * 10 / 20),
    (19, 0.1),  # the last warm-up step reaches the peak
    (20, 0.1),  # epoch 2.0: past warm-up, before the first milestone
    (29, 0.1),  # epoch 2.9
    (30, 0.01),  # epoch 3.0: first milestone
    (49, 0.01),
    (50, 0.001),  # epoch 5.0: second milestone
    (99, 0.001),
])
def test_warmup_then_multistep(step, want):
    s = _sched("schedule.name=multistep", "schedule.milestones=[3,5]", "schedule.gamma=0.1",
               "schedule.warmup_epochs=2", "schedule.epochs=10")
    assert lr_at(step, 10, 0.1, s) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("step, want", [
    (0, 0.1 / 20),
    (20, 0.1),  # cosine starts at the end of warm-up: t = 0
    (40, 0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 0.25))),  # t = (4 - 2) / (10 - 2)
    (60, 0.01 + 0.5 * 0.09),  # t = 1/2: half-way between peak and floor
    (100, 0.01),  # t = 1: the floor
    (130, 0.01),  # past the end: stays at the floor
])
def test_warmup_then_cosine_to_min_lr(step, want):
    s = _sched("schedule.name=cosine", "schedule.warmup_epochs=2", "schedule.epochs=10", "schedule.min_lr=0.01")
    assert lr_at(step, 10, 0.1, s) == pytest.approx(want, rel=1e-12)


def test_cosine_without_warmup_and_constant():
    s = _sched("schedule.name=cosine", "schedule.epochs=4")
    assert [lr_at(k, 10, 0.2, s) for k in (0, 20, 40)] == pytest.approx([0.2, 0.1, 0.0], abs=1e-15)
    assert lr_at(15, 10, 0.2, s) == pytest.approx(0.1 * (1 + math.cos(math.pi * 15 / 40)), rel=1e-12)
    c = _sched("schedule.name=constant", "schedule.warmup_epochs=0.5", "schedule.epochs=4")
    assert [lr_at(k, 10, 0.2, c) for k in (0, 4, 5, 39)] == pytest.approx([0.04, 0.2, 0.2, 0.2], rel=1e-12)

"""LR schedules: pure functions checked at their edges."""

import math

import pytest

from ssv2prep.errors import ConfigError
from ssv2prep.train.schedule import lr_factor, scaled_lr


def test_step_schedule_decays_at_the_epoch_boundaries() -> None:
    kw = {"steps_per_epoch": 10, "epochs": 50, "schedule": "step", "lr_steps": (20, 40)}
    assert lr_factor(0, **kw) == 1.0
    assert lr_factor(199, **kw) == 1.0  # last step of epoch 19
    assert lr_factor(200, **kw) == pytest.approx(0.1)  # first step of epoch 20
    assert lr_factor(399, **kw) == pytest.approx(0.1)
    assert lr_factor(400, **kw) == pytest.approx(0.01)
    assert lr_factor(499, **kw) == pytest.approx(0.01)


def test_cosine_goes_from_one_to_zero() -> None:
    kw = {"steps_per_epoch": 4, "epochs": 2, "schedule": "cosine"}
    assert lr_factor(0, **kw) == 1.0
    assert lr_factor(4, **kw) == pytest.approx(0.5)
    assert lr_factor(8, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(2, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_warmup_ramps_linearly_then_hands_over() -> None:
    kw = {"steps_per_epoch": 10, "epochs": 5, "schedule": "step", "warmup_epochs": 1.0, "warmup_start": 0.1}
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(5, **kw) == pytest.approx(0.55)
    assert lr_factor(10, **kw) == 1.0


def test_bad_schedule_and_lr_scaling() -> None:
    with pytest.raises(ConfigError):
        lr_factor(0, steps_per_epoch=1, epochs=1, schedule="linear")
    with pytest.raises(ConfigError):
        lr_factor(0, steps_per_epoch=0, epochs=1)
    assert scaled_lr(0.01, 64) == pytest.approx(0.01)
    assert scaled_lr(0.01, 128) == pytest.approx(0.02)

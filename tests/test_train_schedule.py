"""The learning-rate schedule: linear warmup, then cosine down to lr * lr_min_ratio."""

import math

import pytest

from train.optim import cosine_schedule_with_warmup as lr_at


def test_warmup_then_cosine():
    kw = dict(base_lr=1e-3, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr_at(0, **kw) == 0.0  # the optimizers are created with lr=0
    assert lr_at(5, **kw) == pytest.approx(5e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    # The reference default lr_min_ratio=1.0: constant after warmup.
    assert lr_at(70, base_lr=1e-4, warmup_steps=10, total_steps=110, min_ratio=1.0) == pytest.approx(1e-4)

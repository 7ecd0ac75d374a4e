"""Batch planning and the micro-batch search (the CUDA probe's logic, with a stand-in memory limit)."""

from __future__ import annotations

import pytest
from sparsify.recipes.batching import BatchPlan, largest_fitting, plan_batches
from sparsify.recipes.cli import RecipeError
from sparsify.recipes.schedules import peak_lr


def test_largest_fitting_halves_until_it_fits():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 100

    assert largest_fitting(fits, 512) == 64 and tried == [512, 256, 128, 64]
    assert largest_fitting(lambda n: True, 96) == 96
    with pytest.raises(RecipeError, match="not even one image fits"):
        largest_fitting(lambda n: False, 8)


def test_paper_batch_is_reached_by_accumulation():
    cap = lambda upper: min(upper, 48)  # the device holds 48 images
    assert plan_batches(4096, 1, 10**6, cap) == BatchPlan(4096, 32, 128)  # 48 -> next divisor: 32 x 128
    assert plan_batches(4096, 8, 10**6, cap) == BatchPlan(4096, 32, 16)
    assert plan_batches(4096, 8, 10**6, cap, micro_batch=256) == BatchPlan(4096, 256, 2)
    assert plan_batches(4096, 8, 10**6, cap, accum=4) == BatchPlan(4096, 128, 4)
    assert plan_batches(16, 1, 100, cap) == BatchPlan(16, 16, 1)  # small enough: no accumulation
    with pytest.raises(RecipeError, match="not divisible"):
        plan_batches(10, 4, 100, cap)
    with pytest.raises(RecipeError, match="divisible by processes x --accum"):
        plan_batches(12, 1, 100, cap, accum=5)


def test_automatic_batch_is_one_micro_batch_per_device_and_at_most_the_data():
    cap = lambda upper: min(upper, 32)
    assert plan_batches(None, 1, 10**4, cap) == BatchPlan(32, 32, 1)
    assert plan_batches(None, 4, 10**4, cap) == BatchPlan(128, 32, 1)
    assert plan_batches(None, 1, 18, cap) == BatchPlan(18, 18, 1)  # a small folder
    assert plan_batches(None, 2, 10**4, cap, micro_batch=8) == BatchPlan(16, 8, 1)


def test_learning_rate_rules():
    assert peak_lr(2e-4, 4096, "linear") == pytest.approx(3.2e-3)  # the paper
    assert peak_lr(2e-4, 16, "linear") == pytest.approx(1.25e-5)
    assert peak_lr(8e-4, 4096, "sqrt", 1e-3) == pytest.approx(3.2e-3)  # default preset matches at 4096
    assert peak_lr(8e-4, 16, "sqrt", 1e-3) == pytest.approx(1e-3)  # the floor
    assert peak_lr(8e-4, 1024, "sqrt", 1e-3) == pytest.approx(1.6e-3)
    with pytest.raises(ValueError):
        peak_lr(1e-3, 16, "cubic")

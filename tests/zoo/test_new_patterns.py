"""Issue 17's "Done when": the new patterns keep the whole contract in any order.

Every ``tests/zoo/_patterns_*.py`` file (found by glob, so each helper's file joins when merged)
exposes ``PATTERNS`` (hand-written networks) and ``REAL`` (real timm / torchvision models of the same
families), each ``(name, builder, input size)``. Hypothesis draws an order over all the patterns (and
the seed of their weights, inputs and masks); each is wrapped and checked against the whole contract
in float64, in train and eval mode, in that order, so state one pattern leaves behind (a registry, a
cache, a tracer setting) cannot hide behind a fixed order. Each real model is checked once.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparsify.testing import assert_sparse_semantics

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]

Case = tuple[str, Callable[[], nn.Module], tuple[int, ...]]


def _collect() -> tuple[list[Case], list[Case]]:
    patterns: list[Case] = []
    real: list[Case] = []
    for path in sorted(Path(__file__).parent.glob("_patterns_*.py")):
        module = importlib.import_module(f"{__package__}.{path.stem}")
        owner = path.stem.removeprefix("_patterns_")
        patterns += [(f"{owner}/{name}", build, tuple(size)) for name, build, size in module.PATTERNS]
        real += [(f"{owner}/{name}", build, tuple(size)) for name, build, size in getattr(module, "REAL", [])]
    return patterns, real


PATTERNS, REAL = _collect()


def _check(case: Case, seed: int) -> None:
    name, build, size = case
    torch.manual_seed(seed)
    model = build().double()
    assert_sparse_semantics(model, input_size=size, generator=torch.Generator().manual_seed(seed))


def test_every_patterns_file_is_found():
    files = sorted(p.stem for p in Path(__file__).parent.glob("_patterns_*.py"))
    assert "_patterns_cov_verify" in files
    assert any(name.startswith("cov_verify/") for name, _, _ in PATTERNS)
    assert len({name for name, _, _ in PATTERNS + REAL}) == len(PATTERNS) + len(REAL)


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16))
def test_patterns_keep_the_contract_in_a_random_order(seed):
    order = list(PATTERNS)
    random.Random(seed).shuffle(order)
    failures = []
    for case in order:
        try:
            _check(case, seed)
        except Exception as e:  # report every pattern that fails, with the order that led to it
            failures.append(f"{case[0]}: {type(e).__name__}: {e}")
    names = ", ".join(name for name, _, _ in order)
    assert not failures, f"in the order [{names}] (seed {seed}):\n" + "\n\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("case", REAL, ids=[name for name, _, _ in REAL])
def test_real_models_keep_the_contract(case):
    try:
        _check(case, 0)  # the builders import timm / torchvision themselves
    except ModuleNotFoundError as e:
        if e.name not in ("timm", "torchvision", "einops"):
            raise
        pytest.skip(f"{e.name} is not installed")

"""Shared settings for the SparK tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Run each test on one intra-op thread.

    These tensors are small; on a busy 2-core machine two OpenMP threads spin-wait for each other and a
    training step becomes 10-50x slower than with one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

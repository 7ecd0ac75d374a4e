"""sparsify.random_mask: exact visible counts, reproducibility, validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsify
from sparsify.masking import check_mask, num_visible


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9),
       ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31 - 1))
def test_each_sample_keeps_exactly_the_visible_count(batch, h, w, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = sparsify.random_mask(batch, (h, w), ratio, generator=gen)
    assert mask.dtype == torch.bool and mask.shape == (batch, 1, h, w)
    expected = max(1, num_visible(h * w, ratio))
    assert mask.flatten(1).sum(1).tolist() == [expected] * batch


def test_paper_geometry_224px():
    mask = sparsify.random_mask(4, (7, 7), 0.6)
    assert mask.flatten(1).sum(1).tolist() == [20] * 4  # round(49 * 0.4)


def test_generator_makes_masks_reproducible_and_samples_differ():
    a = sparsify.random_mask(8, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    b = sparsify.random_mask(8, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(sparsify.SparsifyError, match="ratio"):
        sparsify.random_mask(2, (4, 4), ratio)


def test_check_mask_messages():
    with pytest.raises(sparsify.SparsifyError, match="bool"):
        check_mask(torch.ones(2, 1, 3, 3), 2, (3, 3))
    with pytest.raises(sparsify.SparsifyError, match=r"\(2, 1, 3, 4\)"):
        check_mask(torch.ones(2, 1, 3, 3, dtype=torch.bool), 2, (3, 4))

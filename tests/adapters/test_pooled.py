"""BatchNorm over pooled per-sample vectors == BatchNorm1d over the samples that have a visible site
(gathered explicitly); a fully masked sample changes nothing, in the batch statistics or the running
estimates."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sparsify.adapters import masked_batch_norm
from torch import nn

import sparsify
from sparsify.rewrite import sample_mask_like
from sparsify.testing import assert_masked_samples_invisible

from ._helpers import SETTINGS, check_contract


@SETTINGS
@given(b=st.integers(2, 5), c=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), flat=st.booleans(),
       data=st.data())
def test_pooled_batch_norm_equals_batch_norm_over_visible_samples(b, c, seed, flat, data):
    seen = data.draw(st.lists(st.booleans(), min_size=b, max_size=b).filter(lambda v: sum(v) >= 2))
    gen = torch.Generator().manual_seed(seed)
    # float64: with two visible samples of near-equal values float32 rounding alone exceeds 1e-5
    x = torch.randn(b, c, generator=gen, dtype=torch.float64) * 3 + 1
    if not flat:
        x = x[:, :, None, None]
    bn = (nn.BatchNorm1d(c) if flat else nn.BatchNorm2d(c)).double()
    bn.train()
    ref_bn = copy.deepcopy(bn)
    patch = torch.zeros(b, 1, 2, 3, dtype=torch.bool)
    for i, s in enumerate(seen):
        patch[i, 0, i % 2, i % 3] = s
    weights = sample_mask_like(patch, x)
    assert weights.shape == (b,) + (1,) * (x.dim() - 1)
    out = masked_batch_norm(bn, x, weights)
    keep = torch.tensor(seen)
    ref = ref_bn(x[keep])
    torch.testing.assert_close(out[keep], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)


class _PooledBNGate(nn.Module):
    def __init__(self, c=6, flat=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, 2, 1)
        self.fc = nn.Conv2d(c, c, 1)
        self.flat = flat
        self.bn = nn.BatchNorm1d(c) if flat else nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        g = self.fc(F.adaptive_avg_pool2d(y, 1))
        g = self.bn(g.flatten(1))[:, :, None, None] if self.flat else self.bn(g)
        return self.c2(y * torch.sigmoid(g))


@pytest.mark.parametrize("flat", [False, True])
def test_fully_masked_sample_does_not_enter_pooled_batch_statistics(flat):
    torch.manual_seed(0)
    model = _PooledBNGate(flat=flat)
    enc = check_contract(model)
    assert any(n.target is sample_mask_like for n in enc.graph.nodes)  # the rewrite passes per-sample weights
    x = torch.randn(3, 3, 16, 24)
    mask = sparsify.random_mask(3, (4, 6), 0.5, generator=torch.Generator().manual_seed(1))
    assert_masked_samples_invisible(enc, x, mask)


def test_pooled_batch_norm_in_eval_mode_runs_unchanged():
    torch.manual_seed(0)
    model = _PooledBNGate().eval()
    enc = sparsify.wrap(model, (16, 24)).eval()
    x = torch.randn(2, 3, 16, 24)
    torch.testing.assert_close(enc(x)[-1], model(x))

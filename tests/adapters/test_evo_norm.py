"""Masked EvoNorm-B0 (timm's EvoNorm2dB0) == the same formula on gathered active sites: batch variance
over the active sites of the whole batch, the running variance updated with the active count's
unbiased factor, the instance std per sample over its active sites; masked sites never matter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ._helpers import SETTINGS, cases, check_contract, per_sample

timm_evo = pytest.importorskip("timm.layers.evo_norm")

# timm (and so the adapter) computes B0's statistics in float32 (``x.float()``); the reference is float64
TOL = dict(rtol=2e-6, atol=2e-6)


def _reference(module, x, mask, train: bool):
    """(output at active sites per sample, new running_var) from gathered active values."""
    c = x.shape[1]
    rows = [per_sample(x, mask, b) for b in range(x.shape[0])]  # (C, n_b)
    running = module.running_var.clone()
    if train:
        every = torch.cat(rows, 1)
        var = every.var(1, unbiased=False)
        n = every.shape[1]
        if n > 1:
            running = running * (1 - module.momentum) + var * module.momentum * n / (n - 1)
    else:
        var = module.running_var
    w, bias, v = module.weight, module.bias, module.v
    outs = []
    for r in rows:
        std = (r.var(1, unbiased=False, keepdim=True) + module.eps).sqrt()
        left = (var + module.eps).sqrt().view(c, 1)
        y = r / torch.maximum(left, r * v.view(c, 1) + std)
        outs.append(y * w.view(c, 1) + bias.view(c, 1))
    return outs, running


@SETTINGS
@given(case=cases(max_b=3, min_c=2, max_c=5, max_hw=6), train=st.booleans())
def test_masked_b0_equals_gathered_reference(case, train):
    from sparsify.adapters.evo_norm import masked_evo_norm_b0

    x = case.x.double()
    c = x.shape[1]
    module = timm_evo.EvoNorm2dB0(c).double()
    with torch.no_grad():
        module.v.uniform_(0.2, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_var.uniform_(0.5, 2.0)
    module.train(train)
    expected, running = _reference(module, x, case.mask, train)
    y = masked_evo_norm_b0(module, x, case.mask)
    for b in range(x.shape[0]):
        torch.testing.assert_close(per_sample(y, case.mask, b), expected[b], **TOL)
    torch.testing.assert_close(module.running_var, running, **TOL)
    # masked sites never matter (the running variance moves again in train mode: compare outputs)
    module.running_var.copy_(running)
    again = masked_evo_norm_b0(module.eval(), case.garbage().double(), case.mask)
    ref = masked_evo_norm_b0(module, x, case.mask)
    for b in range(x.shape[0]):
        torch.testing.assert_close(per_sample(again, case.mask, b), per_sample(ref, case.mask, b))


def test_masked_b0_without_mask_is_timm_and_an_empty_batch_keeps_the_running_variance():
    from sparsify.adapters.evo_norm import masked_evo_norm_b0

    module = timm_evo.EvoNorm2dB0(4)
    x = torch.randn(2, 4, 5, 6)
    for train in (True, False):
        module.train(train)
        state = module.running_var.clone()
        ours = masked_evo_norm_b0(module, x, None)
        module.running_var.copy_(state)
        assert torch.equal(ours, module(x))
    module.train()
    before = module.running_var.clone()
    y = masked_evo_norm_b0(module, x, torch.zeros(2, 1, 5, 6))
    assert torch.isfinite(y).all() and torch.equal(module.running_var, before)


def test_b0_in_a_network_satisfies_the_contract():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, 2, 1), timm_evo.EvoNorm2dB0(6), torch.nn.Conv2d(6, 6, 3, 2, 1))
    for train in (True, False):
        enc = check_contract(net, train=train)
        assert any(getattr(n.target, "__name__", "") == "masked_evo_norm_b0" for n in enc.graph.nodes)

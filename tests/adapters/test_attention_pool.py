"""Attention pooling over positions (global-context blocks): a softmax over the *visible* sites of a
flattened spatial axis, then a contraction of the same axis against the features.

Gather-based references: the softmax of the gathered visible logits, and the context vector as the
weighted sum of the gathered visible features. Token-to-token attention and uses of the flattened
positions that are not a pooling stay refused, reported at the reshape that flattened them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sparsify.adapters._flat import flat_mask_like, masked_softmax
from sparsify.adapters.reduce import masked_var
from torch import nn

from ._helpers import FEW, SETTINGS, TwoConv, cases, check_contract, refusal

TOL = dict(rtol=1e-9, atol=1e-9)


def _flat_mask(mask: torch.Tensor, x: torch.Tensor, ref_rank: int, dim: int, lead: int = 1) -> torch.Tensor:
    return flat_mask_like(mask, x, (2, 3), torch.empty((1,) * ref_rank), dim, lead)


@SETTINGS
@given(case=cases(max_b=3, max_c=5, max_hw=6), scale=st.sampled_from([1.0, 30.0]))
def test_masked_softmax_equals_softmax_of_gathered_visible_logits(case, scale):
    x = case.x.double() * scale
    b, c, h, w = x.shape
    logits = x.reshape(b, c, h * w)
    m = _flat_mask(case.mask, x, 3, 2)
    y = masked_softmax(logits, m, -1)
    for i in range(b):
        keep = case.mask[i, 0].flatten().bool()
        torch.testing.assert_close(y[i][:, keep], torch.softmax(logits[i][:, keep], -1), **TOL)
        assert torch.equal(y[i][:, ~keep], torch.zeros(c, int((~keep).sum()), dtype=x.dtype))
    # masked logits are left out, whatever they are
    garbage = case.garbage().double().reshape(b, c, h * w) * scale
    torch.testing.assert_close(masked_softmax(garbage, m, -1), y, **TOL)


def test_masked_softmax_of_a_fully_masked_sample_is_zero_with_finite_gradients():
    logits = torch.randn(2, 1, 12, requires_grad=True)
    m = torch.ones(2, 1, 12)
    m[1] = 0
    y = masked_softmax(logits, m, -1)
    assert torch.equal(y[1], torch.zeros(1, 12))
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[1], torch.zeros(1, 12))


@SETTINGS
@given(case=cases(max_b=3, max_c=5, max_hw=6), form=st.sampled_from(["matmul", "einsum", "mul-sum"]))
def test_context_vector_equals_weighted_sum_of_gathered_visible_features(case, form):
    """The global-context pooling, as timm writes it: softmax over visible sites, contracted with x."""
    x = case.x.double()
    b, c, h, w = x.shape
    logits = (x * torch.linspace(-1, 1, c, dtype=x.dtype).view(1, c, 1, 1)).sum(1, keepdim=True)
    weights = masked_softmax(logits.reshape(b, 1, h * w), _flat_mask(case.mask, x, 3, 2), -1)
    feats = case.garbage().double().reshape(b, c, h * w)  # garbage at masked sites: weight 0 there
    if form == "matmul":
        ctx = (feats.unsqueeze(1) @ weights.unsqueeze(3)).view(b, c)
    elif form == "einsum":
        ctx = torch.einsum("bcn,bkn->bc", feats, weights)
    else:
        ctx = (feats * weights).sum(-1)
    for i in range(b):
        keep = case.mask[i, 0].flatten().bool()
        p = torch.softmax(logits[i].reshape(1, -1)[:, keep], -1)
        torch.testing.assert_close(ctx[i], (x[i].reshape(c, -1)[:, keep] * p).sum(-1), **TOL)


@SETTINGS
@given(case=cases(max_b=3, min_c=4, max_c=4, max_hw=6), groups=st.sampled_from([1, 2, 4]),
       correction=st.sampled_from([0, 1]))
def test_group_variance_over_flattened_channels_and_sites_equals_gathered_reference(case, groups, correction):
    """EvoNorm's ``x.reshape(b, g, -1).var(-1)``: the flat mask repeats each site for the C/G channels."""
    x = case.x.double()
    b, c = x.shape[:2]
    flat = x.reshape(b, groups, -1)
    m = _flat_mask(case.mask, x, 3, 2, lead=c // groups)
    y = masked_var(m, flat, -1, correction, False)
    for i in range(b):
        keep = case.mask[i, 0].bool()
        for g in range(groups):
            vals = x[i, g * (c // groups):(g + 1) * (c // groups)][:, keep].flatten()
            expected = vals.var(correction=correction) if vals.numel() > correction else torch.zeros((), dtype=x.dtype)
            torch.testing.assert_close(y[i, g], expected, **TOL)


# --- networks ------------------------------------------------------------------------------------
class _GC(nn.Module):
    """conv -> global-context block (several hand-written spellings) -> conv."""

    def __init__(self, form: str, c: int = 8):
        super().__init__()
        self.form = form
        self.c1 = nn.Conv2d(3, c, 3, 2, 1)
        self.attn = nn.Conv2d(c, 1, 1)
        self.softmax = nn.Softmax(dim=2)
        self.add = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.ReLU(), nn.Conv2d(c // 2, c, 1))
        self.c2 = nn.Conv2d(c, c, 3, 2, 1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        b, c, h, w = y.shape
        if self.form == "timm":
            a = F.softmax(self.attn(y).reshape(b, 1, h * w), dim=-1).unsqueeze(3)
            ctx = (y.reshape(b, c, h * w).unsqueeze(1) @ a).view(b, c, 1, 1)
        elif self.form == "bmm module softmax":
            a = self.softmax(self.attn(y).view(b, 1, -1, 1))  # (B, 1, HW, 1)
            ctx = torch.bmm(self.c1(x).view(b, c, h * w), a.view(b, h * w, 1)).view(b, c, 1, 1)
        elif self.form == "einsum":
            a = self.attn(y).flatten(1).softmax(-1)
            ctx = torch.einsum("bcn,bn->bc", y.flatten(2), a)[..., None, None]
        elif self.form == "mul-sum temperature":
            a = torch.softmax(self.attn(y).flatten(2) / 0.5, dim=2)
            ctx = (y.flatten(2) * a).sum(-1, keepdim=True).unsqueeze(-1)
        elif self.form == "channels-last tokens":
            t = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, N, C)
            a = self.attn(y).permute(0, 2, 3, 1).reshape(b, h * w, 1).softmax(1)
            ctx = (t.transpose(1, 2) @ a).view(b, c, 1, 1)
        return self.c2(y + self.add(ctx))


FORMS = ["timm", "bmm module softmax", "einsum", "mul-sum temperature", "channels-last tokens"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("train", [True, False])
def test_global_context_blocks_satisfy_the_contract(form, train):
    """Zero at masked sites, canvas invariance (the context vector sees visible sites only) and
    dense equality, for each way of writing the block."""
    enc = check_contract(_GC(form), input_size=(16, 24), train=train)
    names = [getattr(n.target, "__name__", "") for n in enc.graph.nodes]
    assert any(n in ("masked_softmax_over_sites", "_masked_softmax_module") for n in names), names


@FEW
@given(form=st.sampled_from(FORMS), h=st.integers(1, 5), w=st.integers(1, 5), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16), train=st.booleans())
def test_global_context_blocks_over_random_sizes_and_masks(form, h, w, batch, seed, train):
    check_contract(_GC(form), input_size=(4 * h, 4 * w), batch=batch, seed=seed, train=train)


def test_attention_pooling_of_dirty_features_with_weights_not_from_softmax_masks_the_features():
    """A contraction where neither side is 0 at masked sites (sigmoid of features and weights: 0.5
    there, whatever the mask multiplies) zeroes one first."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 6, 3, 2, 1)
            self.attn = nn.Conv2d(6, 1, 1)
            self.c2 = nn.Conv2d(6, 6, 3, 2, 1)

        def forward(self, x):
            y = self.c1(x)
            a = torch.sigmoid(self.attn(y)).flatten(2)  # 0.5 at masked sites
            ctx = torch.matmul(torch.sigmoid(y).flatten(2), a.transpose(1, 2)) / 10  # (B, C, 1)
            return self.c2(y * ctx.unsqueeze(-1))

    enc = check_contract(Net())
    assert any(getattr(n.target, "__name__", "") == "masked_pooling_product" for n in enc.graph.nodes)


# --- refusals ------------------------------------------------------------------------------------
def _token_attention(y):
    t = y.flatten(2)  # (B, C, N)
    att = torch.softmax(t.transpose(1, 2) @ t, dim=-1)  # (B, N, N): positions x positions
    return (t @ att).view_as(y)


def _log_softmax_pool(y):
    b, c = y.shape[:2]
    w = F.log_softmax(y.mean(1, keepdim=True).flatten(2), -1)
    return y * (y.flatten(2) * w).sum(-1).view(b, c, 1, 1)


def _softmax_map(y):
    return y * y.mean(1, keepdim=True).flatten(2).softmax(-1).view_as(y[:, :1])


def _einsum_keeps_positions(y):
    t = y.flatten(2)
    return torch.einsum("bcn,bdn->bcdn", t, t).sum(2).view_as(y)


def _half_flatten(y):
    return y.flatten(1, 2).softmax(-1).view_as(y)  # merges C and H only: not every site in one axis


REFUSED = {
    "token-to-token attention": (_token_attention, "flatten", "positions x positions"),
    "log_softmax pooling": (_log_softmax_pool, "flatten", "log_softmax over flattened positions"),
    "softmax map unflattened": (_softmax_map, "flatten", "not a pooling"),
    "einsum keeping positions": (_einsum_keeps_positions, "flatten", "keeps flattened positions"),
    "part of space flattened": (_half_flatten, "flatten", "merges or splits"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_uses_of_flattened_positions_that_are_not_pooling_are_refused(name):
    mid, node, reason = REFUSED[name]
    message = refusal(TwoConv(mid=mid))
    assert f"node '{node}'" in message and reason in message, message
    assert "merges or splits a spatial dim" in message  # the root cause comes first
    if name == "token-to-token attention":
        assert "attention over positions" in message


@pytest.mark.slow
def test_attention_pooling_and_group_variance_compile_fullgraph():
    """No host synchronisation: the wrapped GC block (flat mask, masked softmax, contraction) and a
    flat group variance compile as one graph (aot_eager also traces the backward) and match eager."""
    import sparsify

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gc = _GC("timm")

        def forward(self, x):
            y = self.gc(x)
            b, c, h, w = y.shape
            g = y.reshape(b, 2, -1)
            std = g.var(-1, keepdim=True).add(1e-5).sqrt().expand(g.shape).reshape(b, c, h, w)
            return y / std

    torch._dynamo.reset()
    torch.manual_seed(0)
    enc = sparsify.wrap(Net(), (16, 24))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 24, generator=gen)
    r = enc.downsample_ratio
    mask = sparsify.random_mask(2, (16 // r, 24 // r), 0.5, generator=gen)
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    out = compiled(x, mask)
    ref = enc(x, mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    sum(o.square().sum() for o in out).backward()
    torch._dynamo.reset()

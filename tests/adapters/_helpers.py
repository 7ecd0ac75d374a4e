"""Shared strategies and gather-based helpers for the adapter tests.

Masks follow the adapter convention: float 0/1 tensors of shape (B, 1, H, W), 1 = active.
References gather the active sites explicitly (boolean indexing is fine in tests, never in adapters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

import sparsify

# ADAPTER_EXAMPLES=300 pytest tests/adapters runs a deeper search (about 1.5 min per 100 here).
_EXAMPLES = int(os.environ.get("ADAPTER_EXAMPLES", 25))
SETTINGS = settings(max_examples=_EXAMPLES, deadline=None)
FEW = settings(max_examples=max(1, _EXAMPLES * 2 // 5), deadline=None)


@dataclass
class Case:
    x: torch.Tensor  # (B, C, H, W) float32
    mask: torch.Tensor  # (B, 1, H, W) float 0/1
    seed: int

    @property
    def active(self) -> torch.Tensor:
        return self.mask[:, 0].bool()  # (B, H, W)

    def garbage(self) -> torch.Tensor:
        """``x`` with every masked site replaced by unrelated random values."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        noise = torch.randn(self.x.shape, generator=gen) * 50 + 7
        return torch.where(self.mask.bool(), self.x, noise)


@st.composite
def masks(draw, b: int, h: int, w: int, min_active: int = 1) -> torch.Tensor:
    """A float 0/1 mask (B, 1, H, W) with at least ``min_active`` (<= H*W) active sites per sample.

    One draw in four is the all-active mask; the rest are random patterns of any density.
    """
    if draw(st.integers(0, 3)) == 0:
        return torch.ones(b, 1, h, w)
    bits = draw(st.lists(st.booleans(), min_size=b * h * w, max_size=b * h * w))
    m = torch.tensor(bits, dtype=torch.bool).view(b, h * w)
    for i in range(b):
        forced = draw(st.lists(st.integers(0, h * w - 1), min_size=min(min_active, h * w),
                               max_size=min(min_active, h * w), unique=True))
        m[i, forced] = True
    return m.view(b, 1, h, w).float()


@st.composite
def cases(draw, max_b: int = 3, min_c: int = 1, max_c: int = 6, channels: int | None = None,
          min_hw: int = 1, max_hw: int = 7, min_active: int = 1, max_offset: float | None = None) -> Case:
    """A random feature map with a random offset/scale per channel and a random valid mask.

    ``max_offset`` bounds |offset| / scale per channel (well-conditioned for low precision tests).
    """
    b = draw(st.integers(1, max_b))
    c = channels if channels is not None else draw(st.integers(min_c, max_c))
    h = draw(st.integers(min_hw, max_hw))
    w = draw(st.integers(min_hw, max_hw))
    mask = draw(masks(b, h, w, min_active))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, c, 1, 1, generator=gen) * 3 + 0.25
    offset = torch.randn(1, c, 1, 1, generator=gen) * 2
    if max_offset is not None:
        offset = (torch.rand(1, c, 1, 1, generator=gen) * 2 - 1) * max_offset * scale
    x = torch.randn(b, c, h, w, generator=gen) * scale + offset
    return Case(x, mask, seed)


def rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (N_active, C) matrix of feature vectors at active sites (batch, then row-major order)."""
    return x.permute(0, 2, 3, 1)[mask[:, 0].bool()]


def per_sample(x: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Sample ``b``'s (C, n_b) feature matrix at its active sites."""
    return x[b][:, mask[b, 0].bool()]


def reference_norm(values: torch.Tensor, eps: float) -> torch.Tensor:
    """(v - mean) / sqrt(biased var + eps) over all entries of ``values``."""
    mean = values.mean()
    var = (values - mean).square().mean()
    return (values - mean) / torch.sqrt(var + eps)


# --- wrap-level helpers ---------------------------------------------------------------------------
def patch_mask(b: int, grid: tuple[int, int], seed: int, ratio: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sparsify.random_mask(b, grid, ratio, generator=gen)


def check_contract(model: nn.Module, input_size: tuple[int, int] = (16, 24), batch: int = 2, seed: int = 0,
                   train: bool = True, **wrap_kwargs) -> sparsify.SparseEncoder:
    """Wrap ``model`` and check zero-at-masked, canvas invariance and dense equality (mask=None).

    The canvas check pads the image on the right and bottom with one whole masked patch of garbage:
    the original region of every feature must not change.
    """
    enc = sparsify.wrap(model, input_size=input_size, **wrap_kwargs)
    model.train(train)
    enc.train(train)
    r = enc.downsample_ratio
    gen = torch.Generator().manual_seed(seed)
    h, w = input_size
    x = torch.randn(batch, enc.in_chans, h, w, generator=gen)
    grid = (h // r, w // r)
    mask = patch_mask(batch, grid, seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    feats = enc(x, mask)
    for f in feats:
        m = nn.functional.interpolate(mask.float(), size=f.shape[-2:], mode="nearest")
        assert torch.equal(f * (1 - m), torch.zeros_like(f)), "feature not zero at masked sites"

    model.load_state_dict(state)
    big = torch.randn(batch, enc.in_chans, h + r, w + r, generator=gen) * 30
    big[:, :, :h, :w] = x
    big_mask = torch.zeros(batch, 1, grid[0] + 1, grid[1] + 1, dtype=torch.bool)
    big_mask[:, :, :grid[0], :grid[1]] = mask
    big_feats = enc(big, big_mask)
    for f, g in zip(feats, big_feats):
        torch.testing.assert_close(g[..., :f.shape[-2], :f.shape[-1]], f, rtol=1e-4, atol=1e-5)

    model.load_state_dict(state)
    dense = enc.dense_encoder()
    expected = dense(x)
    model.load_state_dict(state)
    got = enc(x, None)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    model.load_state_dict(state)
    return enc


def count_mask_multiplies(enc: sparsify.SparseEncoder) -> int:
    """How many mask multiplies the rewrite inserted (the input's one included)."""
    return sum(1 for n in enc.graph.nodes if n.op == "call_function" and n.target.__name__ == "apply_mask")


def refusal(model: nn.Module, input_size: tuple[int, int] = (16, 24), **wrap_kwargs) -> str:
    """The message of the SparsifyError that wrapping ``model`` raises (fails if it wraps)."""
    try:
        sparsify.wrap(model, input_size=input_size, **wrap_kwargs)
    except sparsify.SparsifyError as error:
        return str(error)
    raise AssertionError(f"{type(model).__name__} wrapped, expected a SparsifyError")


class TwoConv(nn.Module):
    """``c2(mid(c1(first(x))))``: ``first`` sees the masked (zero) input, ``mid`` a dirty conv output.

    ``first`` / ``mid`` may be modules or plain functions (traced inline, so their nodes are named
    after the operations they call).
    """

    def __init__(self, mid=None, first=None, cin: int = 3, mid_in: int = 6, mid_out: int = 6):
        super().__init__()
        self.first = first
        self.c1 = nn.Conv2d(cin, mid_in, 3, 2, 1)
        self.mid = mid
        self.c2 = nn.Conv2d(mid_out, 6, 3, 2, 1)

    def forward(self, x):
        if self.first is not None:
            x = self.first(x)
        y = self.c1(x)
        if self.mid is not None:
            y = self.mid(y)
        return self.c2(y)


def stat_atol(groups, eps: float = 0.0, base: float = 1e-4) -> float:
    """Absolute tolerance for outputs normalised by one-pass fp32 moments.

    The adapters compute var = E[x^2] - E[x]^2 in one fp32 pass (design.md section 5), which loses
    about mean^2 * 2^-24 of absolute precision in the variance: outputs are good to roughly
    2^-24 * mean^2 / (var + eps) relative. ``groups`` are the gathered values of each statistic
    (1-D tensors); the tolerance grows with the worst-conditioned one.
    """
    worst = 0.0
    for g in groups:
        g = g.detach().double().flatten()
        mean, var = g.mean(), g.var(unbiased=False)
        worst = max(worst, float(mean.square() / (var + eps + 1e-30)))
    return base + 2e-7 * worst

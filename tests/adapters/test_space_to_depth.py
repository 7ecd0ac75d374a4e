"""Space-to-depth / depth-to-space written with view/permute/reshape or einops (issue 17 item 2).

References are independent of the analysis: a space-to-depth with channel order ``order`` is built by
strided slicing (``x[:, c, p::s, q::s]`` for each output channel), and a masked BatchNorm after it
by gathering the active cells of the coarse grid (BatchNorm1d over their feature vectors).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify.adapters.space_to_depth import classify_relayout
from torch import nn

import sparsify
from sparsify.testing import assert_sparse_semantics, gather_active, scatter_active

#: The orders of (channel, row offset, column offset) in the output channel axis: all six put the
#: block axes into channels.
ORDERS = list(itertools.permutations("cpq"))


def s2d_view(x: torch.Tensor, s: int, order: tuple[str, ...]) -> torch.Tensor:
    """Space-to-depth as model code writes it: view, permute, reshape (sizes read from x.shape)."""
    b, c, h, w = x.shape
    axis = {"c": 1, "p": 3, "q": 5}
    y = x.view(b, c, h // s, s, w // s, s).permute(0, *(axis[a] for a in order), 2, 4)
    return y.reshape(b, c * s * s, h // s, w // s)


def s2d_einops(x: torch.Tensor, s: int, order: tuple[str, ...]) -> torch.Tensor:
    return rearrange(x, f"b c (h p) (w q) -> b ({' '.join(order)}) h w", p=s, q=s)


def s2d_reference(x: torch.Tensor, s: int, order: tuple[str, ...]) -> torch.Tensor:
    """The same op by strided slicing, one output channel at a time."""
    sizes = {"c": x.shape[1], "p": s, "q": s}
    chans = []
    for k in range(x.shape[1] * s * s):
        idx = dict(zip(order, torch.unravel_index(torch.tensor(k), tuple(sizes[a] for a in order))))
        chans.append(x[:, int(idx["c"]), int(idx["p"])::s, int(idx["q"])::s])
    return torch.stack(chans, 1)


def d2s_view(x: torch.Tensor, s: int) -> torch.Tensor:
    b, c, h, w = x.shape
    y = x.view(b, c // (s * s), s, s, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // (s * s), h * s, w * s)


class Net(nn.Module):
    """conv -> hand-written space-to-depth -> conv -> BN -> ReLU (-> depth-to-space -> conv).

    The conv right after the space-to-depth reads neighbouring cells: masked cells must be zero."""

    def __init__(self, chans: int, s: int, order, spelling: str, up: bool = False):
        super().__init__()
        self.s, self.order, self.spelling, self.up = s, tuple(order), spelling, up
        self.conv = nn.Conv2d(3, chans, 3, padding=1)
        self.mid = nn.Conv2d(chans * s * s, chans * s * s, 3, padding=1)
        self.bn = nn.BatchNorm2d(chans * s * s)
        self.post = nn.Conv2d(chans, chans, 3, stride=s, padding=1) if up else nn.Identity()

    def forward(self, x):
        x = self.conv(x)
        fold = s2d_einops if self.spelling == "einops" else s2d_view
        y = F.relu(self.bn(self.mid(fold(x, self.s, self.order))))
        if self.up:
            return self.post(d2s_view(y, self.s) + x)
        return y


@pytest.mark.parametrize("order", ORDERS, ids="".join)
@pytest.mark.parametrize("spelling", [s2d_view, s2d_einops], ids=["view", "einops"])
def test_chain_is_space_to_depth_on_indices(order, spelling):
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    out = spelling(x, 2, order)
    torch.testing.assert_close(out, s2d_reference(x, 2, order), rtol=0, atol=0)
    index = spelling(torch.arange(x.numel()).reshape(x.shape), 2, order)
    assert classify_relayout(index, tuple(x.shape), (2, 3)) == ("down", (2, 3), (2, 2))


def test_classify_relayout_inverse_and_refusals():
    shape = (2, 8, 4, 6)
    base = torch.arange(2 * 8 * 4 * 6).reshape(shape)
    assert classify_relayout(F.pixel_shuffle(base, 2), shape, (2, 3)) == ("up", (2, 3), (2, 2))
    assert classify_relayout(d2s_view(base, 2), shape, (2, 3)) == ("up", (2, 3), (2, 2))
    # channels-last output of a space-to-depth
    assert classify_relayout(F.pixel_unshuffle(base, 2).permute(0, 2, 3, 1), shape, (2, 3)) == (
        "down", (1, 2), (2, 2))
    b, c, h, w = shape
    blocks = base.view(b, c, h // 2, 2, w // 2, 2)
    # sites reordered inside the map (same grid, scrambled): not a space<->depth op
    assert classify_relayout(blocks.permute(0, 1, 2, 4, 3, 5).reshape(shape), shape, (2, 3)) is None
    # rows and columns of the coarse grid swapped
    swapped = blocks.permute(0, 1, 3, 5, 4, 2).reshape(b, c * 4, w // 2, h // 2)
    assert classify_relayout(swapped, shape, (2, 3)) is None
    # samples folded into channels
    mixed = base.view(b, c, h // 2, 2, w // 2, 2).permute(1, 0, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    assert classify_relayout(mixed, shape, (2, 3)) is None
    # block offset depending on the cell (a checkerboard of two orders)
    odd = F.pixel_unshuffle(base, 2).clone()
    odd[:, :, 0, 0] = odd[:, [1, 0, 2, 3] * 8, 0, 0]
    assert classify_relayout(odd, shape, (2, 3)) is None


@pytest.mark.parametrize("order", [("c", "p", "q"), ("p", "q", "c")], ids="".join)
@pytest.mark.parametrize("spelling", ["view", "einops"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_masked_batch_norm_after_the_chain_matches_gather_reference(order, spelling, train):
    torch.manual_seed(0)
    net = Net(3, 4, order, spelling).double()
    enc = sparsify.wrap(net, (16, 24))
    assert enc.downsample_ratio == 4
    x = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    mask = sparsify.random_mask(3, (4, 6), 0.5, generator=torch.Generator().manual_seed(1))
    enc.train(train)
    net.train(train)
    with torch.no_grad():
        got = enc(x, mask)[-1]
        # reference: masked sites absent (zero) before each conv, the op by slicing, BatchNorm1d on active cells
        fine = mask.repeat_interleave(4, 2).repeat_interleave(4, 3).double()
        folded = net.mid(s2d_reference(net.conv(x * fine) * fine, 4, order))
        bn = net.bn
        rows = gather_active(folded, mask)
        rows = F.batch_norm(rows, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias,
                            train, 0.0, bn.eps)
        expected = F.relu(scatter_active(rows, mask, folded.shape))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=12, deadline=None)
@given(
    s=st.sampled_from([2, 4]),
    order=st.sampled_from(ORDERS),
    spelling=st.sampled_from(["view", "einops"]),
    up=st.booleans(),
    cells=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    chans=st.integers(1, 3),
)
def test_contract_holds_through_space_to_depth(s, order, spelling, up, cells, chans):
    torch.manual_seed(0)
    net = Net(chans, s, order, spelling, up=up).double()
    size = (2 * s * cells[0], 2 * s * cells[1])
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_sparse_semantics(net, x)


class _Chain(nn.Module):
    """conv -> ``fn`` (a layout chain that is not space<->depth) -> linear on channels -> back to a
    map -> strided conv."""

    def __init__(self, fn, chans: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fn = fn
        self.mix = nn.Linear(chans, chans)
        self.down = nn.Conv2d(chans, 8, 3, stride=4, padding=1)

    def forward(self, x):
        y = self.fn(self.conv(x))
        return self.down(self.mix(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def _scramble(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def _through_tokens(x):
    # space-to-depth, but the blocks become tokens mixed by a softmax over positions before
    # they are laid out as a map again
    b, c, h, w = x.shape
    t = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    t = t.softmax(1)
    return t.transpose(1, 2).reshape(b, c * 4, h // 2, w // 2)


def _einops_tokens(x):
    b, c, h, w = x.shape
    t = rearrange(x, "b c h w -> b (h w) c").softmax(1)
    return rearrange(t, "b (h w) c -> b c h w", h=h, w=w)


@pytest.mark.parametrize("fn, chans, node", [(_scramble, 4, "view"), (_through_tokens, 16, "view"),
                                             (_einops_tokens, 4, "rearrange")],
                         ids=["scramble", "tokens", "einops_tokens"])
def test_other_chains_stay_refused_naming_the_node(fn, chans, node):
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.wrap(_Chain(fn, chans), (32, 32))
    assert f"node '{node}'" in str(info.value), str(info.value)


def test_space_to_depth_3d():
    from tests.zoo._patterns_cov_shape import SpaceToDepth3d

    torch.manual_seed(0)
    net = SpaceToDepth3d().double()
    x = torch.randn(2, 3, 8, 16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_sparse_semantics(net, x)


def _patterns():
    from tests.zoo._patterns_cov_shape import PATTERNS, REAL

    return [pytest.param(b, s, id=n) for n, b, s in PATTERNS] + [
        pytest.param(b, s, id=n, marks=pytest.mark.slow) for n, b, s in REAL]


@pytest.mark.parametrize("build, size", _patterns())
def test_patterns_keep_the_contract(build, size):
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_sparse_semantics(model, x)


@pytest.mark.slow
def test_whole_tresnet_is_refused_for_its_blur_pool_not_its_stem():
    timm = pytest.importorskip("timm")
    model = timm.create_model("tresnet_m", pretrained=False, num_classes=0)
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.wrap(model, (64, 64))
    text = str(info.value)
    assert "reflect padding" in text and "body.layer2.0.conv1.aa" in text, text
    assert "body.s2d" not in text, text
    assert "reflect padding" in text.splitlines()[0], text


class _GroupShuffle(nn.Module):
    """ShuffleNet's channel shuffle written with einops: split channels into groups, swap, merge."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 8, 3, stride=4, padding=1)

    def forward(self, x):
        y = rearrange(self.conv(x), "b (g c) h w -> b g c h w", g=2)
        y = rearrange(y, "b g c h w -> b (c g) h w")
        return self.down(F.relu(self.bn(y)))


def test_einops_relayout_of_channels_keeps_the_contract():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_sparse_semantics(_GroupShuffle().double(), x)


def _expected(perm: tuple[int, ...], n: int, channels_first: bool) -> bool:
    """Whether permuting the (b, c, g1, s1, g2, s2, ...) split of a map and regrouping as stated is a
    space-to-depth: batch first, channel and every block offset in the channel group, the coarse grid
    dims in order."""
    block = {1} | {3 + 2 * i for i in range(n)}
    grid = tuple(2 + 2 * i for i in range(n))
    k = len(block)
    if perm[0] != 0:
        return False
    if channels_first:
        return set(perm[1:1 + k]) == block and tuple(perm[1 + k:]) == grid
    return tuple(perm[1:1 + n]) == grid and set(perm[1 + n:]) == block


def _split_and_permute(n: int, perm: tuple[int, ...], channels_first: bool):
    sizes = [2, 3] + [3 - i % 2 if j == 0 else 2 for i in range(n) for j in (0, 1)]  # (b, c, g, s, ...)
    in_shape = (sizes[0], sizes[1], *(sizes[2 + 2 * i] * sizes[3 + 2 * i] for i in range(n)))
    index = torch.arange(int(torch.tensor(in_shape).prod())).reshape(in_shape)
    moved = index.reshape(sizes).permute(perm)
    shape = list(moved.shape)
    k = n + 1
    if channels_first:
        out = moved.reshape(shape[0], -1, *shape[1 + k:])
    else:
        out = moved.reshape(*shape[:1 + n], -1)
    return out, in_shape


@pytest.mark.parametrize("channels_first", [True, False], ids=["channels_first", "channels_last"])
def test_classifier_on_every_permutation_of_the_2d_split(channels_first):
    hits = 0
    for perm in itertools.permutations(range(6)):
        out, in_shape = _split_and_permute(2, perm, channels_first)
        found = classify_relayout(out, in_shape, (2, 3))
        expected = _expected(perm, 2, channels_first)
        assert (found is not None and found[0] == "down") == expected, (perm, found)
        hits += expected
    assert hits == 6  # the six channel orders


@settings(max_examples=60, deadline=None)
@given(perm=st.permutations(range(8)), channels_first=st.booleans(), canonical=st.booleans())
def test_classifier_on_permutations_of_the_3d_split(perm, channels_first, canonical):
    if canonical:  # half the draws: a valid order of the channel group, to exercise acceptance
        group = [p for p in perm if p in (1, 3, 5, 7)]
        perm = [0, *group, 2, 4, 6] if channels_first else [0, 2, 4, 6, *group]
    out, in_shape = _split_and_permute(3, tuple(perm), channels_first)
    found = classify_relayout(out, in_shape, (2, 3, 4))
    assert (found is not None and found[0] == "down") == _expected(tuple(perm), 3, channels_first), (perm, found)

"""Hypothesis strategies for sparse-encoder tests: masks, sizes, batches, images and random CNNs.

Everything here draws small values on purpose: property tests run many examples, so each one should
take milliseconds. Tensors are drawn from a seed (``torch.Generator``), not element by element, which
keeps generation fast; Hypothesis still shrinks the seed, shape and mask choices.

Example::

    from hypothesis import given, settings
    from sparsify.testing import strategies as sst, assert_sparse_semantics

    @settings(deadline=None, max_examples=30)
    @given(case=sst.cnn_cases())
    def test_contract(case):
        assert_sparse_semantics(case.model, case.x, case.mask)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import hypothesis.strategies as st
import torch
import torch.nn as nn

from .random_cnn import (
    ACTIVATIONS,
    TIMM_2D_NORMS,
    ActSpec,
    CNNSpec,
    ConcatSpec,
    ConvNeXtSpec,
    ConvSpec,
    DownUpSpec,
    ECASpec,
    GRNSpec,
    HeadSpec,
    ImagePoolSpec,
    PoolSpec,
    ResidualSpec,
    SESpec,
    SpatialGateSpec,
    SplitSpec,
    build_cnn,
)

__all__ = [
    "ACTS",
    "BLOCK_KINDS",
    "NORM_KINDS",
    "CNNCase",
    "batch_sizes",
    "channel_counts",
    "cnn_cases",
    "grid_sizes",
    "images",
    "input_sizes",
    "masks",
    "random_cnn_specs",
    "random_cnns",
    "seeds",
]

#: Activations drawn by default (sigmoid, hardsigmoid and softplus have f(0) != 0).
ACTS: tuple[str, ...] = tuple(a for a in ACTIVATIONS if a != "identity") + ("identity",)
#: Normalisations drawn by default (``"gn"`` / ``"gnact"`` draw a group count dividing the channels).
NORM_KINDS: tuple[str, ...] = ("none", "bn", "bnact", "gn", "gnact", "ln2d", "timm_ln2d", "in")
#: Block kinds drawn by default.
BLOCK_KINDS: tuple[str, ...] = (
    "conv",
    "pool",
    "se",
    "residual",
    "concat",
    "split",
    "convnext",
    "act",
    "eca",
    "grn",
    "downup",
    "spatial_gate",
    "image_pool",
)

_DOWN_KINDS = ("conv", "pool", "residual", "concat")  # block kinds that can carry a stride of 2


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator``."""
    return st.integers(min_value=0, max_value=2**31 - 1)


def batch_sizes(min_size: int = 1, max_size: int = 4) -> st.SearchStrategy[int]:
    """Batch sizes in ``[min_size, max_size]``."""
    return st.integers(min_value=min_size, max_value=max_size)


def channel_counts(min_channels: int = 1, max_channels: int = 8) -> st.SearchStrategy[int]:
    """Channel counts in ``[min_channels, max_channels]``."""
    return st.integers(min_value=min_channels, max_value=max_channels)


def grid_sizes(min_cells: int = 1, max_cells: int = 4, *, square: bool | None = None,
               spatial_dims: int = 2) -> st.SearchStrategy:
    """``(h, w)`` patch-grid sizes (``(l,)`` or ``(d, h, w)`` for ``spatial_dims`` 1 or 3). ``square=True``
    forces equal sides, ``False`` forces the last two to differ (the first two in 2-D), ``None`` allows
    both."""
    if spatial_dims != 2:
        @st.composite
        def _draw_nd(draw: st.DrawFn) -> tuple[int, ...]:
            first = draw(st.integers(min_cells, max_cells))
            if square:
                return (first,) * spatial_dims
            rest = [draw(st.integers(min_cells, max_cells)) for _ in range(spatial_dims - 1)]
            if square is False and rest and rest[-1] == first:
                rest[-1] = min_cells if first != min_cells else max_cells
            return (first, *rest)

        return _draw_nd()

    @st.composite
    def _draw(draw: st.DrawFn) -> tuple[int, int]:
        h = draw(st.integers(min_cells, max_cells))
        if square:
            return (h, h)
        if square is False:
            if min_cells == max_cells:
                raise ValueError("a non-square grid needs max_cells > min_cells")
            w = draw(st.integers(min_cells, max_cells).filter(lambda v: v != h))
        else:
            w = draw(st.integers(min_cells, max_cells))
        return (h, w)

    return _draw()


def input_sizes(
    downsample_ratio: int, min_cells: int = 1, max_cells: int = 4, *, square: bool | None = None
) -> st.SearchStrategy[tuple[int, int]]:
    """Image sizes ``(H, W)`` that are multiples of ``downsample_ratio`` (non-square allowed)."""
    r = downsample_ratio
    return grid_sizes(min_cells, max_cells, square=square).map(lambda g: (g[0] * r, g[1] * r))


def masks(
    batch: int,
    grid: tuple[int, ...],
    *,
    min_visible: int = 1,
    allow_fully_masked: bool = False,
    device: torch.device | str | None = None,
) -> st.SearchStrategy[torch.Tensor]:
    """Bool masks of shape ``(batch, 1, *grid)`` (``(batch, 1, h, w)`` for images), True = visible.

    Each sample keeps at least ``min_visible`` visible patches (clipped to the grid size) unless
    ``allow_fully_masked`` is set, in which case a sample may be entirely masked. Hypothesis shrinks
    towards all-visible.
    """
    grid = tuple(grid)
    n = math.prod(grid)
    need = 0 if allow_fully_masked else min(max(min_visible, 0), n)

    @st.composite
    def _draw(draw: st.DrawFn) -> torch.Tensor:
        rows = []
        for _ in range(batch):
            hidden = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            visible = [not v for v in hidden]
            missing = need - sum(visible)
            if missing > 0:
                masked_idx = [i for i, v in enumerate(visible) if not v]
                chosen = draw(st.permutations(masked_idx))[:missing]
                for i in chosen:
                    visible[i] = True
            rows.append(visible)
        return torch.tensor(rows, dtype=torch.bool, device=device).view(batch, 1, *grid)

    return _draw()


def images(
    batch: int,
    channels: int,
    size: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    scale: float = 1.0,
) -> st.SearchStrategy[torch.Tensor]:
    """Random images ``(batch, channels, H, W)``: ``scale * N(0, 1) + offset`` drawn from a seed, with a
    per-draw offset in [-1, 1] so that inputs are not always centred."""

    @st.composite
    def _draw(draw: st.DrawFn) -> torch.Tensor:
        seed = draw(seeds())
        offset = draw(st.sampled_from(_OFFSETS))
        x = _image(batch, channels, size, seed, offset, dtype=dtype, scale=scale)
        return x.to(device) if device is not None else x

    return _draw()


_OFFSETS = (0.0, 0.5, -1.0, 1.0)


def _image(
    batch: int,
    channels: int,
    size: tuple[int, int],
    seed: int,
    offset: float,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *size, generator=g, dtype=dtype) * scale + offset


# ----------------------------------------------------------------------------------------------------
# Random CNN specs
# ----------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _norm(draw: st.DrawFn, channels: int, norms: Sequence[str]) -> str:
    kind = draw(st.sampled_from(norms))
    if kind in ("gn", "gnact"):
        return f"{kind}:{draw(st.sampled_from(_divisors(channels)))}"
    return kind


@st.composite
def _conv(
    draw: st.DrawFn,
    cin: int,
    stride: int,
    *,
    out: int | None,
    max_channels: int,
    norms: Sequence[str],
    acts: Sequence[str],
    spatial_dims: int = 2,
) -> ConvSpec:
    kernel = draw(st.integers(1, 7))
    dilation = 1
    if kernel > 1 and draw(st.booleans()):
        dilation = 2
    pad_mode = draw(st.sampled_from(["conv", "conv", "explicit", "same"]))
    if stride == 1 and pad_mode != "same" and dilation * (kernel - 1) % 2:  # keep the size exact
        kernel = kernel + 1 if kernel < 7 else kernel - 1
    depthwise = draw(st.integers(0, 3)) == 0
    if out is None:
        out = draw(st.integers(1, max_channels))
    if depthwise:
        mult = max(1, out // cin)
        out = cin * mult
        groups = cin
    else:
        groups = draw(st.sampled_from(_divisors(math.gcd(cin, out))))
    return ConvSpec(
        out=out,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        groups=groups,
        norm=draw(_norm(out, norms)),
        act=draw(st.sampled_from(acts)),
        bias=draw(st.booleans()),
        functional_act=draw(st.booleans()),
        pad_mode=pad_mode,
        # weight standardisation needs more than one weight per output channel
        conv=draw(
            st.sampled_from(["module", "module", "functional"]
                            + (["std"] if cin // groups * kernel**2 > 1 and spatial_dims == 2 else []))
        ),
    )


@st.composite
def _pool(draw: st.DrawFn, stride: int, spatial_dims: int = 2) -> PoolSpec:
    # PyTorch's avg_pool3d refuses a window larger than the unpadded input (padding or ceil_mode do not
    # help), which the small maps drawn here often are: 3-D average pools get 2-site windows only.
    kind = draw(st.sampled_from(["max"] if spatial_dims == 3 and stride == 1 else ["max", "avg"]))
    if stride == 1:
        kernel, padding, ceil_mode = 3, 1, draw(st.booleans())
    else:
        windows = [(2, 0, False), (2, 0, True), (3, 1, False), (3, 0, True)]
        if spatial_dims == 3:
            windows = [w for w in windows if w[0] == 2 or kind == "max" and w[2] is False]
        kernel, padding, ceil_mode = draw(st.sampled_from(windows))
    return PoolSpec(
        kind=kind,
        kernel=kernel,
        stride=stride,
        padding=padding,
        ceil_mode=ceil_mode,
        count_include_pad=draw(st.booleans()),
        functional=draw(st.booleans()),
        zero_pad=padding > 0 and not ceil_mode and draw(st.booleans()),
    )


@st.composite
def _block(
    draw: st.DrawFn,
    kind: str,
    cin: int,
    stride: int,
    *,
    max_channels: int,
    norms: Sequence[str],
    acts: Sequence[str],
    spatial_dims: int = 2,
):
    kw = dict(max_channels=max_channels, norms=norms, acts=acts, spatial_dims=spatial_dims)
    if kind == "conv":
        return draw(_conv(cin, stride, out=None, **kw))
    if kind == "pool":
        return draw(_pool(stride, spatial_dims))
    if kind == "act":
        return ActSpec(act=draw(st.sampled_from(acts)), functional=draw(st.booleans()))
    if kind == "se":
        return SESpec(
            reduced=draw(st.integers(1, max_channels)),
            act=draw(st.sampled_from(acts)),
            gate=draw(st.sampled_from(["sigmoid", "hardsigmoid"])),
            pool=draw(st.sampled_from(["mean", "adaptive", "functional", "sum", "amax", "adaptive_max",
                                       "whole_avg", "whole_max", "bn"])),
        )
    if kind == "eca":
        return ECASpec(kernel=draw(st.sampled_from([1, 3, 5])))
    if kind == "grn":
        return GRNSpec(form=draw(st.sampled_from(["plain", "addcmul", "lerp"])))
    if kind == "spatial_gate":
        stats = draw(st.lists(st.sampled_from(["max", "min", "mean", "argmax"]), min_size=1, max_size=3, unique=True))
        return SpatialGateSpec(stats=tuple(stats), kernel=draw(st.sampled_from([3, 5, 7])))
    if kind == "image_pool":
        return ImagePoolSpec(width=draw(st.integers(1, max_channels)),
                             up=draw(st.sampled_from(["bilinear", "nearest", "expand"])), bn=draw(st.booleans()))
    if kind == "downup":
        down = draw(_conv(cin, 2, out=cin, **kw))
        return DownUpSpec(
            down=down,
            up=draw(st.sampled_from(["nearest", "bilinear", "upsample", "convT"])),
            merge=draw(st.sampled_from(["add", "cat"])),
        )
    if kind == "convnext":
        return ConvNeXtSpec(
            kernel=draw(st.sampled_from([3, 5, 7])),
            expansion=draw(st.integers(1, 3)),
            act=draw(st.sampled_from(acts)),
            layer_scale=draw(st.booleans()),
        )
    if kind == "split":
        half = cin // 2
        n = draw(st.integers(1, 2))
        return SplitSpec(body=tuple(draw(_conv(half, 1, out=half, **kw)) for _ in range(n)))
    if kind == "residual":
        n = draw(st.integers(1, 2))
        body = []
        c = cin
        for i in range(n):
            s = stride if i == 0 else 1
            b = draw(_conv(c, s, out=None, **kw))
            body.append(b)
            c = b.out
        shortcuts = ["conv", "avgconv"]
        if stride == 1 and c == cin:
            shortcuts.insert(0, "identity")
        return ResidualSpec(
            body=tuple(body), shortcut=draw(st.sampled_from(shortcuts)), act=draw(st.sampled_from(acts))
        )
    if kind == "concat":
        nb = draw(st.integers(2, 3))
        branches = []
        for _ in range(nb):
            n = draw(st.integers(1, 2))
            branch = []
            c = cin
            for i in range(n):
                b = draw(_conv(c, stride if i == 0 else 1, out=None, **kw))
                branch.append(b)
                c = b.out
            branches.append(tuple(branch))
        return ConcatSpec(branches=tuple(branches))
    raise ValueError(f"unknown block kind {kind!r}")


def random_cnn_specs(
    *,
    min_downsamples: int = 1,
    max_downsamples: int = 3,
    max_blocks: int = 5,
    max_channels: int = 8,
    in_chans: int | None = None,
    norms: Sequence[str] = NORM_KINDS,
    acts: Sequence[str] = ACTS,
    blocks: Sequence[str] = BLOCK_KINDS,
    head: bool | None = None,
    spatial_dims: int = 2,
) -> st.SearchStrategy[CNNSpec]:
    """Specs of small random CNNs (see :mod:`sparsify.testing.random_cnn`).

    Args:
        min_downsamples, max_downsamples: number of stride-2 steps, so R is a power of two in
            ``[2**min_downsamples, 2**max_downsamples]``.
        max_blocks: at most this many stride-1 blocks besides the stem and the stride-2 blocks.
        max_channels: widest layer (depthwise multipliers and concatenations may exceed it a bit).
        in_chans: fixed input channels; drawn from 1..4 when None.
        norms, acts, blocks: the ingredients to draw from (subsets of :data:`NORM_KINDS`,
            :data:`ACTS`, :data:`BLOCK_KINDS`).
        head: True / False to force a classification head or none; None draws it.
        spatial_dims: 1 (signal CNNs), 2 (images) or 3 (volume CNNs); timm's 2-D-only norms and
            weight-standardised convs are left out of the draws in other ranks.
    """
    norms, acts, blocks = tuple(norms), tuple(acts), tuple(blocks)
    if spatial_dims != 2:
        norms = tuple(n for n in norms if n not in TIMM_2D_NORMS) or ("bn",)
    down_kinds = tuple(k for k in blocks if k in _DOWN_KINDS) or ("conv",)
    unknown = set(blocks) - set(BLOCK_KINDS)
    if unknown:
        raise ValueError(f"unknown block kinds {sorted(unknown)}; choose from {BLOCK_KINDS}")

    @st.composite
    def _draw(draw: st.DrawFn) -> CNNSpec:
        cin0 = in_chans if in_chans is not None else draw(st.integers(1, 4))
        n_down = draw(st.integers(min_downsamples, max_downsamples))
        n_keep = draw(st.integers(0, max_blocks))
        # The stem is always a conv; it may itself be one of the downsampling steps.
        stem_down = n_down > 0 and draw(st.booleans())
        slots = [2] * (n_down - int(stem_down)) + [1] * n_keep
        slots = list(draw(st.permutations(slots)))
        kw = dict(max_channels=max_channels, norms=norms, acts=acts, spatial_dims=spatial_dims)
        specs = [draw(_conv(cin0, 2 if stem_down else 1, out=None, **kw))]
        c = specs[0].out
        downs_done = int(stem_down)
        for stride in slots:
            kinds = down_kinds if stride == 2 else blocks
            if c % 2:
                kinds = tuple(k for k in kinds if k != "split")
            if downs_done >= n_down:  # the size may be odd from here on: nothing that halves it
                kinds = tuple(k for k in kinds if k != "downup")
            kinds = kinds or ("conv",)
            downs_done += stride == 2
            kind = draw(st.sampled_from(kinds))
            b = draw(_block(kind, c, stride, **kw))
            specs.append(b)
            c = b.out_channels(c)
        use_head = draw(st.booleans()) if head is None else head
        head_spec = (
            HeadSpec(num_classes=draw(st.integers(1, 4)), pool=draw(st.sampled_from(["adaptive", "mean"])))
            if use_head
            else None
        )
        return CNNSpec(in_chans=cin0, blocks=tuple(specs), head=head_spec, seed=draw(st.integers(0, 2**16)),
                       spatial_dims=spatial_dims)

    return _draw()


def random_cnns(**kwargs) -> st.SearchStrategy[nn.Module]:
    """Built random CNNs (:class:`~sparsify.testing.random_cnn.RandomCNN`), each with ``.spec``,
    ``.downsample_ratio`` and ``.in_chans``. Takes the same arguments as :func:`random_cnn_specs`.

    Prefer drawing specs and building them in the test when you want Hypothesis to print a
    paste-able reproduction (a spec's repr is valid Python).
    """
    return random_cnn_specs(**kwargs).map(build_cnn)


class CNNCase(NamedTuple):
    """One complete example: a spec, its built model, an input and a mask that fit it.

    Its ``repr`` is compact and reproducible: the spec (valid Python), the input's shape, seed and
    offset (``x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + offset``) and the
    mask as nested lists.
    """

    spec: CNNSpec
    model: nn.Module
    x: torch.Tensor
    mask: torch.Tensor
    x_seed: int = 0
    x_offset: float = 0.0

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    def __repr__(self) -> str:
        return (
            f"CNNCase(spec={self.spec!r}, x_shape={tuple(self.x.shape)}, x_seed={self.x_seed}, "
            f"x_offset={self.x_offset}, mask={self.mask.int().tolist()})"
        )


def cnn_cases(
    *,
    max_batch: int = 3,
    max_cells: int = 3,
    square: bool | None = None,
    allow_fully_masked: bool = False,
    **spec_kwargs,
) -> st.SearchStrategy[CNNCase]:
    """A random CNN together with a fitting input (non-square sizes, multiples of R) and mask.

    ``spec_kwargs`` go to :func:`random_cnn_specs` (``spatial_dims=1`` or ``3`` for signal or volume
    CNNs).
    """
    rank = spec_kwargs.get("spatial_dims", 2)

    @st.composite
    def _draw(draw: st.DrawFn) -> CNNCase:
        spec = draw(random_cnn_specs(**spec_kwargs))
        r = spec.downsample_ratio
        # At least two cells, so that train-mode BatchNorm / InstanceNorm see more than one value
        # per channel even at the coarsest scale with a batch of one.
        grid = draw(grid_sizes(1, max_cells, square=square, spatial_dims=rank).filter(lambda g: math.prod(g) >= 2))
        # BatchNorm over pooled (B, C, 1, 1) vectors needs two samples in train mode, as in the model
        batch = draw(batch_sizes(spec.min_train_batch, max(max_batch, spec.min_train_batch)))
        seed = draw(seeds())
        offset = draw(st.sampled_from(_OFFSETS))
        x = _image(batch, spec.in_chans, tuple(g * r for g in grid), seed, offset)
        mask = draw(masks(batch, grid, allow_fully_masked=allow_fully_masked))
        return CNNCase(spec, build_cnn(spec), x, mask, seed, offset)

    return _draw()

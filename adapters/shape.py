"""Layout operations: permute, reshape, concatenation, splitting, indexing, broadcasting.

They never need a mask-aware implementation; their rules follow where the spatial dims go. Anything
that merges, splits, slices or reorders a spatial dim (token flattening for attention, unfold,
spatial slicing) is refused: sites would no longer line up with the patch mask.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from ._kinds import passthrough_nonspatial
from ._registry import NONSPATIAL, Decision, Info, NodeView, Unsupported, register_rule

__all__ = ["track_reshape"]


def _dims_arg(view: NodeView, start: int = 1, name: str = "dims") -> list[int]:
    dims = view.args[start:] if len(view.args) > start else [view.kwargs.get(name)]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return list(dims)


def _permute_rule(view: NodeView) -> Decision:
    x = view.args[0]
    info = view.info(x)
    if info is None or info.spatial is None:
        return passthrough_nonspatial(view)
    ndim = len(view.shape(x))
    perm = [d % ndim for d in _dims_arg(view)]
    return Decision(out=info.but(spatial=tuple(perm.index(d) for d in info.spatial)))


def _transpose_rule(view: NodeView) -> Decision:
    x = view.args[0]
    info = view.info(x)
    if info is None or info.spatial is None:
        return passthrough_nonspatial(view)
    ndim = len(view.shape(x))
    a, b = view.arg(1, "dim0") % ndim, view.arg(2, "dim1") % ndim
    swap = {a: b, b: a}
    return Decision(out=info.but(spatial=tuple(swap.get(d, d) for d in info.spatial)))


def track_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], spatial: tuple[int, ...]
                  ) -> tuple[int, ...]:
    """Where the spatial dims of ``in_shape`` land in ``out_shape``, or Unsupported if they merge.

    Dims are matched in groups with equal products (the only way a reshape can move data); a spatial
    dim survives when it forms a group of its own, apart from size-1 dims.
    """
    in_shape, out_shape = list(in_shape), list(out_shape)
    result: dict[int, int] = {}
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and gi and gj:
                break
            if (pi <= pj or j >= len(out_shape)) and i < len(in_shape):
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            elif j < len(out_shape):
                pj *= out_shape[j]
                gj.append(j)
                j += 1
            else:
                break
        # trailing size-1 dims join the group just closed
        while i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            gi.append(i)
            i += 1
        while j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
            gj.append(j)
            j += 1
        for d in spatial:
            if d in gi:
                big_in = [k for k in gi if in_shape[k] != 1]
                big_out = [k for k in gj if out_shape[k] != 1]
                if big_in != [d] or len(big_out) != 1 or out_shape[big_out[0]] != in_shape[d]:
                    raise Unsupported("reshape merges or splits a spatial dim (e.g. flattening "
                                      "positions into tokens)")
                result[d] = big_out[0]
    return tuple(result[d] for d in spatial)


def reshape_varies(in_shape, varies, out_shape) -> tuple[int, ...] | None:
    """Where a broadcast tensor's values vary after a reshape, or None when unknown.

    Dims are matched in groups with equal products; within a group whose values vary only over a
    leading part of its dims (product P), the output dims up to the first whose running product is a
    multiple of P vary and the rest do not (row-major order): EvoNorm's per-group std expanded to
    (B, G, C/G, H, W) and reshaped to (B, C, H, W) varies over (B, C) only.
    """
    if len(varies) > len(in_shape):
        return None
    varies = (1,) * (len(in_shape) - len(varies)) + tuple(varies)
    result = list(out_shape)
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        gi, gj, pi, pj = [i], [j], in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            else:
                pj *= out_shape[j]
                gj.append(j)
                j += 1
        moving = [k for k in gi if varies[k] != 1]
        if not moving:
            for k in gj:
                result[k] = 1
            continue
        if any(varies[k] != in_shape[k] for k in moving):
            return None
        prefix = 1
        for k in gi[:gi.index(moving[-1]) + 1]:
            prefix *= in_shape[k]
        run = 1
        for k in gj:
            if run % prefix == 0:
                result[k] = 1
            run *= out_shape[k]
    if i != len(in_shape) or j != len(out_shape):
        return None
    return tuple(result)


def _reshape_rule(view: NodeView) -> Decision:
    x = view.args[0] if view.args else view.kwargs.get("input")
    info = view.info(x)
    if info is None or info.spatial is None:
        decision = passthrough_nonspatial(view)
        in_shape, out_shape = view.shape(x), view.shape()
        if (isinstance(decision.out, Info) and info is not None and info.varies is not None
                and isinstance(in_shape, torch.Size) and isinstance(out_shape, torch.Size)
                and in_shape.numel() == out_shape.numel() and 0 not in in_shape):
            varies = reshape_varies(tuple(in_shape), tuple(info.varies), tuple(out_shape))
            if varies is not None:
                decision.out = decision.out.but(varies=varies)
        return decision
    if any(view.shape(x)[d] == 1 for d in info.spatial):
        raise Unsupported("reshape of a feature map with a size-1 spatial dim is ambiguous at the "
                          "traced size; trace with a larger input_size")
    spatial = track_reshape(tuple(view.shape(x)), tuple(view.shape()), info.spatial)
    return Decision(out=info.but(spatial=spatial))


def _unsqueeze_rule(view: NodeView) -> Decision:
    # The new dim's position is explicit: no need to guess from sizes (a 1-pixel-high map is fine).
    x = view.args[0] if view.args else view.kwargs.get("input")
    info = view.info(x)
    if info is None or info.spatial is None:
        return passthrough_nonspatial(view)
    dim = view.arg(1, "dim") % (len(view.shape(x)) + 1)
    return Decision(out=info.but(spatial=tuple(d + (1 if d >= dim else 0) for d in info.spatial)))


def _squeeze_rule(view: NodeView) -> Decision:
    x = view.args[0] if view.args else view.kwargs.get("input")
    info = view.info(x)
    dim = view.arg(1, "dim")
    if info is None or info.spatial is None or not isinstance(dim, int):
        return _reshape_rule(view)
    ndim = len(view.shape(x))
    dim %= ndim
    if dim in info.spatial:
        raise Unsupported("squeezes a spatial dim")
    if view.shape(x)[dim] != 1:  # a no-op
        return Decision(out=info)
    return Decision(out=info.but(spatial=tuple(d - (1 if d > dim else 0) for d in info.spatial)))


for _t in ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as",
           torch.reshape, torch.flatten, torch.unflatten, nn.Flatten, nn.Unflatten):
    register_rule(_t, _reshape_rule)
for _t in ("unsqueeze", "unsqueeze_", torch.unsqueeze):
    register_rule(_t, _unsqueeze_rule)
for _t in ("squeeze", "squeeze_", torch.squeeze):
    register_rule(_t, _squeeze_rule)
for _t in ("permute", torch.permute):
    register_rule(_t, _permute_rule)
for _t in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
    register_rule(_t, _transpose_rule)


def _cat_rule(view: NodeView) -> Decision:
    tensors = view.arg(0, "tensors")
    if isinstance(tensors, torch.fx.Node):  # a split/chunk result passed whole: torch.cat(x.chunk(2, 1))
        infos = view.info(tensors)
        infos = list(infos) if isinstance(infos, tuple) else [infos]
        shapes = view.shape(tensors)
    else:
        infos = [view.info(t) for t in tensors]
        shapes = [view.shape(t) for t in tensors]
    spatial = [i for i in infos if i is not None and i.spatial is not None]
    if not spatial:
        return passthrough_nonspatial(view)
    if len({i.spatial for i in spatial}) != 1:
        raise Unsupported("concatenates feature maps with different layouts")
    ndim = len(shapes[0])
    dim = view.arg(1, "dim", 0)
    layout = spatial[0].spatial
    for info, shape in zip(infos, shapes):
        if info is None or info.spatial is not None:
            continue
        # a pooled vector broadcast over the map (expand / repeat) is one value per sample: a map
        # that is simply not zero at masked sites; anything varying over space is a fixed map
        varies = info.varies if info.varies is not None else shape
        if not isinstance(varies, (tuple, torch.Size)) or len(varies) != ndim or any(
                varies[d] != 1 for d in layout):
            raise Unsupported("concatenates feature maps with a non-spatial tensor that varies over space "
                              "(a coordinate channel or fixed map): it is not computed from the visible "
                              "sites, so masked patches and a larger canvas would change what they see")
        spatial.append(Info(spatial=layout, zero=False))
    if view.node.target is torch.stack:
        dim = dim % (ndim + 1)
        layout = tuple(d + (1 if d >= dim else 0) for d in layout)
    elif dim % ndim in layout:
        raise Unsupported("concatenates along a spatial dim")
    return Decision(out=Info(spatial=layout, zero=all(i.zero for i in spatial),
                             nonneg=all(i.nonneg for i in spatial),
                             aligned=all(i.aligned for i in spatial)))


for _t in (torch.cat, torch.concat, torch.concatenate, torch.stack):
    register_rule(_t, _cat_rule)


def _split_rule(view: NodeView) -> Decision:
    x = view.args[0]
    info = view.info(x)
    if info is None or info.spatial is None:
        return passthrough_nonspatial(view)
    ndim = len(view.shape(x))
    target = view.node.target
    if target in ("unbind", torch.unbind):
        dim = view.arg(1, "dim", 0) % ndim
        if dim in info.spatial:
            raise Unsupported("unbinds along a spatial dim")
        layout = tuple(d - (1 if d > dim else 0) for d in info.spatial)
        return Decision(out=tuple(info.but(spatial=layout) for _ in view.shape()))
    dim = view.arg(2, "dim", 0) % ndim
    if dim in info.spatial:
        raise Unsupported("splits along a spatial dim")
    return Decision(out=tuple(info for _ in view.shape()))


for _t in ("split", "chunk", "tensor_split", "unbind", torch.split, torch.chunk, torch.tensor_split,
           torch.unbind):
    register_rule(_t, _split_rule)


def _getitem_rule(view: NodeView) -> Decision:
    container, index = view.args
    info = view.info(container)
    if isinstance(info, tuple):  # picking one output of split/chunk
        return Decision(out=info[index])
    if info is None or info.spatial is None:
        return passthrough_nonspatial(view)
    ndim = len(view.shape(container))
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(it, torch.fx.Node) or isinstance(it, (list, torch.Tensor)) for it in items):
        raise Unsupported("indexes a feature map with a tensor or list")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
        items = items[:k] + [slice(None)] * (ndim - consumed) + items[k + 1:]
    items += [slice(None)] * (ndim - sum(1 for it in items if it is not None))
    in_dim = out_dim = 0
    mapping: dict[int, int] = {}
    for it in items:
        if it is None:
            out_dim += 1
            continue
        if in_dim in info.spatial:
            if it != slice(None):
                raise Unsupported("slices or indexes a spatial dim")
            mapping[in_dim] = out_dim
        if not isinstance(it, int):
            out_dim += 1
        in_dim += 1
    return Decision(out=info.but(spatial=tuple(mapping[d] for d in info.spatial)))


register_rule(operator.getitem, _getitem_rule)


def _getattr_rule(view: NodeView) -> Decision:
    # ``torch.max(x, 1).values`` / ``.indices``: pick a field of a (values, indices) result.
    container, name = view.args[0], view.args[1]
    info = view.info(container)
    if isinstance(info, tuple) and name in ("values", "indices"):
        return Decision(out=info[0 if name == "values" else 1])
    if isinstance(info, Info) and info.spatial is not None:
        raise Unsupported(f"reads attribute .{name} of a feature map")
    return passthrough_nonspatial(view)


register_rule(getattr, _getattr_rule)


def _expand_rule(view: NodeView) -> Decision:
    # A non-spatial tensor broadcast to a feature map's shape carries one value per sample/channel;
    # it stays a broadcast constant (ECA's y.expand_as(x)).
    x = view.args[0]
    info = view.info(x)
    if info is None:
        return Decision(out=NONSPATIAL)
    if info.spatial is None:  # values still vary only where the input's did
        varies = info.varies if info.varies is not None else view.shape(x)
        return Decision(out=info.but(varies=tuple(varies)))
    return Decision(out=info)


for _t in ("expand", "expand_as", torch.broadcast_to, "broadcast_to"):
    register_rule(_t, _expand_rule)


def _repeat_rule(view: NodeView) -> Decision:
    x = view.args[0]
    info = view.info(x)
    if info is None or info.spatial is None:
        return _expand_rule(view)  # tiling a pooled vector is a broadcast of it
    reps = _dims_arg(view, 1, "repeats")
    shift = len(reps) - len(view.shape(x))
    if any(reps[d + shift] != 1 for d in info.spatial):
        raise Unsupported("repeats a feature map along a spatial dim")
    return Decision(out=info.but(spatial=tuple(d + shift for d in info.spatial)))


register_rule("repeat", _repeat_rule)


def _fresh_rule(view: NodeView) -> Decision:
    # New tensors whose values do not come from any site (new_empty, zeros_like, bernoulli noise).
    return Decision(out=Info(spatial=None, varies=()))


for _t in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "bernoulli_", "uniform_",
           "normal_", torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like,
           torch.randn_like, torch.full_like, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand,
           torch.randn):
    register_rule(_t, _fresh_rule)


def _pixel_shuffle_rule(down: bool):
    # pixel_unshuffle (space-to-depth stems) gathers r x r neighbouring sites into channels: a mixing
    # step that keeps a zero input zero once r divides the patch size (the output grid is then
    # aligned); pixel_shuffle spreads each site's channels over r x r sites: a relayout per site.
    def rule(view: NodeView) -> Decision:
        x = view.args[0] if view.args else view.kwargs.get("input")
        info = view.info(x)
        if info is None or info.spatial is None:
            return passthrough_nonspatial(view)
        if info.spatial != (2, 3) or len(view.shape(x)) != 4:
            raise Unsupported("pixel (un)shuffle of a map that is not in (N, C, H, W) layout")
        out = Info(spatial=(2, 3), zero=info.zero or down, nonneg=info.nonneg, aligned=info.aligned)
        return Decision(out=out, require_zero=[x] if down else [])

    return rule


for _t in (nn.PixelUnshuffle, torch.pixel_unshuffle, torch.nn.functional.pixel_unshuffle):
    register_rule(_t, _pixel_shuffle_rule(down=True))
for _t in (nn.PixelShuffle, torch.pixel_shuffle, torch.nn.functional.pixel_shuffle):
    register_rule(_t, _pixel_shuffle_rule(down=False))

"""Space-to-depth and depth-to-space written with view / permute / reshape (or einops).

``x.view(b, c, h // s, s, w // s, s).permute(0, 1, 3, 5, 2, 4).reshape(b, c * s * s, h // s, w // s)``
(TResNet's stem, YOLOv5's Focus written as a reshape) and ``rearrange(x, "b c (h p) (w q) -> b (c p q)
h w")`` are ``pixel_unshuffle`` followed by a channel permutation; the reverse chain is
``pixel_shuffle``. Each step alone splits or merges a spatial dim, which the layout rules in
:mod:`.shape` refuse; the chain as a whole keeps every site inside its block, so the mask follows.

How a chain is recognised: never from the pattern of arguments. When a layout op is refused, the
chain of layout ops around it (back to a map in (N, C, *spatial) or (N, *spatial, C) layout, forward
to the first tensor of that rank again) is replayed on an index tensor (each element its own flat
position) at the traced shapes, and accepted only if every output element comes from the input the
way a space-to-depth (or depth-to-space) with some channel order takes it: same sample, the cell's own
block, and a block offset and input channel that depend on the output channel alone. Anything else
keeps the original refusal, naming the node.

The mask semantics are those of ``pixel_unshuffle`` / ``pixel_shuffle`` (:mod:`.shape`): the input of
a space-to-depth must be zero at masked sites and its output, a grid coarser by the block, is then
zero at masked cells (a block lies inside one patch when the block divides the patch, which the
analysis checks as for any map); depth-to-space output is treated as not zero (a mask multiply is
added where a consumer needs one).

einops: ``einops.rearrange`` and friends run Python logic on the tensor's shape, which fx proxies
cannot follow, so the tracer keeps them as calls (leaves; see :mod:`sparsify.trace`) and the
``einops.layers.torch.Rearrange`` module whole. A ``rearrange`` call is judged the same way, by
replaying it on an index tensor: a pure relayout that keeps every spatial dim whole, a space-to-depth
or a depth-to-space is accepted; anything else (flattening positions into tokens) is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ._registry import Decision, Info, NodeView, Unsupported, register_rule, registered_rule

__all__ = ["replay_chain", "classify_relayout"]

#: Layout ops a chain may be made of (fx method names and functions).
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", torch.reshape, torch.flatten,
             torch.unflatten}
_PERMUTES = {"permute", torch.permute}
_TRANSPOSES = {"transpose", torch.transpose, "swapaxes", torch.swapaxes}
_IDENTITIES = {"contiguous", "clone"}
_MAX_CHAIN = 8
_META = "sparsify_space_to_depth"


@dataclass(frozen=True)
class _InChain(Info):
    """Info of a tensor in the middle of a recognised chain (spatial dims split into blocks).

    Only the next op of the chain reads it; ``end`` is the chain's last node, whose output is
    ``final``."""

    end: Any = None
    final: Any = None


def _einops_targets() -> tuple[set, set]:
    try:
        import einops
        from einops.layers import torch as einops_layers
    except ImportError:
        return set(), set()
    return {einops.rearrange}, {einops_layers.Rearrange}


def _is_chain_op(node: fx.Node) -> bool:
    if node.op in ("call_method", "call_function"):
        target = node.target
        functions, _ = _einops_targets()
        return target in _RESHAPES | _PERMUTES | _TRANSPOSES | _IDENTITIES or target in functions
    return False


def _first_tensor(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def _constant(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return False
    if isinstance(value, (list, tuple)):
        return all(_constant(v) for v in value)
    if isinstance(value, dict):
        return all(_constant(v) for v in value.values())
    return True


def _replay_one(node: fx.Node, t: torch.Tensor, shape: Any, module: nn.Module | None) -> torch.Tensor:
    """Apply one layout op to ``t`` (an index tensor); reshapes use the recorded output shape."""
    if node.op == "call_module":
        return module(t)
    target = node.target
    if target in _RESHAPES:
        return t.reshape(tuple(shape))
    if target in _IDENTITIES:
        return t
    rest, kwargs = node.args[1:], dict(node.kwargs)
    kwargs.pop("input", None)
    if not _constant(rest) or not _constant(kwargs):
        raise Unsupported("its arguments are computed at run time")
    if target in _PERMUTES:
        dims = rest if rest else (kwargs.get("dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return t.permute(*dims)
    if target in _TRANSPOSES:
        a = rest[0] if rest else kwargs.get("dim0")
        b = rest[1] if len(rest) > 1 else kwargs.get("dim1")
        return t.transpose(a, b)
    return target(t, *rest, **kwargs)  # an einops function


def replay_chain(nodes: list[fx.Node], in_shape: tuple[int, ...], shapes: dict,
                 modules: dict[str, nn.Module] | None = None) -> torch.Tensor:
    """Run the layout ops ``nodes`` (in order, each reading the previous) on an index tensor of
    ``in_shape``: element i of the input holds i, so the result says where each output came from."""
    numel = 1
    for s in in_shape:
        numel *= int(s)
    t = torch.arange(numel, dtype=torch.int64).reshape(tuple(in_shape))
    for node in nodes:
        module = (modules or {}).get(node.target) if node.op == "call_module" else None
        t = _replay_one(node, t, shapes.get(node), module)
    out_shape = shapes.get(nodes[-1])
    if not isinstance(out_shape, torch.Size) or tuple(t.shape) != tuple(out_shape):
        raise Unsupported("replaying the layout ops did not reproduce the traced shape")
    return t


def _layouts(rank: int, n: int) -> list[tuple[int, ...]]:
    """Candidate spatial positions in a rank-(n+2) tensor: channels first, channels last."""
    first = tuple(range(2, 2 + n))
    last = tuple(range(1, 1 + n))
    return [first, last] if rank == n + 2 else []


def _constant_over(value: torch.Tensor, dims: tuple[int, ...]) -> bool:
    if not dims:
        return True
    return bool((value.amax(dim=dims) == value.amin(dim=dims)).all())


def classify_relayout(index: torch.Tensor, in_shape: tuple[int, ...], in_spatial: tuple[int, ...]
                      ) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """What a pure relayout ``index`` (the chain's output on an index tensor) does to a map of shape
    ``in_shape`` with spatial dims ``in_spatial`` (batch first, one channel dim).

    Returns ``(kind, out_spatial, factors)`` with kind ``"down"`` (space-to-depth by ``factors`` per
    axis, a channel order of its own allowed) or ``"up"`` (depth-to-space), or None when the output
    is not such an op in channels-first or channels-last layout. A relayout with all factors 1 is a
    per-site channel reorder (kind ``"down"``)."""
    n = len(in_spatial)
    rank = len(in_shape)
    if rank != n + 2 or index.dim() != n + 2 or 0 in in_spatial or index.shape[0] != in_shape[0]:
        return None
    in_channel = next(d for d in range(1, rank) if d not in in_spatial)
    src = torch.unravel_index(index, tuple(in_shape))
    batch = torch.arange(in_shape[0]).reshape((-1,) + (1,) * (rank - 1))
    if not bool((src[0] == batch).all()):
        return None
    for out_spatial in _layouts(index.dim(), n):
        out_channel = next(d for d in range(1, rank) if d not in out_spatial)
        found = _check(index, src, in_shape, in_spatial, in_channel, out_spatial, out_channel)
        if found is not None:
            return found[0], out_spatial, found[1]
    return None


def _check(index, src, in_shape, in_spatial, in_channel, out_spatial, out_channel):
    rank = index.dim()
    sizes_in = [in_shape[d] for d in in_spatial]
    sizes_out = [index.shape[d] for d in out_spatial]
    if all(o <= i and i % o == 0 for i, o in zip(sizes_in, sizes_out)):
        kind = "down"
    elif all(o >= i and o % i == 0 for i, o in zip(sizes_in, sizes_out)):
        kind = "up"
    else:
        return None
    cells = (0,) + tuple(out_spatial)  # the dims an op must not depend on, besides the channel
    factors = []
    for axis, (d_in, d_out) in enumerate(zip(in_spatial, out_spatial)):
        coord = torch.arange(index.shape[d_out]).reshape([-1 if k == d_out else 1 for k in range(rank)])
        if kind == "down":
            r = sizes_in[axis] // sizes_out[axis]
            if not bool((src[d_in] // r == coord).all()) or not _constant_over(src[d_in] % r, cells):
                return None
        else:
            r = sizes_out[axis] // sizes_in[axis]
            if not bool((src[d_in] == coord // r).all()):
                return None
        factors.append(r)
    channel = src[in_channel]
    if kind == "down":
        if not _constant_over(channel, cells):
            return None
    else:
        # the input channel depends on the output channel and the offset inside the block only:
        # split every spatial dim into (coarse, offset) and ask for constancy over batch and coarse
        shape, coarse = [], [0]
        for k in range(rank):
            if k in out_spatial:
                r = factors[out_spatial.index(k)]
                coarse.append(len(shape))
                shape += [index.shape[k] // r, r]
            else:
                shape.append(index.shape[k])
        coarse[0] = 0
        if not _constant_over(channel.reshape(shape), tuple(coarse)):
            return None
    return kind, tuple(factors)


def _find_chain(view: NodeView, modules: dict | None = None) -> Decision | None:
    """The space<->depth chain through ``view.node``, as the decision for that node, or None."""
    node = view.node
    # candidate inputs: walk back through layout ops to maps of full rank with a spatial layout
    starts: list[tuple[fx.Node, list[fx.Node]]] = []
    path: list[fx.Node] = [node]
    cur = node
    for _ in range(_MAX_CHAIN):
        x = _first_tensor(cur)
        info = view.info(x)
        if not isinstance(x, fx.Node) or not isinstance(info, Info) or info.spatial is None:
            break
        if isinstance(info, _InChain):
            return None
        shape = view.shape(x)
        if isinstance(shape, torch.Size) and len(shape) == len(info.spatial) + 2:
            starts.append((x, list(path)))
        if not _is_chain_op(x):  # ops before this one keep their own (valid) layouts
            break
        path.insert(0, x)
        cur = x
    if not starts:
        return None
    # candidate ends: walk forward through single-user layout ops to a tensor of full rank
    ends: list[list[fx.Node]] = []
    tail: list[fx.Node] = []
    cur = node
    for _ in range(_MAX_CHAIN):
        shape = view.shape(cur)
        if isinstance(shape, torch.Size) and starts and len(shape) == len(view.info(starts[0][0]).spatial) + 2:
            ends.append(list(tail))
        users = list(cur.users)
        if len(users) != 1 or not _is_chain_op(users[0]) or _first_tensor(users[0]) is not cur:
            break
        cur = users[0]
        tail.append(cur)
    for x, head in starts:
        info = view.info(x)
        for rest in ends:
            chain = head + rest
            key = (tuple(n.name for n in chain), tuple(view.shape(n) for n in [x, *chain]))
            cache = node.meta.setdefault(_META, {})
            if key not in cache:
                try:
                    index = replay_chain(chain, tuple(view.shape(x)), view._shapes, modules)
                    cache[key] = classify_relayout(index, tuple(view.shape(x)), info.spatial)
                except (Unsupported, RuntimeError, TypeError, ValueError):
                    cache[key] = None
            found = cache[key]
            if found is None:
                continue
            kind, out_spatial, _ = found
            down = kind == "down"
            # down: the input is made zero first (require_zero) and a block lies inside one cell;
            # up: each fine site takes a coarse cell's value, which may not be zero at the finer mask
            final = Info(spatial=out_spatial, zero=down, nonneg=info.nonneg, aligned=info.aligned)
            require = [x] if down else []
            if not rest:
                return Decision(out=final, require_zero=require)
            return Decision(out=_InChain(spatial=None, end=chain[-1], final=final), require_zero=require)
    return None


def _chain_aware(rule: Callable[[NodeView], Decision] | None) -> Callable[[NodeView], Decision]:
    def wrapped(view: NodeView) -> Decision:
        info = view.info(_first_tensor(view.node))
        if isinstance(info, _InChain):
            return Decision(out=info.final if view.node is info.end else info)
        try:
            if rule is None:
                raise Unsupported("no adapter is registered for this operation")
            return rule(view)
        except Unsupported:
            found = _find_chain(view)
            if found is None:
                raise
            return found

    return wrapped


for _t in _RESHAPES | _PERMUTES | _TRANSPOSES | _IDENTITIES:
    register_rule(_t, _chain_aware(registered_rule(_t)))


def _einops_rule(view: NodeView) -> Decision:
    x = _first_tensor(view.node)
    info = view.info(x)
    if not isinstance(info, Info) or info.spatial is None:
        from ._kinds import passthrough_nonspatial

        return passthrough_nonspatial(view)
    if isinstance(info, _InChain):
        return Decision(out=info.final if view.node is info.end else info)
    permuted = _as_permute(view, x, info)
    if permuted is not None:
        return permuted
    found = _find_chain(view, _modules_of(view))
    if found is None:
        raise Unsupported("einops rearrange that is neither a relayout keeping every spatial dim whole nor a "
                          "space-to-depth / depth-to-space (checked on element indices)")
    return found


def _modules_of(view: NodeView) -> dict[str, nn.Module]:
    return {str(view.node.target): view.module} if view.module is not None else {}


def _as_permute(view: NodeView, x: fx.Node, info: Info) -> Decision | None:
    """A rearrange that keeps the batch dim first and every spatial dim whole, only reordering or
    regrouping the other dims (``b c h w -> b h w c``, ``b (g c) h w -> b g c h w``), is a relayout
    per site: each output element comes from the same sample and the same site."""
    in_shape, out_shape = tuple(view.shape(x)), view.shape()
    if not isinstance(out_shape, torch.Size) or not out_shape or out_shape[0] != in_shape[0]:
        return None
    try:
        index = replay_chain([view.node], in_shape, view._shapes, _modules_of(view))
    except (Unsupported, RuntimeError, TypeError, ValueError):
        return None
    src = torch.unravel_index(index, in_shape)
    rank = index.dim()

    def along(k: int) -> torch.Tensor:
        return torch.arange(index.shape[k]).reshape([-1 if j == k else 1 for j in range(rank)])

    if not bool((src[0] == along(0)).all()):
        return None
    spatial = []
    for d in info.spatial:
        k = next((k for k in range(1, rank) if k not in spatial and index.shape[k] == in_shape[d]
                  and bool((src[d] == along(k)).all())), None)
        if k is None:
            return None
        spatial.append(k)
    return Decision(out=info.but(spatial=tuple(spatial)))


def _register_einops() -> None:
    functions, module_types = _einops_targets()
    for target in functions | module_types:
        register_rule(target, _einops_rule)


_register_einops()

"""Step 4 of the pipeline: find the feature pyramid (design.md section 6).

A node's stride is input size / its spatial size, read from shapes recorded at two input sizes (a map
counts only if its size scales exactly with the input, so a valid 7x7 convolution in a classifier
head is not mistaken for a stride-224 stage). The pyramid has one map per distinct stride from 4 up
to the final one, each the *end of a stage*, found from the graph and the module-call hierarchy alone:

* The *stage level* is the innermost module call holding every downsampling into the pyramid's
  coarser strides (timm ConvNeXt: ``stages``; EfficientNet: ``blocks``; ResNet: the model itself).
  Its direct steps (child module calls, or ops written in its own forward such as a residual
  ``add``) are the candidates: the stage at stride s ends with the last step whose output is at
  stride s, that everything later depends on, and that comes before the step downsampling to the
  next stride. So a stage never ends inside the next stage's first block (the expanded activation
  of an inverted residual, a downsampling norm, a pre-activation), and whatever follows the stage
  level (a head conv, a head norm, Identity modules) is not part of the last stage.
* A trailing per-site LayerNorm or Identity step is stepped over (a hand-written downsampling or
  head norm); a stride with no such step at that level is looked up one level further out, and
  failing that the last node at that stride the output depends on is taken (the old rule).

A model that already returns a list, tuple or dict of maps (a UNet encoder, an FPN body, timm
``features_only=True``) names its pyramid itself: those maps are the stages, fine to coarse. Users can
also name the stages: graph node names, or module names (a module's output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._calls import Call, CallTree
from ._geometry import Geometry, compact
from .errors import SparsifyError

__all__ = ["GraphNode", "Stage", "describe_nodes", "discover_stages", "node_stride"]

_MIN_STRIDE = 4  # the finest automatic pyramid level, as in SparK (C2 of a ResNet)


@dataclass(frozen=True)
class Stage:
    """One level of the feature pyramid.

    Attributes:
        name: the graph node whose output this stage returns.
        stride: input size / map size: an int when every axis agrees, else one int per axis (a video
            stem's (1, 2, 2)).
        channels: channels of the map.
        module: path (as in ``named_modules()``) of the module call this stage is the output of,
            or None when the stage is an op written directly in a forward (e.g. a residual add).
    """

    name: str
    stride: int | tuple[int, ...]
    channels: int
    module: str | None = None


def axis_strides(shape_a: Any, shape_b: Any, size_a: tuple[int, ...], size_b: tuple[int, ...]
                 ) -> tuple[int, ...] | None:
    """The per-axis stride of an (N, C, *spatial) map whose size scales exactly with the input (one
    spatial dim per input axis), else None."""
    rank = len(size_a)
    if not isinstance(shape_a, torch.Size) or len(shape_a) != rank + 2 or not isinstance(shape_b, torch.Size):
        return None
    if len(shape_b) != rank + 2 or shape_a[1] != shape_b[1] or shape_a[0] != shape_b[0]:
        return None
    strides = []
    for dim, big_a, big_b in zip(range(2, rank + 2), size_a, size_b):
        small_a, small_b = shape_a[dim], shape_b[dim]
        if small_a == 0 or big_a % small_a or big_b % small_b or big_a // small_a != big_b // small_b:
            return None
        strides.append(big_a // small_a)
    return tuple(strides)


def node_stride(shape_a: Any, shape_b: Any, size_a: tuple[int, ...], size_b: tuple[int, ...]
                ) -> int | tuple[int, ...] | None:
    """The stride of an (N, C, *spatial) map whose size scales exactly with the input, else None: an
    int when every axis agrees, else one int per axis."""
    strides = axis_strides(shape_a, shape_b, size_a, size_b)
    return compact(strides) if strides is not None else None


def stride_order(stride: tuple[int, ...]) -> tuple:
    """Sort key of per-axis strides, finest first (the downsampling of a network grows every axis)."""
    return (math.prod(stride), stride)


def _rough_stride(shape_a: Any, shape_b: Any, size_b: tuple[int, ...]) -> tuple[int, ...] | None:
    """Per-axis stride of a map whose size is only roughly input / stride (rounded: the input did not
    divide)."""
    rank = len(size_b)
    if not isinstance(shape_a, torch.Size) or len(shape_a) != rank + 2 or not isinstance(shape_b, torch.Size):
        return None
    if len(shape_b) != rank + 2 or shape_a[:2] != shape_b[:2] or 0 in shape_a[2:]:
        return None
    dims = range(2, rank + 2)
    if any(abs(shape_b[d] - 2 * shape_a[d]) > 1 or shape_b[d] <= shape_a[d] for d in dims):
        return None
    return tuple(round(size_b[d - 2] / shape_b[d]) for d in dims)


_METADATA = {"shape", "ndim", "dtype", "device", "size", "dim"}


def _reads_metadata(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``...: carries the input's size, none of its values."""
    import builtins

    if node.op == "call_method":
        return node.target in _METADATA
    return (node.op == "call_function" and node.target is builtins.getattr and len(node.args) > 1
            and node.args[1] in _METADATA)


def _reaches_output_without(start: fx.Node, output: fx.Node, skip: fx.Node) -> bool:
    """Whether data flows from ``start`` to ``output`` avoiding ``skip``. Sizes read from a tensor
    (``x.shape[-2:]`` handed to a segmentation model's final interpolate) carry no data: no path."""
    seen = {skip}
    todo = [start]
    while todo:
        node = todo.pop()
        if node is output:
            return True
        for user in node.users:
            if _reads_metadata(user):
                continue
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        for arg in n.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


_TAIL_METHODS = {"permute", "contiguous"}


def _is_norm_tail(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A per-site LayerNorm, its permutes, or an Identity: never where a stage ends."""
    if node.op == "call_method" and node.target in _TAIL_METHODS:
        return True
    if node.op == "call_function" and node.target in (torch.permute, F.layer_norm):
        return True
    return node.op == "call_module" and isinstance(modules.get(node.target), (nn.LayerNorm, nn.Identity))


_MEANS = {torch.mean, torch.var, torch.std, torch.var_mean, F.layer_norm}


def _before_norm_tail(g: _Graph, node: fx.Node, stride: tuple[int, ...]) -> fx.Node | None:
    """The map at ``stride`` that ``node`` is a trailing LayerNorm / permute / Identity chain of, or None."""
    back = node
    while _is_norm_tail(back, g.modules) and back.all_input_nodes:
        back = back.all_input_nodes[0]
        if g.strides.get(back) == stride:
            return back
    return None


def _is_norm_call(call: Call, g: _Graph) -> bool:
    """A module call that ends no stage: a per-site LayerNorm (any implementation) or an Identity."""
    if call.type is not None and issubclass(call.type, (nn.LayerNorm, nn.Identity)):
        return True
    # A hand-written norm (e.g. a channels-first LayerNorm): normalises, keeps the shape, and holds
    # nothing but per-channel parameters (a conv or linear layer would make it real computation).
    normalises = False
    for n in call.nodes:
        if n.op == "call_module":
            module = g.modules.get(n.target)
            if module is None or any(p.dim() > 1 for p in module.parameters()):
                return False
            normalises |= isinstance(module, nn.LayerNorm)
        elif n.op == "get_attr":
            value = _attr(g.gm, n.target)
            if isinstance(value, torch.Tensor) and value.dim() > 1:
                return False
        elif n.op == "call_function":
            if n.target in (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d,
                            torch.matmul):
                return False
            normalises |= n.target in _MEANS
        elif n.op == "call_method":
            normalises |= n.target in ("mean", "var", "std")
    inside = set(call.nodes)
    inputs = {a for n in call.nodes for a in n.all_input_nodes if a not in inside}
    maps = [a for a in inputs if isinstance(g.shapes_a.get(a), torch.Size) and len(g.shapes_a[a]) == g.rank + 2]
    return normalises and len(maps) == 1 and g.shapes_a.get(call.output) == g.shapes_a[maps[0]]


def _attr(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


class _Graph:
    """What stage discovery needs to know about a traced graph."""

    def __init__(self, gm: fx.GraphModule, shapes_a: dict, shapes_b: dict, size_a: tuple[int, ...],
                 size_b: tuple[int, ...]):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.input = next(n for n in self.nodes if n.op == "placeholder")
        self.output = next(n for n in self.nodes if n.op == "output")
        self.shapes_a, self.shapes_b, self.size_a, self.size_b = shapes_a, shapes_b, size_a, size_b
        self.rank = len(size_a)
        # per-axis strides (tuples) inside discovery; the public records hold the compact form
        self.strides = {n: axis_strides(shapes_a.get(n), shapes_b.get(n), size_a, size_b) for n in self.nodes}
        self.calls = CallTree(gm)
        self.modules = dict(gm.named_modules())
        self._articulation: dict[fx.Node, bool] = {}

    def everything_depends_on(self, node: fx.Node) -> bool:
        """Whether every path from the input to the output runs through ``node``."""
        if node not in self._articulation:
            self._articulation[node] = not _reaches_output_without(self.input, self.output, node)
        return self._articulation[node]

    def on_the_main_path(self, candidates: list[fx.Node]) -> list[fx.Node]:
        """The candidates that are not inside a down-up excursion.

        A map at stride s is inside one (the pooled gate of a DFC attention, the inner levels of an
        hourglass block, the coarse head branch of LR-ASPP) when every path from it to the output
        comes back to a finer stride and some path from the input to the output avoids it. The
        network's downsample ratio is the coarsest stride of the other maps (the maps it ends with,
        or the coarsest map every path runs through). When that leaves no map at stride 4 or more (a
        whole UNet: every level is bypassed by a skip and decoded back), every candidate counts as
        before (and such a network is refused as before: its contracting path has to be named).
        """
        stays: dict[tuple[int, ...], set[fx.Node]] = {}
        for stride in {self.strides[n] for n in candidates}:
            stays[stride] = self._reaches_output_at_least(stride)
        kept = [n for n in candidates if n in stays[self.strides[n]] or self.everything_depends_on(n)]
        finest_floor = min(_MIN_STRIDE, max(max(self.strides[n]) for n in candidates))
        if not kept or max(max(self.strides[n]) for n in kept) < finest_floor:
            return candidates
        return kept

    def _reaches_output_at_least(self, stride: tuple[int, ...]) -> set[fx.Node]:
        """Nodes with a path to the output whose maps are never finer than ``stride`` (non-maps pass)."""
        def finer(other: tuple[int, ...] | None) -> bool:
            return other is not None and other != stride and all(a <= b for a, b in zip(other, stride))

        seen = {self.output}
        todo = [self.output]
        while todo:
            for arg in todo.pop().all_input_nodes:
                if arg not in seen and not finer(self.strides.get(arg)):
                    seen.add(arg)
                    todo.append(arg)
        return seen

    def stage(self, node: fx.Node) -> Stage:
        return Stage(node.name, compact(self.strides[node]), self.shapes_a[node][1], self.module_of(node))

    def module_of(self, node: fx.Node) -> str | None:
        """The outermost module call returning ``node`` that spans at most two strides (one stage)."""
        own = self.strides[node]
        for call in self.calls.ending_at(node):
            # maps coarser than the call's own output are a down-up block inside it, not a stage
            spanned = {self.strides[n] for n in call.nodes if self.strides.get(n) is not None
                       and not (own is not None and all(a >= b for a, b in zip(self.strides[n], own))
                                and self.strides[n] != own)}
            if len(spanned) <= 2:
                return call.path
        return None

    def check_sizes(self, used: set[fx.Node], final: tuple[int, ...]) -> None:
        """Refuse an input size the network's deepest maps do not divide (their sizes got rounded)."""
        rough = [_rough_stride(self.shapes_a.get(n), self.shapes_b.get(n), self.size_b) for n in self.nodes
                 if n in used and self.strides.get(n) is None]  # exact maps are not rounded
        rough = [r for r in rough if r is not None and any(a > b for a, b in zip(r, final))]
        if rough:
            ratio = tuple(max(r[i] for r in rough) for i in range(self.rank))
            shown = compact(ratio)
            raise SparsifyError(
                f"input_size {Geometry.describe(self.size_a)} is not a multiple of the network's downsample "
                f"ratio {shown} (its deepest feature maps get rounded sizes); pass input_size as a multiple of "
                f"{shown}")


def discover_stages(gm: fx.GraphModule, shapes_a: dict, shapes_b: dict, size_a: tuple[int, ...],
                    size_b: tuple[int, ...], names: list[str] | None = None) -> list[tuple[fx.Node, Stage]]:
    """Pick the stage nodes, finest to coarsest. ``names`` (node or module names) overrides the choice."""
    g = _Graph(gm, shapes_a, shapes_b, size_a, size_b)
    if names is not None:
        return _named_stages(g, names)
    returned = _returned_maps(g)
    if returned is not None:
        return returned
    return _automatic_stages(g)


def _named_stages(g: _Graph, names: list[str]) -> list[tuple[fx.Node, Stage]]:
    by_name = {n.name: n for n in g.nodes}
    result = []
    for name in names:
        node = by_name.get(name)
        module = None
        if node is None:
            node, module = _module_output(g, name), name
        if g.strides[node] is None:
            shape = g.shapes_a.get(node)
            shape = tuple(shape) if isinstance(shape, torch.Size) else shape
            layout = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}.get(g.rank, "(N, C, *spatial)")
            raise SparsifyError(f"stage '{name}' is not an {layout} feature map whose size is the "
                                f"input size divided by a whole stride (shape {shape})")
        stage = g.stage(node)
        if module is not None:
            stage = Stage(stage.name, stage.stride, stage.channels, module)
        result.append((node, stage))
    def coarser(a: tuple[int, ...], b: tuple[int, ...]) -> bool:  # b downsamples a (no axis finer)
        return a != b and all(x <= y for x, y in zip(a, b))

    if any(not coarser(g.strides[a[0]], g.strides[b[0]]) for a, b in zip(result, result[1:])):
        raise SparsifyError("stages must be given finest to coarsest with strictly increasing strides, "
                            f"got {[(s.name, s.stride) for _, s in result]}")
    return result


def _module_output(g: _Graph, name: str) -> fx.Node:
    """The node a module name stands for: the output of that module's (single) call."""
    calls = g.calls.calls_of(name)
    if not calls:
        exists = name in dict(g.gm.named_modules()) or _is_module_of(g, name)
        why = ("is a module that the forward pass never calls as a whole (a ModuleList or ModuleDict is "
               "only looped over): name one of its children or a node" if exists else
               "is not a node of the traced graph nor a module name")
        raise SparsifyError(f"stage '{name}' {why}; list the node names, their module and stride with "
                            "sparsify.graph_node_names(model)")
    if len(calls) > 1:
        raise SparsifyError(f"stage '{name}': the module is called {len(calls)} times in the forward pass, so "
                            "its output is ambiguous; name the node instead (sparsify.graph_node_names(model))")
    if calls[0].output is None:
        raise SparsifyError(f"stage '{name}': the module does not return a single tensor; name the node "
                            "instead (sparsify.graph_node_names(model))")
    return calls[0].output


def _is_module_of(g: _Graph, name: str) -> bool:
    return any(call.path.startswith(name + ".") for call in g.calls.calls.values())


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _returned_maps(g: _Graph) -> list[tuple[fx.Node, Stage]] | None:
    """Stages of a model that returns a list/tuple/dict of maps: those maps, fine to coarse; else None."""
    value = g.output.args[0] if g.output.args else None
    if not isinstance(value, (list, tuple, dict)):
        return None
    maps = []
    for leaf in _leaves(value):
        if isinstance(leaf, fx.Node) and g.strides.get(leaf) is not None and leaf not in maps:
            maps.append(leaf)
    if not maps:
        raise SparsifyError("the model returns a list/tuple/dict, but none of its entries is an (N, C, *spatial) "
                            "feature map whose size is the input size divided by a whole stride; check "
                            "input_size or pass stages=[node or module names]")
    final = max((g.strides[n] for n in maps), key=stride_order)
    if max(final) < _MIN_STRIDE:
        # Full-resolution outputs (a segmentation model's logits): not a pyramid; its stages are
        # found inside, as for a model returning one map.
        return None
    g.check_sizes(_ancestors(g.output), final)
    floor = min(_MIN_STRIDE, max(final))
    last_at: dict[tuple[int, ...], fx.Node] = {}
    for node in maps:  # a stride returned twice: the later entry (deeper in the network) wins
        if max(g.strides[node]) >= floor:
            last_at[g.strides[node]] = node
    return [(last_at[s], g.stage(last_at[s])) for s in sorted(last_at, key=stride_order)]


def _automatic_stages(g: _Graph) -> list[tuple[fx.Node, Stage]]:
    needed = _ancestors(g.output)
    candidates = [n for n in g.nodes if n in needed and g.strides[n] is not None and n is not g.input]
    if not candidates:
        raise SparsifyError("no feature map whose size scales with the input was found; check input_size "
                            "(it must be a multiple of the network's total stride) or pass stages=[...]")
    g.check_sizes(needed, max((g.strides[n] for n in candidates), key=stride_order))
    candidates = g.on_the_main_path(candidates)
    final = max((g.strides[n] for n in candidates), key=stride_order)
    # From stride 4 up on the most downsampled axis (a video stem's (1, 2, 2) is no stage).
    wanted = sorted({g.strides[n] for n in candidates if max(g.strides[n]) >= min(_MIN_STRIDE, max(final))},
                    key=stride_order)
    first_at = {s: next(n for n in candidates if g.strides[n] == s) for s in wanted}
    level = _stage_level(g, [first_at[s] for s in wanted])
    result: list[tuple[fx.Node, Stage]] = []
    for i, stride in enumerate(wanted):
        limit = g.order[first_at[wanted[i + 1]]] if i + 1 < len(wanted) else len(g.nodes)
        found = _stage_end(g, level, stride, limit, needed)
        if found is None:
            found = _last_node_at(g, candidates, stride)
        if found is not None:
            result.append((found, g.stage(found)))
    if len(result) < len(wanted):  # parallel branches (HRNet): no single map at some stride
        fused = _last_fusion(g, wanted, candidates)
        if fused is not None:
            result = [(n, g.stage(n)) for n in fused]
    if not result or g.strides[result[-1][0]] != final:
        raise SparsifyError(f"could not find a single feature map at the final stride {compact(final)} that the "
                            "output depends on; pass stages=[node or module names] (see "
                            "sparsify.graph_node_names)")
    return result


_FUSION_TRIES = 6  # latest candidates tried per stride when searching the last fusion
_FUSION_CHECKS = 64  # sets of maps checked at most (each check walks the graph a few times)


def _last_fusion(g: _Graph, wanted: list[tuple[int, ...]], candidates: list[fx.Node]) -> list[fx.Node] | None:
    """One map per wanted stride from where parallel branches run side by side (HRNet), or None.

    When no single map at some stride carries everything (each branch keeps its own resolution and
    the fusions exchange between them), the stages are the latest maps, one per stride, that
    together carry everything: every path from the input to the output runs through one of them,
    and through none of the others alone. Each is the output of a module call that runs at that
    stride only (a branch's block, HRNet's per-branch head block): later maps mix strides (the head's
    downsampling chain), and a map every path runs through would make the others unnecessary.
    """
    single: dict[tuple[int, ...], list[fx.Node]] = {s: [] for s in wanted}
    keep = set(candidates)

    def one_stride(call: Call) -> bool:
        if call.output is None or g.strides.get(call.output) is None:
            return False
        stride, inside = g.strides[call.output], set(call.nodes)
        inputs = {a for n in call.nodes for a in n.all_input_nodes if a not in inside}
        return (all(g.strides.get(n) in (None, stride) for n in call.nodes)
                and all(g.strides.get(a) in (None, stride) for a in inputs))

    for call in g.calls.calls.values():
        out = call.output
        if out is None or out not in keep or g.strides[out] not in single or g.everything_depends_on(out):
            continue
        # the outermost call that runs at one stride: not a layer inside a branch's block, nor the
        # last layer of a call that downsamples (its output is that call's)
        stack = g.calls.keys[call.nodes[0]]
        parent = stack[stack.index(call.key) - 1] if stack.index(call.key) > 0 else None
        if parent is not None and one_stride(g.calls.calls[parent]):
            continue
        if parent is not None and not set(out.users) - set(g.calls.calls[parent].nodes):
            continue  # a layer inside a call that downsamples (the norm after its strided conv)
        if not one_stride(call) or not any(_is_conv_node(n, g) for n in call.nodes):
            continue  # a norm or activation alone may be the tail of a downsampling conv
        if any(not one_stride(c) for c in g.calls.ending_at(out)):
            continue
        if out not in single[g.strides[out]]:
            single[g.strides[out]].append(out)
    tries = {s: sorted(nodes, key=g.order.get, reverse=True)[:_FUSION_TRIES] for s, nodes in single.items()}
    if any(not nodes for nodes in tries.values()):
        return None
    order = sorted(wanted, key=stride_order, reverse=True)  # the coarsest first: the latest maps
    budget = [_FUSION_CHECKS]

    def search(i: int, chosen: list[fx.Node]) -> list[fx.Node] | None:
        if i == len(order):
            budget[0] -= 1
            return chosen if _is_minimal_cut(g, set(chosen)) else None
        if budget[0] <= 0:
            return None
        for node in tries[order[i]]:
            found = search(i + 1, chosen + [node])
            if found is not None:
                return found
        return None

    found = search(0, [])
    return sorted(found, key=lambda n: stride_order(g.strides[n])) if found is not None else None


def _is_conv_node(node: fx.Node, g: _Graph) -> bool:
    if node.op == "call_module":
        return isinstance(g.modules.get(node.target), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d)


def _is_cut(g: _Graph, nodes: set[fx.Node]) -> bool:
    """Whether every path from the input to the output runs through one of ``nodes``."""
    seen, todo = set(nodes), [g.input]
    while todo:
        for user in todo.pop().users:
            if user is g.output:
                return False
            if user not in seen and not _reads_metadata(user):
                seen.add(user)
                todo.append(user)
    return True


def _is_minimal_cut(g: _Graph, nodes: set[fx.Node]) -> bool:
    return _is_cut(g, nodes) and not any(_is_cut(g, nodes - {n}) for n in nodes)


def _stage_level(g: _Graph, transitions: list[fx.Node]) -> tuple[str, ...]:
    """The innermost module call holding every downsampling into the pyramid's coarser strides.

    The first stride is left out when there are enough others: a stem is often outside the body
    (timm ConvNeXt's ``stem`` before ``stages``).
    """
    picked = transitions[1:] if len(transitions) >= 3 else transitions
    if len(picked) < 2:
        return ()
    stacks = [g.calls.keys[n] for n in picked]
    level: list[str] = []
    for keys in zip(*stacks):
        if any(k != keys[0] for k in keys):
            break
        level.append(keys[0])
    return tuple(level)


def _stage_end(g: _Graph, level: tuple[str, ...], stride: tuple[int, ...], limit: int, needed: set[fx.Node]
               ) -> fx.Node | None:
    """The last step at ``level`` (or, failing that, further out) that ends a stage at ``stride``."""
    while True:
        steps = [(call, out) for call, out in g.calls.items(level, g.nodes)
                 if out in needed and g.strides.get(out) == stride and g.order[out] < limit
                 and g.everything_depends_on(out)]
        while len(steps) > 1 and steps[-1][0] is not None and _is_norm_call(steps[-1][0], g):
            steps.pop()
        if steps:
            out = steps[-1][1]
            back = _before_norm_tail(g, out, stride) if steps[-1][0] is None else None
            return back if back is not None and g.everything_depends_on(back) else out
        if not level:
            return None
        level = level[:-1]


def _last_node_at(g: _Graph, candidates: list[fx.Node], stride: tuple[int, ...]) -> fx.Node | None:
    """The fallback: the last node at ``stride`` that the output depends on, before a trailing LayerNorm."""
    at_stride = [n for n in candidates if g.strides[n] == stride]
    found = next((n for n in reversed(at_stride) if g.everything_depends_on(n)), None)
    back = _before_norm_tail(g, found, stride) if found is not None else None
    return back if back is not None else found


class GraphNode(NamedTuple):
    """One node of a traced model, as listed by :func:`sparsify.graph_node_names`."""

    name: str
    """graph node name (what ``stages=[...]`` accepts, besides module names)"""
    stride: int | tuple[int, ...] | None
    """input size / map size for an (N, C, *spatial) map that scales with the input (an int when every
    axis agrees, else one per axis), else None"""
    shape: tuple[int, ...] | None
    """output shape at the example input size"""
    module: str | None
    """path of the innermost module call the node belongs to (None at the top level)"""
    stage: int | None
    """index in the pyramid ``stages="auto"`` would choose (0 = finest), or None"""


def describe_nodes(gm: fx.GraphModule, shapes_a: dict, shapes_b: dict, size_a: tuple[int, ...],
                   size_b: tuple[int, ...]) -> list[GraphNode]:
    """Every node of ``gm`` with its stride, shape, module and, for the automatic stage ends, its index.

    When automatic discovery fails (a hybrid model, no map at the final stride), no node is marked.
    """
    try:
        chosen = {node: i for i, (node, _) in enumerate(discover_stages(gm, shapes_a, shapes_b, size_a, size_b))}
    except SparsifyError:
        chosen = {}
    calls = CallTree(gm)
    rows = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        shape = shapes_a.get(node)
        keys = calls.keys.get(node, ())
        rows.append(GraphNode(node.name, node_stride(shape, shapes_b.get(node), size_a, size_b),
                              tuple(shape) if isinstance(shape, torch.Size) else None,
                              calls.calls[keys[-1]].path if keys else None, chosen.get(node)))
    return rows

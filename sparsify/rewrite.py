"""Step 3 of the pipeline: emit the mask-aware graph.

The new graph takes ``(x, mask)``. It zeroes masked input pixels, derives the mask at each resolution
once (on first use), calls the adapters the analysis chose and multiplies by the mask exactly where
the analysis asked for it. Modules are referenced by their original paths, so the result shares the
user's Module, Parameter and buffer objects under the original state_dict names.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsify.adapters._flat import FlatInfo, flat_mask_like
from sparsify.adapters._stats import apply_mask

from .analyse import Analysis

__all__ = ["build_sparse_graph", "build_dense_graph", "mask_like", "sample_mask_like", "apply_mask"]


_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _resize(m: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """The (B, 1, *grid) 0/1 mask at ``sizes``: each patch repeated on finer maps (nearest neighbour);
    on a map coarser than the patch (a patch finer than the downsample ratio) a cell is active when
    any of its patches is visible (max pooling), so a cell is absent only where all it covers is."""
    grid = tuple(m.shape[2:])
    kernel = tuple(g // s if s < g else 1 for g, s in zip(grid, sizes))
    if any(k > 1 for k in kernel):
        m = _MAX_POOLS[len(grid)](m, kernel)
    if tuple(m.shape[2:]) != tuple(sizes):
        m = F.interpolate(m, size=tuple(sizes), mode="nearest")
    return m


def mask_like(mask: torch.Tensor | None, ref: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor | None:
    """The patch mask at ``ref``'s resolution and layout, as 0/1 floats (None stays None).

    ``mask`` is (B, 1, *grid); the result has ``ref``'s rank, with the spatial sizes at ``spatial``
    (the positions of the spatial axes, in grid order) and 1 everywhere else but the batch dim, so it
    broadcasts against ``ref``.
    """
    if mask is None:
        return None
    sizes = tuple(ref.shape[d] for d in spatial)
    m = mask.to(torch.float32)
    if tuple(m.shape[2:]) != sizes:
        m = _resize(m, sizes)
    if spatial == tuple(range(2, 2 + len(spatial))) and ref.dim() == 2 + len(spatial):
        return m
    order = sorted(range(len(spatial)), key=lambda i: spatial[i])  # grid axes in ref's dim order
    if order != list(range(len(spatial))):
        m = m.permute(0, 1, *(2 + i for i in order))
    shape = [1] * ref.dim()
    shape[0] = m.shape[0]
    for d, size in zip(spatial, sizes):
        shape[d] = size
    return m.reshape(shape)


def sample_mask_like(mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """Per-sample 0/1 weights shaped (B, 1, ..., 1) like ``ref``: 1 where the sample has any active
    site. Batch statistics over pooled vectors use it to leave fully masked samples out."""
    if mask is None:
        return None
    seen = mask.flatten(1).any(1).to(torch.float32)
    return seen.view([mask.shape[0]] + [1] * (ref.dim() - 1))


def _cut(gm: fx.GraphModule, outputs: list[fx.Node]) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    keep: set[fx.Node] = set()
    todo = list(outputs)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in keep or node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return graph, env


def build_dense_graph(gm: fx.GraphModule, outputs: list[fx.Node]) -> fx.Graph:
    """The original graph cut at the stage nodes, returning them as a list: the dense reference."""
    graph, env = _cut(gm, outputs)
    graph.output([env[n] for n in outputs])
    graph.lint()
    return graph


def cut_graph_module(gm: fx.GraphModule, outputs: list[str]) -> fx.GraphModule:
    by_name = {n.name: n for n in gm.graph.nodes}
    return fx.GraphModule(gm, build_dense_graph(gm, [by_name[n] for n in outputs]), "cut")


def build_sparse_graph(gm: fx.GraphModule, analysis: Analysis, outputs: list[fx.Node], shapes_a: dict,
                       shapes_b: dict) -> fx.Graph:
    """The mask-aware graph ``(x, mask=None) -> [features]`` for an analysed, cut graph module."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    mask_nodes: dict[tuple, fx.Node] = {}
    infos = analysis.infos
    x_in = graph.placeholder(analysis.input_node.name)
    mask_in = graph.placeholder("mask", default_value=None)

    def mask_for(node: fx.Node, new_node: fx.Node) -> fx.Node:
        info = infos[node]
        if isinstance(info, FlatInfo):  # sites flattened into one axis: the source map's mask, flattened
            src = info.source
            key = ("flat", tuple(shape[d] for shape in (shapes_a[src], shapes_b[src]) for d in info.src_spatial),
                   info.src_spatial, info.dim, info.lead, len(shapes_a[node]))
            if key not in mask_nodes:
                mask_nodes[key] = graph.call_function(flat_mask_like, (mask_in, env[src], info.src_spatial,
                                                                       new_node, info.dim, info.lead))
            return mask_nodes[key]
        # Maps with the same sizes at both example sizes have the same size at every size.
        sizes = tuple(shape[d] for shape in (shapes_a[node], shapes_b[node]) for d in info.spatial)
        key = (sizes, info.spatial, len(shapes_a[node]))  # the mask's rank is the map's
        if key not in mask_nodes:
            mask_nodes[key] = graph.call_function(mask_like, (mask_in, new_node, info.spatial))
        return mask_nodes[key]

    first = mask_for(analysis.input_node, x_in)
    env[analysis.input_node] = graph.call_function(apply_mask, (x_in, first))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        decision = analysis.decisions.get(node)
        if decision is not None and decision.masked is not None:
            if decision.sample_mask:
                key = ("sample", len(shapes_a[decision.mask_of]))
                if key not in mask_nodes:
                    mask_nodes[key] = graph.call_function(sample_mask_like, (mask_in, env[decision.mask_of]))
                m = mask_nodes[key]
            else:
                m = mask_for(decision.mask_of, env[decision.mask_of])
            if node.op == "call_module":
                if len(node.args) != 1 or node.kwargs:
                    raise NotImplementedError(f"adapter for module call with extra arguments ({node.name})")
                module = graph.create_node("get_attr", node.target, name=f"{node.name}_module")
                new = graph.create_node("call_function", decision.masked,
                                        (module, env[node.args[0]], m), name=node.name)
            else:
                args = fx.map_arg(node.args, lambda n: env[n])
                kwargs = fx.map_arg(node.kwargs, lambda n: env[n])
                new = graph.create_node("call_function", decision.masked, (m, *args), kwargs,
                                        name=node.name)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        if node in analysis.to_mask:
            new = graph.call_function(apply_mask, (new, mask_for(node, new)))
        env[node] = new
    graph.output([env[n] for n in outputs])
    graph.lint()
    return graph

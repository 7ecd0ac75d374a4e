"""Step 4 of the pipeline: find the feature pyramid (design.md section 6).

A node's stride is input size / its spatial size, read from shapes recorded at two input sizes (a map
counts only if its size scales exactly with the input, so a valid 7x7 convolution in a classifier
head is not mistaken for a stride-224 stage). For each distinct stride from 4 up to the final one,
the stage is the last node at that stride that every path from the input to the output runs
through; LayerNorm-and-permute tails are stepped over, so a ConvNeXt stage ends before the next
downsampling layer's norm. Users can name stage nodes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import SparsifyError

__all__ = ["Stage", "discover_stages", "node_stride"]


@dataclass(frozen=True)
class Stage:
    """One level of the feature pyramid: graph node name, stride w.r.t. the input, channels."""

    name: str
    stride: int
    channels: int


def node_stride(shape_a: Any, shape_b: Any, size_a: tuple[int, int], size_b: tuple[int, int]) -> int | None:
    """The stride of an (N, C, H, W) map whose size scales exactly with the input, else None."""
    if not isinstance(shape_a, torch.Size) or len(shape_a) != 4 or not isinstance(shape_b, torch.Size):
        return None
    if shape_a[1] != shape_b[1] or shape_a[0] != shape_b[0]:
        return None
    strides = set()
    for dim, big_a, big_b in ((2, size_a[0], size_b[0]), (3, size_a[1], size_b[1])):
        small_a, small_b = shape_a[dim], shape_b[dim]
        if small_a == 0 or big_a % small_a or big_b % small_b or big_a // small_a != big_b // small_b:
            return None
        strides.add(big_a // small_a)
    return strides.pop() if len(strides) == 1 else None


def _rough_stride(shape_a: Any, shape_b: Any, size_b: tuple[int, int]) -> int | None:
    """Stride of a map whose size is only roughly input / stride (rounded: the input did not divide)."""
    if not isinstance(shape_a, torch.Size) or len(shape_a) != 4 or not isinstance(shape_b, torch.Size):
        return None
    if shape_a[:2] != shape_b[:2] or 0 in shape_a[2:]:
        return None
    if any(abs(shape_b[d] - 2 * shape_a[d]) > 1 or shape_b[d] <= shape_a[d] for d in (2, 3)):
        return None
    rough = {round(size_b[0] / shape_b[2]), round(size_b[1] / shape_b[3])}
    return rough.pop() if len(rough) == 1 else None


def _reaches_output_without(graph: fx.Graph, start: fx.Node, output: fx.Node, skip: fx.Node) -> bool:
    seen = {skip}
    todo = [start]
    while todo:
        node = todo.pop()
        if node is output:
            return True
        for user in node.users:
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


_NORM_TAIL_METHODS = {"permute", "contiguous"}


def _is_norm_tail(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method" and node.target in _NORM_TAIL_METHODS:
        return True
    if node.op == "call_function" and node.target in (torch.permute, F.layer_norm):
        return True
    return node.op == "call_module" and type(modules.get(node.target)) is nn.LayerNorm


def discover_stages(gm: fx.GraphModule, shapes_a: dict, shapes_b: dict, size_a: tuple[int, int],
                    size_b: tuple[int, int], names: list[str] | None = None) -> list[tuple[fx.Node, Stage]]:
    """Pick the stage nodes, finest to coarsest. ``names`` overrides the automatic choice."""
    graph = gm.graph
    nodes = list(graph.nodes)
    by_name = {n.name: n for n in nodes}
    input_node = next(n for n in nodes if n.op == "placeholder")
    output = next(n for n in nodes if n.op == "output")
    strides = {n: node_stride(shapes_a.get(n), shapes_b.get(n), size_a, size_b) for n in nodes}

    if names is not None:
        chosen = []
        for name in names:
            node = by_name.get(name)
            if node is None:
                raise SparsifyError(f"stage '{name}' is not a node of the traced graph; list the names "
                                    "with sparsify.graph_node_names(model)")
            if strides[node] is None:
                raise SparsifyError(f"stage '{name}' is not an (N, C, H, W) feature map whose size is the "
                                    f"input size divided by a whole stride (shape {tuple(shapes_a[node])})")
            chosen.append(node)
        result = [(n, Stage(n.name, strides[n], shapes_a[n][1])) for n in chosen]
        if any(b[1].stride <= a[1].stride for a, b in zip(result, result[1:])):
            raise SparsifyError("stages must be given finest to coarsest with strictly increasing strides, "
                                f"got {[(s.name, s.stride) for _, s in result]}")
        return result

    needed = _ancestors(output)
    candidates = [n for n in nodes if n in needed and strides[n] is not None and n is not input_node]
    if not candidates:
        raise SparsifyError("no feature map whose size scales with the input was found; check input_size "
                            "(it must be a multiple of the network's total stride) or pass stages=[...]")
    final = max(strides[n] for n in candidates)
    coarser = [_rough_stride(shapes_a.get(n), shapes_b.get(n), size_b) for n in nodes if n in needed]
    coarser = [r for r in coarser if r is not None and r > final]
    if coarser:
        ratio = max(coarser)
        raise SparsifyError(f"input_size {size_a[0]}x{size_a[1]} is not a multiple of the network's downsample "
                            f"ratio {ratio} (its deepest feature maps get rounded sizes); pass input_size as a "
                            f"multiple of {ratio}")
    wanted = sorted({strides[n] for n in candidates if strides[n] >= min(4, final)})
    modules = dict(gm.named_modules())
    result: list[tuple[fx.Node, Stage]] = []
    for stride in wanted:
        at_stride = [n for n in candidates if strides[n] == stride]
        found = None
        for node in reversed(at_stride):
            if not _reaches_output_without(graph, input_node, output, node):
                found = node
                break
        if found is None:
            continue
        # Step back over a trailing LayerNorm (and its permutes) to the stage's own output.
        back = found
        while _is_norm_tail(back, modules) and len(back.all_input_nodes) >= 1:
            back = back.all_input_nodes[0]
            if strides.get(back) == stride:
                found = back
                break
        result.append((found, Stage(found.name, stride, shapes_a[found][1])))
    if not result or result[-1][1].stride != final:
        raise SparsifyError(f"could not find a single feature map at the final stride {final} that the "
                            "output depends on; pass stages=[node names] (see sparsify.graph_node_names)")
    return result

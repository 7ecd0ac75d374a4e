"""Training-only branches (auxiliary heads): cut away before the train and eval graphs are compared.

A model that computes an auxiliary head only under ``if self.training:`` traces to different graphs
in train and eval mode. That is harmless when the train graph is the eval graph plus branches that
nothing of the eval computation reads, and train mode still returns what eval mode returns: the
encoder is built from the eval graph, and its stages never see the extra branch.
:func:`cut_training_branches` returns the train graph cut down to the eval graph's computation, with
the eval graph's node names, so the usual node-by-node comparison (which also makes ``self.training``
arguments live, :mod:`sparsify.modes`) runs on it.

Nodes are matched by structure (op, target, constant arguments and, recursively, their inputs), not
by name, since extra nodes shift fx's numbering of later ones. Bool constants are left out of the
match: a ``training=self.training`` argument differs between the modes by design and is checked by
the comparison that follows.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["cut_training_branches"]


def _structural_keys(graph: fx.Graph) -> dict[fx.Node, Any]:
    keys: dict[fx.Node, Any] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return ("node", keys[value])
        if isinstance(value, bool):
            return ("bool",)
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(encode(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple(sorted((k, encode(v)) for k, v in value.items())))
        if isinstance(value, slice):
            return ("slice", encode(value.start), encode(value.stop), encode(value.step))
        return ("const", repr(value))

    for node in graph.nodes:
        target = node.target if isinstance(node.target, str) else id(node.target)
        keys[node] = hash((node.op, target, encode(node.args), encode(node.kwargs)))
    return keys


def _returned(graph: fx.Graph, keys: dict[fx.Node, Any]) -> set[Any]:
    """Keys of the values the graph returns, looking inside returned containers built in the graph
    (torchvision's ``GoogLeNetOutputs(logits, aux2, aux1)`` is a namedtuple call)."""
    output = next(n for n in graph.nodes if n.op == "output")
    found: set[Any] = set()

    def visit(node: fx.Node) -> None:
        if node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, tuple):
            fx.map_arg((node.args, node.kwargs), visit)
        else:
            found.add(keys[node])

    fx.map_arg(output.args, visit)
    return found


def cut_training_branches(train_gm: fx.GraphModule, eval_gm: fx.GraphModule) -> fx.GraphModule | None:
    """The train graph without its training-only branches, named like the eval graph; None when the
    train graph is not the eval graph plus such branches (then the graphs really differ)."""
    train_keys = _structural_keys(train_gm.graph)
    eval_keys = _structural_keys(eval_gm.graph)
    by_key: dict[Any, fx.Node] = {}
    for node, key in train_keys.items():
        if node.op != "output":
            by_key.setdefault(key, node)
    if any(key not in by_key for node, key in eval_keys.items() if node.op != "output"):
        return None
    if not _returned(eval_gm.graph, eval_keys) <= _returned(train_gm.graph, train_keys):
        return None  # train mode returns something else in place of an eval output
    graph = fx.Graph()
    copies: dict[Any, fx.Node] = {}
    for node in eval_gm.graph.nodes:
        key = eval_keys[node]
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda n: copies[eval_keys[n]]))
            continue
        twin = by_key[key]
        copy = graph.node_copy(twin, lambda n: copies[train_keys[n]])
        copy.name = node.name
        copies[key] = copy
    graph.lint()
    return fx.GraphModule(train_gm, graph, type(train_gm).__name__)

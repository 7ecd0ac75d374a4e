"""Training-only branches (auxiliary heads): allowed when they feed nothing the network computes in
eval mode.

A model that computes an auxiliary head only under ``if self.training:`` traces to different graphs
in train and eval mode. That is harmless when the train graph is the eval graph plus branches that
nothing of the eval computation reads: the encoder is built from the eval graph, and its stages never
see the extra branch. Nodes are compared by structure (op, target, constant arguments and, recursively,
their inputs), not by name, since extra nodes shift fx's numbering of later ones.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["only_training_branches"]


def _structural_keys(graph: fx.Graph) -> dict[fx.Node, Any]:
    keys: dict[fx.Node, Any] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return ("node", keys[value])
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


def only_training_branches(train_gm: fx.GraphModule, eval_gm: fx.GraphModule) -> bool:
    """True when every computation of the eval graph appears unchanged in the train graph, so the
    train graph only adds branches (auxiliary heads) that the eval computation does not read."""
    train_by_node = _structural_keys(train_gm.graph)
    eval_by_node = _structural_keys(eval_gm.graph)
    train_keys = set(train_by_node.values())
    if not all(key in train_keys for node, key in eval_by_node.items() if node.op != "output"):
        return False
    # and train mode still returns what eval mode returns (it may return more: the aux outputs)
    return _returned(eval_gm.graph, eval_by_node) <= _returned(train_gm.graph, train_by_node)


def _returned(graph: fx.Graph, keys: dict[fx.Node, Any]) -> set[Any]:
    output = next(n for n in graph.nodes if n.op == "output")
    found: set[Any] = set()
    fx.map_arg(output.args, lambda n: found.add(keys[n]))
    return found

"""The module-call hierarchy of a traced graph: which module call each node belongs to, and what it returns.

torch.fx records, for every node, the stack of module *calls* it was traced inside
(``node.meta["nn_module_stack"]``, outermost first; a repeated call of one module gets its own key).
Containers that are never called as a whole (a ``ModuleList`` looped over in ``forward``) do not
appear, so the hierarchy is the one the forward pass actually runs. Stage discovery reads it to find
where stages end; nothing here depends on a model family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

__all__ = ["Call", "CallTree", "call_keys"]


def call_keys(node: fx.Node) -> tuple[str, ...]:
    """Keys of the module calls enclosing ``node``, outermost first (a leaf module call includes itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    keys = tuple(stack)
    if node.op == "call_module" and (not keys or _path(stack[keys[-1]]) != node.target):
        keys += (str(node.target),)  # some tracers leave the leaf itself out of its own stack
    return keys


def _path(entry: object) -> str:
    return entry[0] if isinstance(entry, tuple) else str(entry)


@dataclass
class Call:
    """One call of a module in the forward pass."""

    key: str
    path: str
    type: type | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    #: the single node this call returns (used outside it); None if it returns several or nothing
    output: fx.Node | None = None

    def _find_output(self) -> None:
        inside = set(self.nodes)
        leaving = [n for n in self.nodes if any(u not in inside for u in n.users)]
        self.output = leaving[0] if len(leaving) == 1 else None


class CallTree:
    """Module calls of a graph: their nodes, outputs and nesting."""

    def __init__(self, gm: fx.GraphModule):
        self.keys: dict[fx.Node, tuple[str, ...]] = {}
        self.calls: dict[str, Call] = {}
        for node in gm.graph.nodes:
            keys = call_keys(node) if node.op not in ("placeholder", "output", "get_attr") else ()
            self.keys[node] = keys
            stack = node.meta.get("nn_module_stack") or {}
            for key in keys:
                call = self.calls.get(key)
                if call is None:
                    entry = stack.get(key)
                    kind = entry[1] if isinstance(entry, tuple) and isinstance(entry[1], type) else None
                    if kind is None and node.op == "call_module" and key == node.target:
                        kind = type(gm.get_submodule(key))
                    call = self.calls[key] = Call(key, _path(entry) if entry is not None else key, kind)
                call.nodes.append(node)
        for call in self.calls.values():
            call._find_output()

    def calls_of(self, path: str) -> list[Call]:
        """Every call of the module at ``path`` (named as in ``named_modules()``)."""
        return [c for c in self.calls.values() if c.path == path]

    def items(self, level: tuple[str, ...], nodes: list[fx.Node]) -> list[tuple[Call | None, fx.Node]]:
        """The steps of the forward pass directly inside the call ``level`` (() = the model itself).

        Each step is a child module call (with its single output node) or a node computed directly at
        that level (a residual ``add`` written in the parent's forward), in graph order. Child calls
        returning several tensors are left out.
        """
        steps: list[tuple[Call | None, fx.Node]] = []
        seen: set[str] = set()
        depth = len(level)
        for node in nodes:
            keys = self.keys.get(node, ())
            if keys[:depth] != level or node.op in ("placeholder", "output", "get_attr"):
                continue
            if len(keys) == depth:
                steps.append((None, node))
                continue
            key = keys[depth]
            if key in seen:
                continue
            seen.add(key)
            output = self.calls[key].output
            if output is not None:
                steps.append((self.calls[key], output))
        return steps

    def ending_at(self, node: fx.Node) -> list[Call]:
        """The calls whose output is ``node``, outermost first."""
        return [self.calls[k] for k in self.keys.get(node, ()) if self.calls[k].output is node]

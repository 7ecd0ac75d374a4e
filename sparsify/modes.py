"""Values frozen at trace time: make ``self.training`` passed as an argument follow the mode live.

torch.fx records Python values as constants, so ``F.dropout(x, p, training=self.training)`` or
``F.batch_norm(..., self.training, ...)`` would keep the mode the model was traced in. sparsify
traces in train and in eval mode; :func:`live_mode_flags` compares the two graphs node by node,
arguments included. Where the only difference is a bool that is True in train and False in eval
mode, the eval graph gets a live read of the owning module's ``training`` flag instead (the module
whose forward made the call, from fx's ``nn_module_stack``). Any other difference is refused with the
node and module named: the encoder would otherwise run one mode's semantics in both.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SparsifyError
from .trace import owner_path

__all__ = ["live_mode_flags"]


def _differences(a: Any, b: Any, path: tuple = ()) -> list[tuple[tuple, Any, Any]]:
    """Where (a key path into args / kwargs) two fx argument structures differ, with both values."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        same = isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
        return [] if same else [(path, a, b)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, (*path, i))]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a for d in _differences(a[k], b[k], (*path, k))]
    if isinstance(a, slice) and isinstance(b, slice):  # x[:, :h] with h a node: compare by node name too
        inner = _differences((a.start, a.stop, a.step), (b.start, b.stop, b.step), path)
        return [(path, a, b)] if inner else []
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
        return [] if same else [(path, a, b)]
    if type(a) is not type(b) or a != b:
        return [(path, a, b)]
    return []


def _replace(value: Any, path: tuple, new: Any) -> Any:
    """``value`` with the item at key ``path`` replaced by ``new`` (tuples and dicts rebuilt)."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, key: _replace(value[key], rest, new)}
    items = list(value)
    items[key] = _replace(items[key], rest, new)
    return items if isinstance(value, list) else type(value)(items)


def _install(gm: fx.GraphModule, model: nn.Module, path: str) -> None:
    """Make ``path`` resolve to the model's own module in ``gm`` (fx copies only what the graph uses)."""
    try:
        gm.get_submodule(path)
        return
    except AttributeError:
        pass
    parent: nn.Module = gm
    *prefix, last = path.split(".")
    for atom in prefix:
        child = parent._modules.get(atom)
        if child is None:
            child = nn.Module()
            parent.add_module(atom, child)
        parent = child
    parent.add_module(last, model.get_submodule(path))


def _flag_node(graph: fx.Graph, before: fx.Node, path: str, cache: dict[str, fx.Node]) -> fx.Node:
    """A node reading ``<module at path>.training`` at run time ('' is the root model)."""
    if path not in cache:
        with graph.inserting_before(before):
            if path:
                module = graph.get_attr(path)
                cache[path] = graph.call_function(getattr, (module, "training"))
            else:
                # The root's flag: the encoder mirrors its own mode onto the object its forward runs on.
                with warnings.catch_warnings():  # fx warns: a bool is not a module, parameter or buffer
                    warnings.simplefilter("ignore")
                    cache[path] = graph.get_attr("training")
    return cache[path]


def live_mode_flags(train_gm: fx.GraphModule, eval_gm: fx.GraphModule, model_name: str,
                    model: nn.Module | None = None) -> list[str]:
    """Replace, in ``eval_gm``, mode-valued bool arguments by live reads of the owner's flag.

    The two graphs must have the same nodes (same ops, targets and names). Returns a description of
    every argument made live. Raises SparsifyError for any other argument that differs.
    """
    train_nodes = {n.name: n for n in train_gm.graph.nodes}
    problems: list[str] = []
    changes: list[tuple[fx.Node, str, list[tuple]]] = []
    for node in eval_gm.graph.nodes:
        twin = train_nodes[node.name]
        diffs = _differences(twin.args, node.args, ("args",)) + _differences(twin.kwargs, node.kwargs, ("kwargs",))
        if not diffs:
            continue
        owner = owner_path(node)
        where = f"node '{node.name}' ({_describe(node)}) in module '{owner or '<top level>'}'"
        flags = []
        for position, in_train, in_eval in diffs:
            if in_train is True and in_eval is False:
                flags.append(position)
            else:
                problems.append(f"  - {where}: argument {_readable(position)} is {in_train!r} in train mode "
                                f"and {in_eval!r} in eval mode")
        if flags:
            changes.append((node, owner, flags))
    if problems:
        raise SparsifyError(
            f"{model_name} passes values that depend on the train/eval mode, which tracing would freeze:\n"
            + "\n".join(problems)
            + "\nOnly the module's own flag (self.training, or an expression equal to it) can follow the mode "
            "at run time. Compute the value inside a module kept whole (leaf_modules=[...], with an adapter if "
            "it touches space) or make it independent of the mode.")
    graph = eval_gm.graph
    cache: dict[str, fx.Node] = {}
    made: list[str] = []
    for node, owner, flags in changes:
        if owner and model is not None:
            _install(eval_gm, model, owner)
        flag = _flag_node(graph, node, owner, cache)
        args, kwargs = node.args, dict(node.kwargs)
        for head, *keys in flags:
            if head == "args":
                args = _replace(args, tuple(keys), flag)
            else:
                kwargs = _replace(kwargs, tuple(keys), flag)
            made.append(f"{node.name} {_readable((head, *keys))} <- {owner or '<root>'}.training")
        node.args, node.kwargs = tuple(args), kwargs
    if made:
        eval_gm.recompile()
    return made


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return f"{node.op} {name}"


def _readable(position: tuple) -> str:
    """``("kwargs", "training")`` -> ``'training'``; ``("args", 5)`` -> ``#5``; nested keys follow."""
    head, *keys = position
    if not keys:
        return head
    first = repr(keys[0]) if head == "kwargs" else f"#{keys[0]}"
    return first + "".join(f"[{k!r}]" for k in keys[1:])

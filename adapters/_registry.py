"""The adapter registry: how every graph operation is treated by the sparse rewrite.

Each entry is a *rule*: a function that looks at one fx node (its inputs' mask state and layout, its
example shapes) and returns a :class:`Decision`: what the output looks like, which inputs must be
exactly zero at masked sites, and optionally a mask-aware replacement to call instead.

Rules are keyed by exact module type, by function object, or by tensor method
name. Module types with a rule are fx leaves, so the rewrite sees them whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = [
    "Info",
    "Decision",
    "NodeView",
    "Unsupported",
    "Rule",
    "register_rule",
    "find_rule",
    "registered_rule",
    "module_rule_types",
    "function_rule_targets",
    "NONSPATIAL",
    "POOLED",
]


@dataclass(frozen=True)
class Info:
    """What the analysis knows about one tensor value.

    spatial: positions of the spatial dims ((H, W) for images, (D, H, W) for volumes, (L,) for
        signals, in that order), or None when the tensor has no per-site values (weights,
        pooled vectors, broadcast constants).
    zero: exactly 0 at masked sites (only meaningful when spatial).
    nonneg: known >= 0 everywhere (lets max pooling skip its masked fill).
    aligned: the tensor's grid lines up with the patch grid, so its mask is the patch mask resized
        by nearest neighbour. Padded or oddly-sized maps are not aligned.
    varies: for a tensor without per-site values, the shape its values actually vary over, when that
        differs from its own shape: a pooled vector expanded to a map's shape still varies over
        (B, C, 1, 1); ``()`` for values that come from no position at all (fresh or random tensors).
        None means its own shape. A non-spatial tensor that varies along a feature map's spatial dims
        is a fixed map (coordinates, a positional bias), which sparse semantics cannot honour.
    padded: the output of an explicit zero pad (its grid is shifted): a pool right after it treats
        masked sites as the zeros the pad put around the border.
    per_sample: a tensor without per-site values computed per sample from the active sites (a
        pooled vector and what is computed from it): batch statistics over it must leave out the
        samples that have no active site.
    """

    spatial: tuple[int, ...] | None
    zero: bool = False
    nonneg: bool = False
    aligned: bool = True
    varies: tuple[int, ...] | None = None
    per_sample: bool = False
    padded: bool = False

    def but(self, **changes: Any) -> Info:
        return replace(self, **changes)


NONSPATIAL = Info(spatial=None)
#: A pooled vector: computed per sample from the active sites (global pooling, reductions over space).
POOLED = Info(spatial=None, per_sample=True)


class Unsupported(Exception):
    """Raised by a rule when a node touches spatial dims in a way no adapter covers."""


@dataclass
class Decision:
    """A rule's verdict on one node.

    out: Info of the output (a tuple of Info for tuple outputs, None for non-tensors).
    require_zero: input nodes that must be exactly zero at masked sites before this node runs.
    masked: replacement implementation, or None to keep the original op. For module rules it is
        called as ``masked(module, x, mask)``; for function/method rules as
        ``masked(mask, *args, **kwargs)``. ``mask`` is a 0/1 tensor broadcastable to the input
        named by ``mask_of`` (in its layout and resolution), or None when nothing is masked.
    mask_of: the input whose mask the replacement needs.
    sample_mask: pass a per-sample mask instead, shaped like ``mask_of`` with 1 everywhere but the
        batch dim: 1 for a sample with at least one active site, 0 for a fully masked one (batch
        statistics over pooled vectors).
    """

    out: Any
    require_zero: list[fx.Node] = field(default_factory=list)
    masked: Callable[..., Any] | None = None
    mask_of: fx.Node | None = None
    sample_mask: bool = False


class NodeView:
    """What a rule may look at: the node, its module, its inputs' Info and example shapes."""

    def __init__(self, node: fx.Node, module: nn.Module | None, infos: dict[fx.Node, Any],
                 shapes: dict[fx.Node, Any]):
        self.node = node
        self.module = module
        self._infos = infos
        self._shapes = shapes

    @property
    def args(self) -> tuple:
        return self.node.args

    @property
    def kwargs(self) -> dict:
        return self.node.kwargs

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument lookup (fx keeps whatever form the code used)."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def info(self, value: Any) -> Info | None:
        if isinstance(value, fx.Node):
            return self._infos.get(value)
        return None

    def shape(self, value: Any = None) -> Any:
        """Example shape of ``value`` (a Node), or of this node's output when omitted."""
        node = self.node if value is None else value
        return self._shapes.get(node) if isinstance(node, fx.Node) else None

    def tensor_inputs(self) -> list[fx.Node]:
        """Input nodes (positional and keyword, flattened) whose value is a tensor."""
        found: list[fx.Node] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                if isinstance(self._infos.get(a), Info):
                    found.append(a)
            elif isinstance(a, (list, tuple)):
                for item in a:
                    visit(item)
            elif isinstance(a, dict):
                for item in a.values():
                    visit(item)

        visit(self.node.args)
        visit(self.node.kwargs)
        return found

    def spatial_inputs(self) -> list[fx.Node]:
        return [n for n in self.tensor_inputs() if self._infos[n].spatial is not None]

    def describe(self) -> str:
        return describe_target(self.node)


Rule = Callable[[NodeView], Decision]

_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def register_rule(target: type | Callable | str, rule: Rule) -> None:
    """Register ``rule`` for a module type, a function, or a tensor method name (a str)."""
    if isinstance(target, str):
        _METHOD_RULES[target] = rule
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _MODULE_RULES[target] = rule
    else:
        _FUNCTION_RULES[target] = rule


def find_rule(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        # Exact type only: a subclass may override forward (timm's LayerNorm2d subclasses
        # nn.LayerNorm but normalises dim 1), so it is traced through rather than guessed at.
        return _MODULE_RULES.get(type(module))
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


def registered_rule(target: type | Callable | str) -> Rule | None:
    """The rule registered for ``target`` (a module type, function or method name), or None."""
    if isinstance(target, str):
        return _METHOD_RULES.get(target)
    if isinstance(target, type) and issubclass(target, nn.Module):
        return _MODULE_RULES.get(target)
    return _FUNCTION_RULES.get(target)


def module_rule_types() -> tuple[type, ...]:
    return tuple(_MODULE_RULES)


def function_rule_targets() -> tuple[Any, ...]:
    return tuple(_FUNCTION_RULES)


def describe_target(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    mod = getattr(target, "__module__", None)
    return f"function {mod + '.' if mod else ''}{name}"

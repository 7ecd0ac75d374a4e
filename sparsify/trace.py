"""Step 1 of the pipeline: trace the user's model into a torch.fx graph.

Modules with a registered adapter, timm's own fx leaf modules and the user's ``leaf_modules`` stay
whole (call_module nodes); timm's autowrapped functions stay calls, so timm models that branch on
shapes still trace. Failures become a SparsifyError naming the module being traced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from .errors import SparsifyError

__all__ = ["SparsifyTracer", "trace"]


def _timm_notrace() -> tuple[set[type], set[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


class SparsifyTracer(fx.Tracer):
    """An fx tracer that keeps adapter-covered modules, timm leaves and user leaves whole."""

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = (),
                 **tracer_kwargs: Any):
        from sparsify.adapters._registry import module_rule_types

        timm_modules, timm_functions = _timm_notrace()
        functions = tuple(timm_functions) + tuple(autowrap_functions)
        functions += tuple(tracer_kwargs.pop("autowrap_functions", ()))
        kept_whole = set(tracer_kwargs.pop("kept_whole", ()))
        super().__init__(autowrap_functions=functions, **tracer_kwargs)
        self._user_leaves = tuple(leaf_modules)
        # timm's own fx leaves are traced through (most are plain convs and norms inside); only those
        # whose tracing failed are kept whole (see _trace_with_fallback).
        self.timm_leaves = timm_modules - set(module_rule_types())
        self._leaf_types = set(module_rule_types()) | kept_whole

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self._leaf_types or (self._user_leaves and isinstance(m, self._user_leaves)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if not hasattr(error, "_sparsify_module_path"):
                error._sparsify_module_path = self.path_of_module(m)  # the innermost module wins
            raise


def trace(model: nn.Module, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = (),
          tracer_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` with :class:`SparsifyTracer`; SparsifyError with the failing module on error."""
    own_attributes = set(model.__dict__)
    own_buffers = set(model._buffers)
    own_parameters = set(model._parameters)
    try:
        tracer, graph = _trace_with_fallback(model, leaf_modules, autowrap_functions, tracer_kwargs or {})
    except SparsifyError:
        raise
    except Exception as error:
        for name in set(model.__dict__) - own_attributes:
            delattr(model, name)
        path = getattr(error, "_sparsify_module_path", None) or "<top level>"
        module = model.get_submodule(path) if path != "<top level>" else model
        raise SparsifyError(
            f"torch.fx could not trace {type(model).__name__}: the failure is inside module '{path}' "
            f"({type(module).__name__}): {type(error).__name__}: {error}\n"
            "Fixes to try: pass leaf_modules=[" + type(module).__name__ + "] to sparsify.wrap to keep "
            "that module whole (then register an adapter for it if it touches space: "
            "sparsify.register_adapter), or autowrap_functions=[fn] for a helper function that branches "
            "on tensor values or shapes."
        ) from error
    try:
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    finally:
        # fx stores tensor constants met while tracing (``_tensor_constant0``...) on the traced root;
        # the GraphModule has its own copy now, so take them off the user's model again.
        for name in set(model.__dict__) - own_attributes:
            delattr(model, name)
        for name in set(model._buffers) - own_buffers:
            del model._buffers[name]
        for name in set(model._parameters) - own_parameters:
            del model._parameters[name]


def _trace_with_fallback(model: nn.Module, leaf_modules, autowrap_functions, tracer_kwargs: dict
                         ) -> tuple[SparsifyTracer, fx.Graph]:
    """Trace through timm's fx leaf modules; keep one whole only when tracing inside it fails."""
    kept: set[type] = set()
    while True:
        tracer = SparsifyTracer(leaf_modules, autowrap_functions, kept_whole=kept, **tracer_kwargs)
        try:
            return tracer, tracer.trace(model)
        except SparsifyError:
            raise
        except Exception as error:
            path = getattr(error, "_sparsify_module_path", None)
            owner = _timm_leaf_around(model, path, tracer.timm_leaves - kept)
            if owner is None:
                raise
            kept.add(owner)
            for name in [k for k in model.__dict__ if k.startswith("_tensor_constant")]:
                delattr(model, name)


def _timm_leaf_around(model: nn.Module, path: str | None, candidates: set[type]) -> type | None:
    """The type of the outermost module on ``path`` (the failing one and its parents) that timm
    declares an fx leaf, or None."""
    if not path or not candidates:
        return None
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        try:
            module = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            return None
        if type(module) in candidates:
            return type(module)
    return None


def module_path(node: fx.Node) -> str | None:
    """The qualified path of the module a node belongs to (its own target for call_module)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return last[0] if isinstance(last, tuple) else str(last)
    return None

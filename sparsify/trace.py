"""Step 1 of the pipeline: trace the user's model into a torch.fx graph.

Modules with a registered adapter, timm's own fx leaf modules and the user's ``leaf_modules`` stay
whole (call_module nodes); timm's autowrapped functions stay calls, so timm models that branch on
shapes still trace. Buffers are traced as graph inputs (``get_attr``), like parameters, so arithmetic
on a module's own tensors (a frozen BatchNorm's ``weight * running_var.rsqrt()``) stays live instead
of becoming a constant copy. Extra ``forward`` arguments are traced at their defaults (or at the
user's ``concrete_args``). Failures become a SparsifyError naming the module being traced.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SparsifyError

__all__ = ["SparsifyTracer", "trace", "module_path", "owner_path", "module_outputs", "check_trace_matches",
           "explain_trace_failure"]

#: node.meta key: the (module path, call index) pairs whose forward returned this node, innermost first.
MODULE_OUTPUTS = "sparsify_module_outputs"


def _timm_notrace() -> tuple[set[type], set[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


def _einops_functions() -> tuple[Any, tuple[Callable, ...]]:
    """einops' functional API, kept as calls: it runs Python logic on the tensor's shape (pattern
    parsing, caching by shape) that fx proxies cannot follow. Each call is judged by its rule
    (sparsify.adapters.space_to_depth) by replaying it on an index tensor."""
    try:
        import einops
    except ImportError:
        return None, ()
    return einops, (einops.rearrange, einops.reduce, einops.repeat)


class SparsifyTracer(fx.Tracer):
    """An fx tracer that keeps adapter-covered modules, timm leaves and user leaves whole.

    It also records, on each node a module's forward returned, which module (and which call of it)
    produced it, so the unmodified model's own outputs can be captured with hooks as ground truth.
    """

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = (),
                 **tracer_kwargs: Any):
        from sparsify.adapters._registry import module_rule_types

        timm_modules, timm_functions = _timm_notrace()
        einops_module, einops_functions = _einops_functions()
        functions = tuple(timm_functions) + tuple(autowrap_functions) + einops_functions
        functions += tuple(tracer_kwargs.pop("autowrap_functions", ()))
        proxy_buffers = tracer_kwargs.pop("proxy_buffer_attributes", True)
        kept_whole = set(tracer_kwargs.pop("kept_whole", ()))
        super().__init__(autowrap_functions=functions, **tracer_kwargs)
        if einops_module is not None:  # also ``einops.rearrange(...)`` called through the module
            self._autowrap_search.append(einops_module)
        # Buffers read in forward become get_attr nodes (live), not tensors baked in at trace time.
        self.proxy_buffer_attributes = proxy_buffers
        self._user_leaves = tuple(leaf_modules)
        # timm's own fx leaves are traced through (most are plain convs and norms inside); only those
        # whose tracing failed are kept whole (see _trace_with_fallback).
        self.timm_leaves = timm_modules - set(module_rule_types())
        self._leaf_types = set(module_rule_types()) | kept_whole
        self.module_calls: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self._leaf_types or (self._user_leaves and isinstance(m, self._user_leaves)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        call = self.module_calls.get(path, 0)
        self.module_calls[path] = call + 1
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if not hasattr(error, "_sparsify_module_path"):
                error._sparsify_module_path = path  # the innermost module wins
            raise
        if isinstance(result, fx.Proxy):
            result.node.meta.setdefault(MODULE_OUTPUTS, []).append((path, call))
        return result


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C-implemented forward: let fx decide
        return []


def _concrete_args(model: nn.Module, concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """Every forward argument after the image, fixed: the user's value, else the default."""
    params = _forward_parameters(model)
    given = dict(concrete_args or {})
    names = {p.name for p in params}
    unknown = sorted(set(given) - names)
    if params and unknown:
        raise SparsifyError(f"concrete_args names {unknown}, which {type(model).__name__}.forward does not take "
                            f"(its arguments: {[p.name for p in params]})")
    fixed: dict[str, Any] = {}
    for index, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if index == 0 and p.name not in given:
            continue  # the image
        if p.name in given:
            fixed[p.name] = given[p.name]
        elif p.default is not p.empty:
            fixed[p.name] = p.default
        else:
            raise SparsifyError(
                f"{type(model).__name__}.forward takes a required argument '{p.name}' besides the image; "
                f"sparsify calls forward(x) alone. Pass concrete_args={{'{p.name}': value}} to sparsify.wrap "
                "to trace it at a fixed value (it is then fixed in the encoder), or wrap a small module "
                "whose forward(x) calls your model."
            )
    return fixed


def _drop_fixed_inputs(gm: fx.GraphModule, fixed: dict[str, Any]) -> None:
    """Remove the placeholders fx made for fixed arguments, with the guards that check them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    guards = (operator.eq, torch._assert, fx._symbolic_trace._assert_is_none)
    for ph in placeholders[1:]:
        doomed: list[fx.Node] = []
        todo = [ph]
        while todo:
            node = todo.pop()
            doomed.append(node)
            for user in node.users:
                if user not in doomed and user not in todo:
                    todo.append(user)
        if any(n is not ph and (n.op != "call_function" or n.target not in guards) for n in doomed):
            raise SparsifyError(
                f"the traced graph still uses the forward argument placeholder '{ph.target}' as a value; pass "
                "concrete_args={...} with a plain value (bool, number, None) for it to sparsify.wrap")
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in sorted(set(doomed), key=order.get, reverse=True):
            gm.graph.erase_node(node)
    gm.recompile()


def trace(model: nn.Module, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = (),
          tracer_kwargs: dict[str, Any] | None = None, concrete_args: dict[str, Any] | None = None
          ) -> fx.GraphModule:
    """Trace ``model`` with :class:`SparsifyTracer`; SparsifyError with the failing module on error.

    Forward arguments after the image are fixed at ``concrete_args`` or their defaults (recorded in
    the result's ``meta["concrete_args"]``); ``meta["module_calls"]`` counts the calls of every
    traced module path.
    """
    fixed = _concrete_args(model, concrete_args)
    kwargs = dict(tracer_kwargs or {})
    own_attributes = set(model.__dict__)
    own_buffers = set(model._buffers)
    own_parameters = set(model._parameters)
    try:
        try:
            tracer, graph = _trace_with_fallback(model, leaf_modules, autowrap_functions, kwargs, fixed)
        except SparsifyError:
            raise
        except Exception:
            if "proxy_buffer_attributes" in kwargs:
                raise
            # Python code that branches on a buffer's value cannot trace it as a graph value: trace such
            # a model with buffers read as tensors, as fx does by default.
            for name in set(model.__dict__) - own_attributes:
                delattr(model, name)
            tracer, graph = _trace_with_fallback(model, leaf_modules, autowrap_functions,
                                                 {**kwargs, "proxy_buffer_attributes": False}, fixed)
            if any(n.op == "get_attr" and str(n.target).startswith("_tensor_constant") for n in graph.nodes):
                warnings.warn(
                    f"{type(model).__name__}'s forward branches on a buffer's value, so its buffers were traced as "
                    "tensors: values computed from them are frozen copies in the encoder (loading new buffers "
                    "into the model will not reach them). Keep that module whole with leaf_modules=[...].",
                    stacklevel=3)
    except SparsifyError:
        raise
    except Exception as error:
        for name in set(model.__dict__) - own_attributes:
            delattr(model, name)
        raise _trace_error(model, error, fixed) from error
    try:
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    finally:
        # fx stores tensor constants met while tracing (``_tensor_constant0``...) on the traced root;
        # the GraphModule has its own copy now, so take them off the user's model again.
        for name in set(model.__dict__) - own_attributes:
            delattr(model, name)
        for name in set(model._buffers) - own_buffers:
            del model._buffers[name]
        for name in set(model._parameters) - own_parameters:
            del model._parameters[name]
    if fixed:
        _drop_fixed_inputs(gm, fixed)
    gm.meta["module_calls"] = dict(tracer.module_calls)
    gm.meta["concrete_args"] = dict(fixed)
    return gm


def _trace_with_fallback(model: nn.Module, leaf_modules, autowrap_functions, tracer_kwargs: dict,
                         fixed: dict[str, Any]) -> tuple[SparsifyTracer, fx.Graph]:
    """Trace through timm's fx leaf modules; keep one whole only when tracing inside it fails."""
    kept: set[type] = set()
    own_attributes = set(model.__dict__)
    while True:
        tracer = SparsifyTracer(leaf_modules, autowrap_functions, kept_whole=kept, **tracer_kwargs)
        try:
            return tracer, tracer.trace(model, concrete_args=fixed or None)
        except SparsifyError:
            raise
        except Exception as error:
            owner = _timm_leaf_around(model, getattr(error, "_sparsify_module_path", None),
                                      tracer.timm_leaves - kept)
            if owner is None:
                raise
            kept.add(owner)
            for name in set(model.__dict__) - own_attributes:
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


def _trace_error(model: nn.Module, error: Exception, fixed: dict[str, Any]) -> SparsifyError:
    path = getattr(error, "_sparsify_module_path", None) or ""
    name = type(model).__name__
    detail = f"{type(error).__name__}: {error}"
    if not path:
        # Never suggest the root as a leaf: that would leave nothing to rewrite.
        fixed_note = f" (extra arguments were fixed at {fixed})" if fixed else ""
        return SparsifyError(
            f"torch.fx could not trace {name}: the failure is in {name}.forward itself{fixed_note}: {detail}\n"
            "Fixes to try: if it branches on an extra forward argument, pass concrete_args={'name': value} "
            "to sparsify.wrap; if it branches on tensor values or shapes, move that code into a helper "
            "function and pass autowrap_functions=[fn], or into a submodule kept whole with "
            "leaf_modules=[ThatModule] (and an adapter, sparsify.register_adapter, if it touches space)."
        )
    module = model.get_submodule(path)
    return SparsifyError(
        f"torch.fx could not trace {name}: the failure is inside module '{path}' "
        f"({type(module).__name__}): {detail}\n"
        "Fixes to try: pass leaf_modules=[" + type(module).__name__ + "] to sparsify.wrap to keep "
        "that module whole (then register an adapter for it if it touches space: "
        "sparsify.register_adapter), or autowrap_functions=[fn] for a helper function that branches "
        "on tensor values or shapes."
    )


def module_path(node: fx.Node) -> str | None:
    """The qualified path of the module a node belongs to (its own target for call_module)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return last[0] if isinstance(last, tuple) else str(last)
    return None


def owner_path(node: fx.Node) -> str:
    """The path of the module whose forward *created* the node ('' for the root model's forward).

    For a call_module node that is the caller, not the module called.
    """
    stack = [v[0] if isinstance(v, tuple) else str(v) for v in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and stack and stack[-1] == str(node.target):
        stack = stack[:-1]
    return stack[-1] if stack else ""


def module_outputs(node: fx.Node) -> list[tuple[str, int]]:
    """(module path, call index) of every module call that returned ``node``, innermost first."""
    return list(node.meta.get(MODULE_OUTPUTS, ()))


_FX_DIVERGENCE = (
    "torch.fx recorded a different computation than {name}.forward runs: {what}. Python code that "
    "inspects a tensor while tracing sees a placeholder, not a tensor: `isinstance(t, torch.Tensor)` or "
    "`torch.jit.isinstance(t, torch.Tensor)` is False for it, and a branch taken on such a check (or on a "
    "value read from a tensor) is silently left out of the graph (MONAI's BasicUNet drops its skip "
    "concatenations this way). Keep the module that does it whole (leaf_modules=[<its class>]) and "
    "register an adapter for it, or remove the check."
)


def check_trace_matches(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Raise a SparsifyError when the traced graph does not compute what the model computes.

    fx records one path through ``forward``; a check that behaves differently on its placeholders
    than on tensors (``torch.jit.isinstance``) records another one, and nothing downstream could
    tell: every later comparison would be against the same wrong graph. So the model itself and
    its graph are run once on ``example`` (eval mode, no grad, the model's flags restored) and their
    outputs compared. Outputs that cannot be paired (the graph returns a different structure, e.g.
    a training-only head cut away) are not compared.
    """
    from torch.utils._pytree import tree_leaves

    fixed = dict(gm.meta.get("concrete_args", {}))
    flags = [(m, m.training) for m in (*model.modules(), *gm.modules())]  # live flags may read either
    model.eval()
    gm.eval()
    try:
        with torch.no_grad():
            expected = [t for t in tree_leaves(model(example, **fixed)) if isinstance(t, torch.Tensor)]
            got = [t for t in tree_leaves(gm(example)) if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001  (a graph that does not run is reported where shapes are recorded)
        return
    finally:
        for m, flag in flags:
            m.training = flag
    if len(expected) != len(got):
        return
    for index, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape:
            raise SparsifyError(_FX_DIVERGENCE.format(
                name=type(model).__name__,
                what=f"output {index} has shape {tuple(g.shape)} in the graph but {tuple(e.shape)} in the model"))
        if not e.is_floating_point():
            continue
        same = (e == g) | (e.isnan() & g.isnan())  # NaN and inf where both have them agree
        if bool(same.all()):
            continue
        finite = e[e.isfinite()]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        diff = (e - g).abs()[~same].max().item()
        if not diff <= 1e-4 * scale + 1e-5:  # rounding apart, the same operations give the same values
            raise SparsifyError(_FX_DIVERGENCE.format(
                name=type(model).__name__,
                what=f"output {index} differs by {diff:.3g} (its scale is {scale:.3g}) on the same input"))


def explain_trace_failure(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor,
                          error: SparsifyError) -> SparsifyError:
    """The error to raise when the traced graph fails on ``example``: if the model itself runs on
    it, the graph is not what ``forward`` computes (see :func:`check_trace_matches`), so say that;
    otherwise the input is wrong for the model, and ``error`` says so (as it does when it names a
    fixed-size tensor of the model: that reason stands)."""
    if "has a fixed shape" in str(error):
        return error
    fixed = dict(gm.meta.get("concrete_args", {}))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(example, **fixed)
    except Exception:  # noqa: BLE001  (the model refuses the input too: the original error stands)
        return error
    finally:
        for m, flag in flags:
            m.training = flag
    return SparsifyError(_FX_DIVERGENCE.format(
        name=type(model).__name__, what="the model runs on the example input but its graph does not")
        + f"\nDetails: {error}")

"""The public way to teach sparsify about your own layers: ``sparsify.register_adapter``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._kinds import mixing_rule, pointwise_rule, statistic_rule
from ._registry import register_rule

__all__ = ["register_adapter"]

_KINDS = ("statistic", "mixing", "pointwise")


def register_adapter(target: type | Callable | str, masked: Callable[..., Any] | None = None, *,
                     kind: str = "statistic", preserves_zero: bool = False, nonneg: bool = False,
                     global_output: bool = False) -> Any:
    """Register how sparsify treats ``target`` (a module class, a function, or a tensor method name).

    Kinds (design.md section 4):

    - ``"statistic"``: the op computes something over space (a norm, a pooling, an attention-free
      context block). ``masked`` replaces it and must use active sites only. Module classes:
      ``masked(module, x, mask)``; functions and methods: ``masked(mask, *args, **kwargs)`` with
      the original arguments. ``mask`` is a 0/1 tensor broadcastable to ``x`` (same layout and
      resolution) or None when nothing is masked (then run the original op). The output is a per-site
      map like ``x`` (set ``global_output=True`` when no spatial dims are left).
    - ``"mixing"``: the op reads neighbouring sites (a convolution-like layer). Its input is zeroed at
      masked sites before it runs; ``masked`` is optional.
    - ``"pointwise"``: the op acts on each site on its own; ``preserves_zero`` says f(0) == 0 and
      ``nonneg`` that the output is never negative.

    Registered module classes are kept whole when tracing. Check your adapter with
    ``sparsify.testing.assert_sparse_semantics``. Usable as a decorator:
    ``@sparsify.register_adapter(MyNorm)`` above ``def masked_my_norm(module, x, mask): ...``.
    """
    if kind not in _KINDS:
        from sparsify.errors import SparsifyError

        raise SparsifyError(f"kind must be one of {_KINDS}, got {kind!r}")
    if kind == "statistic" and masked is None:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register_adapter(target, fn, kind=kind, nonneg=nonneg, global_output=global_output)
            return fn

        return decorator
    if kind == "statistic":
        rule = statistic_rule(masked, global_output=global_output, nonneg=(lambda v: nonneg))
    elif kind == "mixing":
        rule = mixing_rule(masked=masked, nonneg=(lambda v: nonneg))
    else:
        rule = pointwise_rule(zero=preserves_zero, nonneg=nonneg)
    register_rule(target, rule)
    return masked

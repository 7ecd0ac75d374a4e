"""Ground truth from the unmodified model: its own module outputs, captured with forward hooks.

``enc.dense_encoder()`` shares the encoder's tracing and would share its mistakes (a value frozen at
trace time, a tensor copied into a constant); the model's own forward, observed through hooks, does
not. Compare ``enc(x, None)`` with what the model's modules returned on the same input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ._state import preserved_state

__all__ = ["capture_module_outputs"]


class _Done(Exception):
    """Raised by the last hook needed when stopping early."""


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()  # a clone: later in-place ops of the forward must not change it
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes fields positionally
        return type(value)(*(_detach(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def capture_module_outputs(
    model: nn.Module,
    x: torch.Tensor,
    module_names: Sequence[str],
    *,
    train: bool | None = None,
    seed: int | None = 0,
    preserve: bool = True,
    stop_early: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the unmodified ``model(x)`` once and return what each named submodule returned.

    Args:
        model: the plain model (not an encoder).
        x: its input.
        module_names: qualified names as in ``model.named_modules()`` (``"layer1"``,
            ``"stages.2.blocks.1"``); ``""`` is the model itself.
        train: run in train (True) or eval (False) mode; None keeps every submodule's current flag.
        seed: ``torch.manual_seed`` before the forward, so stochastic layers (dropout, drop path)
            draw the same numbers as another run seeded alike; None leaves the RNG alone.
        preserve: restore buffers (BatchNorm running statistics), train/eval flags and the global
            RNG state afterwards, so the model is left exactly as it was.
        stop_early: stop the forward as soon as every named module has returned (the rest, e.g. a
            classifier head, does not run); each module then keeps its *first* call.
        kwargs: extra keyword arguments for ``model(x, **kwargs)``.

    Returns:
        ``{name: output}`` in the order given, detached copies; the output as the module returned it (a
        tensor, or a tuple/list/dict of tensors). A module called more than once keeps its last call.

    Raises:
        ValueError: a name that is not a submodule of ``model`` (the message lists close names), or
            a module that the forward never called.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in module_names if n not in modules]
    if unknown:
        known = ", ".join(repr(n) for n in list(modules)[:12])
        raise ValueError(f"no submodule named {unknown} in {type(model).__name__}; its modules include {known}")
    captured: dict[str, Any] = {}
    handles = []

    wanted = set(module_names)

    def make_hook(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if stop_early and name in captured:
                return
            captured[name] = _detach(output)
            if stop_early and wanted <= captured.keys():
                raise _Done

        return hook

    for name in dict.fromkeys(module_names):
        handles.append(modules[name].register_forward_hook(make_hook(name)))
    state = preserved_state(model) if preserve else contextlib.nullcontext()
    try:
        with state, torch.no_grad():
            if train is not None:
                model.train(train)
            if seed is not None:
                torch.manual_seed(seed)
            try:
                model(x, **(kwargs or {}))
            except _Done:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in module_names if n not in captured]
    if missing:
        raise ValueError(f"the forward of {type(model).__name__} never called {missing}")
    return {n: captured[n] for n in module_names}


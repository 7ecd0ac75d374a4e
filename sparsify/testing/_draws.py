"""Random draws held fixed: stochastic layers behave the same whatever the input's shape.

Dropout, Dropout2d, drop path (timm DropPath, torchvision StochasticDepth) and drop block draw one
random number per element, channel or sample, so two runs on inputs of different shapes (a bigger
canvas, an extra sample) draw differently even from the same seed, and a comparison between them
would report a correct encoder as broken. Inside :func:`fixed_draws` every random draw returns its
most likely value instead (Bernoulli(p) -> 1 if p >= 0.5 else 0, uniform -> the midpoint, normal ->
the mean, dropout keeps every element and rescales by 1 / (1 - p) when p <= 0.5). The layers still run
their train-mode code (rescaling included), deterministically and per element, so a value frozen to
eval mode still shows. Checks that hold for any draw (zero at masked sites) keep real draws.

The arguments of each op are read against its aten schema, defaults included: the dispatcher drops
trailing arguments equal to their default before ``__torch_dispatch__`` sees them, so
``empty(...).bernoulli_(0.5)`` (CPU dropout with p = 0.5, the most common rate) arrives as
``bernoulli_(self)``. Reading that as "the probabilities are ``self``" would draw from uninitialised
memory, a different function on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["fixed_draws"]

aten = torch.ops.aten


def _bind(func, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name, each missing one at its schema default."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if not arg.kwarg_only and i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _fill_keep(out: torch.Tensor, probs) -> torch.Tensor:
    """``out`` set to the most likely Bernoulli draw for ``probs`` (a number or a tensor)."""
    if isinstance(probs, torch.Tensor):
        return out.copy_((probs >= 0.5).to(out.dtype))  # copy_ broadcasts probabilities to ``out``
    return out.fill_(1.0 if probs >= 0.5 else 0.0)


def _bernoulli(func, args, kwargs):
    out = func(*args, **kwargs)  # right shape, dtype and device (and the in-place / out= semantics)
    a = _bind(func, args, kwargs)
    # bernoulli(self): self holds the probabilities; the .p / .float / .Tensor overloads pass them as p.
    return _fill_keep(out, a["p"] if "p" in a else a["self"])


def _uniform(func, args, kwargs):
    a = _bind(func, args, kwargs)
    return func(*args, **kwargs).fill_((a["from"] + a["to"]) / 2)


def _normal(func, args, kwargs):
    out = func(*args, **kwargs)
    mean = _bind(func, args, kwargs)["mean"]
    return out.copy_(mean) if isinstance(mean, torch.Tensor) else out.fill_(mean)


def _rand(func, args, kwargs):
    return func(*args, **kwargs).fill_(0.5)


def _randn(func, args, kwargs):
    return func(*args, **kwargs).fill_(0.0)


def _native_dropout(func, args, kwargs):
    a = _bind(func, args, kwargs)
    x, p, train = a["input"], float(a["p"]), a["train"]
    if train is False:
        return func(*args, **kwargs)
    keep = (1.0 - p) >= 0.5
    out = x * (1.0 / (1.0 - p)) if keep else torch.zeros_like(x)
    return out, torch.full_like(x, keep, dtype=torch.bool)


_HANDLERS: dict[Any, Callable] = {
    aten.bernoulli: _bernoulli,
    aten.bernoulli_: _bernoulli,
    aten.uniform_: _uniform,
    aten.normal_: _normal,
    aten.normal: _normal,
    aten.rand: _rand,
    aten.rand_like: _rand,
    aten.randn: _randn,
    aten.randn_like: _randn,
    aten.native_dropout: _native_dropout,
}


class fixed_draws(TorchDispatchMode):  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Context manager: every random draw inside returns its most likely value (see module docs)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func.overloadpacket)
        if handler is not None:
            return handler(func, args, kwargs)
        return func(*args, **kwargs)

"""Random draws held fixed: stochastic layers behave the same whatever the input's shape.

Dropout, Dropout2d, drop path (timm DropPath, torchvision StochasticDepth) and drop block draw one
random number per element, channel or sample, so two runs on inputs of different shapes (a bigger
canvas, an extra sample) draw differently even from the same seed, and a comparison between them
would report a correct encoder as broken. Inside :func:`fixed_draws` every random draw returns its
most likely value instead (Bernoulli(p) -> 1 if p >= 0.5 else 0, uniform -> the midpoint, normal ->
the mean, dropout keeps every element and rescales by 1 / (1 - p) when p <= 0.5). The layers still run
their train-mode code (rescaling included), deterministically and per element, so a value frozen to
eval mode still shows. Checks that hold for any draw (zero at masked sites) keep real draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["fixed_draws"]

aten = torch.ops.aten


def _bernoulli(func, args, kwargs):
    out = func(*args, **kwargs)  # right shape, dtype and device; the values are replaced below
    self = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p", None)
    if p is None:  # bernoulli(probabilities)
        probs = self
    elif isinstance(p, torch.Tensor):
        probs = p
    else:
        return out.fill_(1.0 if p >= 0.5 else 0.0)
    keep = (probs >= 0.5).to(out.dtype)
    return out.copy_(keep.expand_as(out)) if keep.shape != out.shape else out.copy_(keep)


def _uniform(func, args, kwargs):
    out = func(*args, **kwargs)
    low = args[1] if len(args) > 1 else kwargs.get("from", 0.0)
    high = args[2] if len(args) > 2 else kwargs.get("to", 1.0)
    return out.fill_((low + high) / 2)


def _normal(func, args, kwargs):
    out = func(*args, **kwargs)
    mean = args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else kwargs.get("mean", 0.0)
    return out.fill_(mean if not isinstance(mean, torch.Tensor) else 0.0)


def _rand(func, args, kwargs):
    return func(*args, **kwargs).fill_(0.5)


def _randn(func, args, kwargs):
    return func(*args, **kwargs).fill_(0.0)


def _native_dropout(func, args, kwargs):
    x, p = args[0], float(args[1])
    train = args[2] if len(args) > 2 else kwargs.get("train", True)
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

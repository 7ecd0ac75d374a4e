"""Running a module for a check without leaving a trace: restored buffers, flags and RNG state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from ._draws import fixed_draws


def _unique_modules(modules: Sequence[nn.Module | None]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def preserved_state(*modules: nn.Module | None) -> Iterator[None]:
    """Restore every buffer, every submodule's train/eval flag and the global RNG state on exit.

    Buffers are restored in place (``copy_``), so buffer objects shared between an encoder and the
    user's model stay shared. Parameters are not touched by forward passes and are not copied.
    """
    mods = _unique_modules(modules)
    flags = [(m, m.training) for m in mods]
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in mods:
        for b in m.buffers(recurse=False):
            if b is not None and id(b) not in buffers:
                buffers[id(b)] = (b, b.detach().clone())
    with torch.random.fork_rng(devices=_cuda_devices(mods)):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers.values():
                    b.copy_(saved)
            for m, flag in flags:
                m.training = flag


def _cuda_devices(mods: Sequence[nn.Module]) -> list[int]:
    devices = set()
    for m in mods:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.is_cuda:
                devices.add(t.device.index or 0)
    return sorted(devices)


def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def _forward(module: nn.Module, *args, train: bool, seed: int = 0, fixed: bool = False) -> list[torch.Tensor]:
    """Run ``module(*args)`` in the given mode under no_grad with a fixed RNG seed (so dropout / drop
    path draw the same numbers in both runs being compared). ``fixed``: hold every random draw at its
    most likely value (:func:`fixed_draws`), for comparisons between inputs of different shapes.
    Buffers are NOT restored here."""
    module.train(train)
    torch.manual_seed(seed)
    with torch.no_grad(), fixed_draws() if fixed else contextlib.nullcontext():
        return [t.detach() for t in _as_list(module(*args))]


def _modes(train: bool, eval: bool) -> list[bool]:
    modes = ([True] if train else []) + ([False] if eval else [])
    if not modes:
        raise ValueError("at least one of train=True / eval=True is needed")
    return modes


def _mode_name(train: bool) -> str:
    return "train" if train else "eval"

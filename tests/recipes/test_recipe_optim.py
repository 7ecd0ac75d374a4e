"""Optimiser parameter groups and the lr / weight-decay schedules."""

from __future__ import annotations

import math

import torch
from sparsify.recipes.optim import betas_for_norm, create_optimizer, optimizer_betas, param_groups, set_lr_and_wd
from sparsify.recipes.schedules import lr_at, wd_at
from torch import nn


class _WithToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.mask_token = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def test_param_groups_no_decay_where_it_does_not_belong() -> None:
    m = _WithToken()
    groups = param_groups(m, 0.04)
    decay = {id(p) for g in groups if g["apply_wd"] for p in g["params"]}
    no_decay = {id(p) for g in groups if not g["apply_wd"] for p in g["params"]}
    assert decay == {id(m.conv.weight)}
    assert no_decay == {id(m.conv.bias), id(m.bn.weight), id(m.bn.bias), id(m.mask_token), id(m.gamma)}
    assert id(m.frozen) not in decay | no_decay


def test_lamb_from_timm_with_betas_by_norm() -> None:
    m = _WithToken()
    opt = create_optimizer(param_groups(m, 0.04), lr=1e-3, weight_decay=0.04, norm_type="layer")
    assert type(opt).__name__ == "Lamb"
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-6
    assert betas_for_norm("batch") == (0.9, 0.95)
    set_lr_and_wd(opt, 0.5, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_sgd_is_built_without_betas() -> None:
    opt = create_optimizer(param_groups(_WithToken(), 0.04), lr=1e-3, weight_decay=0.04, opt="sgd")
    assert "betas" not in opt.param_groups[0]
    assert optimizer_betas("sgd", "batch") is None and optimizer_betas("adamw", "layer") == (0.9, 0.999)


def test_lr_schedule() -> None:
    peak, total, warm = 1.0, 100, 10
    assert math.isclose(lr_at(0, total, peak, warm), 0.005)
    assert math.isclose(lr_at(10, total, peak, warm), 1.0)
    assert lr_at(5, total, peak, warm) < lr_at(9, total, peak, warm)
    assert math.isclose(lr_at(100, total, peak, warm), 0.001)
    values = [lr_at(s, total, peak, warm) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wd_schedule() -> None:
    assert math.isclose(wd_at(0, 50), 0.04)
    assert math.isclose(wd_at(50, 50), 0.2)
    assert math.isclose(wd_at(25, 50), 0.12)

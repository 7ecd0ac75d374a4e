"""Training-only branches (auxiliary heads) are cut away before train and eval graphs are compared;
branches that change what the network computes in training are still refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.testing import assert_sparse_semantics


class _AuxNet(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c1(x)
        aux = self.aux(x) if self.training else None
        x = F.dropout(self.c2(x), self.p, training=self.training)
        out = self.fc(x.mean((2, 3)))
        return (out, aux) if self.training else out


def test_aux_head_is_cut_and_the_encoder_keeps_the_contract():
    torch.manual_seed(0)
    model = _AuxNet()
    enc = sparsify.wrap(model, (32, 48))
    assert not any("aux" in str(n.target) for n in enc.graph.nodes)
    assert_sparse_semantics(model, input_size=(32, 48))


def test_live_mode_flags_still_apply_after_the_cut():
    torch.manual_seed(0)
    model = _AuxNet(p=0.5)
    enc = sparsify.wrap(model, (32, 48))
    x = torch.randn(2, 3, 32, 48)
    enc.eval()
    assert torch.equal(enc(x)[-1], enc(x)[-1])  # eval: no dropout
    enc.train()
    torch.manual_seed(1)
    a = enc(x)[-1]
    torch.manual_seed(2)
    assert not torch.equal(a, enc(x)[-1])  # train: dropout follows the mode at run time


class _TrainOnlyNoise(_AuxNet):
    def forward(self, x):
        x = self.c1(x)
        if self.training:
            x = x + 0.1  # changes the main path in training
        return self.fc(self.c2(x).mean((2, 3)))


class _TrainReturnsOther(_AuxNet):
    def forward(self, x):
        x = self.c2(self.c1(x))
        return self.fc(x.amax((2, 3))) if self.training else self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("cls", [_TrainOnlyNoise, _TrainReturnsOther])
def test_branches_that_change_the_computation_are_refused(cls):
    with pytest.raises(sparsify.SparsifyError, match="differs between train and eval"):
        sparsify.wrap(cls(), (32, 48))

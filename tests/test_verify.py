"""sparsify.verify: no false alarms on stochastic layers in train mode, still catches a frozen flag."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify import encoder as encoder_module
from sparsify.testing import fixed_draws


class Block(nn.Module):
    def __init__(self, c: int, drop: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(F.relu(self.bn(self.conv(x))))


class Net(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.b1 = Block(8, drop)
        self.down = nn.Conv2d(8, 16, 3, 2, 1)
        self.b2 = Block(16, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.down(self.b1(self.stem(x))))


def _stochastic_layers():
    layers = [nn.Dropout(0.2), nn.Dropout2d(0.2)]
    try:
        from timm.layers import DropBlock2d, DropPath
    except ImportError:
        pass
    else:
        layers += [DropPath(0.2), DropBlock2d(0.2, 3)]
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:
        pass
    else:
        layers.append(StochasticDepth(0.2, "row"))
    return layers


@pytest.mark.parametrize("drop", _stochastic_layers(), ids=lambda m: type(m).__name__)
def test_correct_encoders_with_stochastic_layers_pass(drop):
    torch.manual_seed(0)
    enc = sparsify.wrap(Net(drop), (32, 32))
    report = sparsify.verify(enc)  # train and eval mode, two sizes
    assert report.passed
    assert any("vs the model's own outputs" in r.name for r in report.results)


class FunctionalFlags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                         self.training, 0.1, 1e-5)
        return self.c2(F.dropout(x, 0.2, training=self.training))


def test_verify_passes_live_flags_and_catches_a_frozen_one(monkeypatch):
    torch.manual_seed(0)
    sparsify.verify(sparsify.wrap(FunctionalFlags(), (32, 32)))
    # An encoder whose flags were frozen at trace time (the mode comparison switched off).
    monkeypatch.setattr(encoder_module, "live_mode_flags", lambda *args, **kwargs: [])
    frozen = sparsify.wrap(FunctionalFlags(), (32, 32))
    with pytest.raises(sparsify.SparsifyError, match="FAIL dense equality .*vs the model's own outputs.*train"):
        sparsify.verify(frozen)


def test_fixed_draws_hold_every_draw_at_its_most_likely_value():
    x = torch.randn(2, 4, 8, 8)
    with fixed_draws():
        torch.testing.assert_close(F.dropout(x, 0.2, training=True), x / 0.8)
        torch.testing.assert_close(F.dropout2d(x, 0.2, training=True), x / 0.8)
        assert torch.equal(F.dropout(x, 0.7, training=True), torch.zeros_like(x))
        assert torch.equal(torch.empty(3).bernoulli_(0.9), torch.ones(3))
        assert torch.equal(torch.bernoulli(torch.tensor([0.2, 0.8])), torch.tensor([0.0, 1.0]))
        assert torch.equal(torch.rand(3), torch.full((3,), 0.5))
        assert torch.equal(torch.randn(3), torch.zeros(3))
    assert not torch.equal(torch.rand(3), torch.full((3,), 0.5))  # only inside the context


def test_fixed_draws_read_schema_defaults():
    # The dispatcher drops arguments equal to their schema default: CPU dropout at p = 0.5 calls
    # bernoulli_(noise, 0.5) and the mode sees bernoulli_(noise), which is not "probabilities = noise".
    x = torch.randn(2, 4, 8, 8)
    with fixed_draws():
        for _ in range(3):  # uninitialised memory would give a different answer each time
            torch.testing.assert_close(F.dropout(x, 0.5, training=True), 2 * x)
            torch.testing.assert_close(F.dropout2d(x, 0.5, training=True), 2 * x)
        assert torch.equal(torch.empty(5).bernoulli_(), torch.ones(5))
        assert torch.equal(torch.empty(3).uniform_(), torch.full((3,), 0.5))
        assert torch.equal(torch.empty(3).uniform_(2.0, 4.0), torch.full((3,), 3.0))
        assert torch.equal(torch.empty(3).normal_(), torch.zeros(3))
        assert torch.equal(torch.normal(torch.tensor([1.0, -2.0])), torch.tensor([1.0, -2.0]))
        assert torch.equal(torch.zeros(2).bernoulli_(torch.tensor([0.1, 0.9])), torch.tensor([0.0, 1.0]))


def test_verify_passes_aspp_with_an_image_pool_branch():
    from tests.zoo._patterns_cov_verify import AsppImagePoolNet

    torch.manual_seed(0)
    enc = sparsify.wrap(AsppImagePoolNet(width=8), (32, 32))
    report = sparsify.verify(enc)  # its projection ends with Dropout(0.5): the false alarm was there
    assert report.passed and any("canvas" in r.name and r.mode == "train" for r in report.results)


def test_verify_still_catches_a_leak_in_an_aspp_encoder(monkeypatch):
    from tests.zoo._patterns_cov_verify import AsppImagePoolNet

    torch.manual_seed(0)
    enc = sparsify.wrap(AsppImagePoolNet(width=8), (32, 32))
    forward = type(enc).forward

    def leaky(self, x, mask=None):  # the image-pool branch seeing masked garbage, in effect
        return [f + 0.05 * x.mean() * (f != 0) for f in forward(self, x, mask)]

    monkeypatch.setattr(type(enc), "forward", leaky)
    with pytest.raises(sparsify.SparsifyError, match="FAIL canvas invariance"):
        sparsify.verify(enc)


def test_verify_on_batch_one_with_a_train_mode_bn_over_a_1x1_map_says_so():
    from tests.zoo._patterns_cov_verify import AsppImagePoolNet

    torch.manual_seed(0)
    enc = sparsify.wrap(AsppImagePoolNet(width=8), (32, 32))
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.verify(enc, batch=1)
    text = str(info.value)
    assert "model itself cannot run" in text and "not a contract violation" in text and "batch=2" in text
    assert "breaks the sparse-encoder contract" not in text

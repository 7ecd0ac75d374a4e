"""capture_module_outputs: the unmodified model's own intermediate outputs, as ground truth."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.testing import capture_module_outputs


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 5, 3, 2, 1))


def test_outputs_equal_the_model_computed_step_by_step():
    net = _net().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    got = capture_module_outputs(net, x, ["1", "3"], train=False)
    h1 = net[1](net[0](x))
    assert list(got) == ["1", "3"]
    assert torch.equal(got["1"], h1)
    assert torch.equal(got["3"], net[3](net[2](h1)))


def test_train_mode_is_seeded_and_the_model_is_left_as_it_was():
    net = _net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    a = capture_module_outputs(net, x, ["2"], train=True, seed=3)["2"]
    b = capture_module_outputs(net, x, ["2"], train=True, seed=3)["2"]
    c = capture_module_outputs(net, x, ["2"], train=True, seed=4)["2"]
    assert torch.equal(a, b) and not torch.equal(a, c)  # dropout drew the same numbers for the same seed
    assert not net.training and not any(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics restored
    assert not net._forward_hooks and not any(m._forward_hooks for m in net.modules())


def test_unknown_and_uncalled_modules_are_named():
    net = nn.ModuleDict({"body": _net(), "unused": nn.Conv2d(3, 3, 1)})
    net.forward = net["body"].forward  # a model with a submodule its forward never calls
    with pytest.raises(ValueError, match="no submodule named \\['nope'\\]"):
        capture_module_outputs(net, torch.randn(1, 3, 8, 8), ["nope"])
    with pytest.raises(ValueError, match="never called \\['unused'\\]"):
        capture_module_outputs(net, torch.randn(1, 3, 8, 8), ["unused"])


def test_later_in_place_ops_do_not_change_what_was_captured():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(inplace=True))
    x = torch.randn(1, 3, 8, 8)
    got = capture_module_outputs(net, x, ["0"])["0"]
    assert (got < 0).any()
    torch.testing.assert_close(got, net[0](x).detach())


def test_stop_early_skips_the_rest_and_kwargs_reach_forward():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3, 1, 1)
            self.head = nn.Linear(5, 2)  # would fail on the body's output

        def forward(self, x, scale=1.0):
            return self.head(self.body(x) * scale)

    net = Net()
    x = torch.randn(1, 3, 8, 8)
    got = capture_module_outputs(net, x, ["body"], stop_early=True, kwargs={"scale": 2.0})["body"]
    torch.testing.assert_close(got, net.body(x).detach())
    with pytest.raises(RuntimeError):
        capture_module_outputs(net, x, ["body"])

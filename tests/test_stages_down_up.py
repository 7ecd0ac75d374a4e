"""Down-up blocks inside a stage, parallel multi-resolution networks, and the spatial rank.

* A gating branch that pools by 2, convolves and interpolates back (GhostNetV2's DFC attention) or
  an hourglass block reaches a stride coarser than the maps the network ends with: the downsample
  ratio R is the stride of the coarsest map every path runs through, the internal coarser grid is
  masked (a cell is active where any of its sites is visible), and inputs must be multiples of
  ``enc.size_multiple`` (every size an error message suggests works).
* HRNet: ``stages="auto"`` gives one map per stride from the last fusion.
* The spatial rank comes from the first convolution the input reaches, not the majority rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- the spatial rank: the first convolution the input reaches ----------------------------------------
class _ECA(nn.Module):
    """Efficient channel attention: a Conv1d over the pooled channel vector."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = x.mean((2, 3)).unsqueeze(1)
        return x * torch.sigmoid(self.conv(y)).transpose(1, 2).unsqueeze(-1)


class ManyECANet(nn.Module):
    """Two Conv2d and three Conv1d (ECA), the ECA blocks registered first: the majority rank is 1."""

    def __init__(self):
        super().__init__()
        self.ecas = nn.ModuleList(_ECA() for _ in range(3))
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.ecas[0](F.relu(self.bn1(self.conv1(x))))
        x = self.ecas[1](F.relu(self.bn2(self.conv2(x))))
        return self.ecas[2](x)


@pytest.mark.parametrize("input_size", [None, 32])
def test_spatial_rank_comes_from_the_first_conv_the_input_reaches(input_size):
    enc = sparsify.wrap(ManyECANet(), input_size)
    assert enc.spatial_dims == 2 and enc.in_chans == 3
    assert enc.downsample_ratio == 4
    rows = sparsify.graph_node_names(ManyECANet(), input_size)
    assert any(r.stride == 4 for r in rows)


class FunctionalStemNet(nn.Module):
    """The first convolution is ``F.conv2d`` reading a Conv2d's weight; the next conv has other in_channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.down = nn.Conv2d(4, 4, 1, stride=4, groups=4, bias=False)
        self.eca = _ECA()

    def forward(self, x):
        c = self.stem
        x = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return self.eca(self.down(F.relu(x)))


def test_in_chans_from_a_functional_first_conv():
    enc = sparsify.wrap(FunctionalStemNet(), 16)
    assert enc.in_chans == 1 and enc.spatial_dims == 2 and enc.downsample_ratio == 4


@pytest.mark.parametrize("eca_kernel", [1, 3])
def test_spatial_rank_with_a_standardised_first_conv_and_eca(eca_kernel):
    # The Hypothesis cases of tests/test_contract_random.py::test_batchnorm_nets_with_heads: timm's
    # StdConv2d (F.conv2d on a standardised weight) first, then ECA's Conv1d.
    from sparsify.testing.random_cnn import CNNSpec, ConvSpec, ECASpec, HeadSpec, build_cnn

    conv = dict(dilation=1, norm="bn", act="relu", bias=False, functional_act=False, pad_mode="conv")
    spec = CNNSpec(in_chans=2, blocks=(ConvSpec(out=4, kernel=3, stride=1, groups=2, conv="std", **conv),
                                       ConvSpec(out=4, kernel=1, stride=2, groups=4, conv="module", **conv),
                                       ECASpec(kernel=eca_kernel)),
                   head=HeadSpec(num_classes=1, pool="adaptive"), seed=0, spatial_dims=2)
    enc = sparsify.wrap(build_cnn(spec), (4, 8))
    assert enc.spatial_dims == 2 and enc.in_chans == 2

"""The sparse encoder keeps no more feature maps for backward than the dense network does.

Autograd's saved tensors are counted with ``saved_tensors_hooks`` (unique storages, parameters and
buffers left out). Feature maps (more than one channel, more than one site) are compared; masks (one
channel) and per-channel statistics (one site) are the sparse encoder's own, small additions. A
masked normalisation or pool that kept a masked copy of its input, next to the map the activation
already keeps, shows up here as a whole extra map (nnU-Net's ResEnc kept 58% more before).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


def _map_bytes(run, exclude: set[int]) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        is_map = t.dim() >= 3 and t.shape[1] > 1 and math.prod(t.shape[2:]) > 1
        if is_map and storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _compare(model: nn.Module, size: tuple[int, ...], wrap_kwargs: dict | None = None, batch: int = 2) -> None:
    torch.manual_seed(0)
    model.train()
    enc = sparsify.wrap(model, size, **(wrap_kwargs or {}))
    x = torch.randn(batch, enc.in_chans, *size)
    grid = tuple(s // r for s, r in zip(size, enc.patch_size if isinstance(enc.patch_size, tuple)
                                        else (enc.patch_size,) * len(size)))
    mask = sparsify.random_mask(batch, grid, 0.6, generator=torch.Generator().manual_seed(1))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    dense = _map_bytes(lambda: model(x), own)
    sparse = _map_bytes(lambda: enc(x, mask), own)
    assert sparse <= dense, f"sparse keeps {sparse / 2**20:.2f} MiB of feature maps, dense {dense / 2**20:.2f} MiB"


class _NormBlock(nn.Module):
    """conv-norm-act, conv-norm, + skip (avg-pool + 1x1 conv + norm when strided), act: ResEnc's shape."""

    def __init__(self, cin: int, cout: int, stride: int, norm, conv, pool) -> None:
        super().__init__()
        self.conv1, self.n1 = conv(cin, cout, 3, stride, 1), norm(cout)
        self.conv2, self.n2 = conv(cout, cout, 3, 1, 1), norm(cout)
        self.skip = nn.Sequential(pool(stride, stride), conv(cin, cout, 1), norm(cout)) if stride > 1 else None

    def forward(self, x):
        out = self.n2(self.conv2(F.leaky_relu(self.n1(self.conv1(x)), inplace=True)))
        return F.leaky_relu(out + (x if self.skip is None else self.skip(x)), inplace=True)


def _norm_net(rank: int, norm) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
    pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[rank - 1]
    return nn.Sequential(conv(1, 8, 3, 1, 1), norm(8), nn.LeakyReLU(inplace=True),
                         _NormBlock(8, 8, 1, norm, conv, pool), _NormBlock(8, 16, 2, norm, conv, pool),
                         _NormBlock(16, 16, 2, norm, conv, pool))


@pytest.mark.parametrize("rank,norm", [
    (3, lambda c: nn.InstanceNorm3d(c, affine=True)),
    (2, lambda c: nn.InstanceNorm2d(c, affine=True)),
    (2, lambda c: nn.GroupNorm(4, c)),
    (3, lambda c: nn.BatchNorm3d(c)),
    (1, lambda c: nn.GroupNorm(2, c)),
], ids=["instance3d", "instance2d", "group2d", "batch3d", "group1d"])
def test_hand_written_residual_nets(rank, norm):
    size = {1: (64,), 2: (32, 32), 3: (8, 16, 16)}[rank]
    _compare(_norm_net(rank, norm), size)


def test_nnunet_residual_encoder():
    from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

    model = ResidualEncoder(1, 4, [8, 16, 16, 32], nn.Conv3d, 3, [1, 2, 2, 2], [1, 2, 2, 2], conv_bias=True,
                            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, return_skips=True)
    _compare(model, (16, 32, 32))


@pytest.mark.parametrize("name", ["resnet18", "resnet26d", "resnet26t"])
def test_timm_resnets(name):
    import timm

    _compare(timm.create_model(name, pretrained=False, in_chans=1), (64, 64))

"""Layout rules: permute / reshape / split / cat / indexing that keep H and W whole are followed;
anything that merges, slices or reorders a spatial dim is refused with the node's name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ._helpers import TwoConv, check_contract, count_mask_multiplies, refusal

ACCEPTED = {
    "permute round trip": lambda y: y.permute(0, 2, 3, 1).relu().permute(0, 3, 1, 2),
    "transpose twice": lambda y: y.transpose(1, 3).transpose(3, 1),
    "chunk + cat on channels": lambda y: torch.cat(y.chunk(2, dim=1)[::-1], dim=1),
    "split + stack channels": lambda y: torch.stack(torch.split(y, 3, 1), 2).flatten(1, 2),
    "channel slicing": lambda y: torch.cat([y[:, :2], y[:, 2:]], 1),
    "channel groups reshape": lambda y: y.unflatten(1, (2, 3)).transpose(1, 2).reshape(y.shape),
    "unsqueeze/squeeze": lambda y: y.unsqueeze(2).squeeze(2),
    "ellipsis on channels": lambda y: y[:, None, ...][:, 0],
    "view_as": lambda y: y.view(y.shape[0], 2, 3, y.shape[2], y.shape[3]).view_as(y),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_layout_ops_that_keep_spatial_dims_satisfy_the_contract(name):
    check_contract(TwoConv(mid=ACCEPTED[name]))


def test_layout_ops_keep_the_mask_state():
    """Channel shuffles of a zero map stay zero: no mask multiply besides the usual ones."""
    base = count_mask_multiplies(check_contract(TwoConv()))
    enc = check_contract(TwoConv(first=lambda x: torch.cat(x.chunk(3, 1)[::-1], 1).permute(0, 2, 3, 1)
                                 .contiguous().permute(0, 3, 1, 2)))
    assert count_mask_multiplies(enc) == base


REFUSED = {
    # name: (mid, the refused node, words of the reason, input size)
    "token flattening": (lambda y: y.flatten(2).softmax(-1).view_as(y), "flatten", "merges or splits",
                         (16, 24)),
    "spatial slice": (lambda y: torch.cat([y[..., :5], y[..., 5:]], -1), "getitem", "slices", (16, 24)),
    "matmul of feature maps": (lambda y: torch.matmul(y, y.transpose(2, 3)), "matmul", "no adapter",
                               (16, 16)),
    "cat along width": (lambda y: torch.cat([y, y], 3)[..., ::2], "cat", "spatial dim", (16, 24)),
    "split along height": (lambda y: torch.cat(y.chunk(2, 2)[::-1], 2), "chunk", "spatial dim", (16, 24)),
    "unfold": (lambda y: nn.functional.unfold(y, 3, padding=1).view_as(y.repeat(1, 9, 1, 1))[:, :6],
               "unfold", "no adapter", (16, 24)),
    "flip": (lambda y: y.flip(3), "flip", "no adapter", (16, 24)),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_spatial_reorderings_are_refused_by_name(name):
    mid, node, reason, size = REFUSED[name]
    message = refusal(TwoConv(mid=mid), input_size=size)
    assert f"node '{node}'" in message and reason in message
    assert "register_adapter" in message  # says how to fix it


def test_every_offending_node_is_listed():
    def two_problems(y):
        return torch.cat([y[..., :5], y[..., 5:]], -1) + y.flip(2)

    message = refusal(TwoConv(mid=two_problems))
    assert "node 'getitem'" in message and "node 'flip'" in message

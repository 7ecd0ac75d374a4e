"""No host synchronisation in the masked forward: BatchNorm + global mean compile as one graph."""

from __future__ import annotations

import copy

import torch
from sparsify.adapters import masked_batch_norm, masked_mean
from torch import nn


def test_masked_batch_norm_and_mean_compile_fullgraph():
    """torch.compile(fullgraph=True) raises on any graph break (.item(), nonzero, boolean indexing,
    data-dependent shapes). aot_eager also traces the backward; inductor would only add codegen
    time on this CPU machine."""
    torch._dynamo.reset()
    bn = nn.BatchNorm2d(4).train()
    twin = copy.deepcopy(bn)

    def step(x, mask):
        y = masked_batch_norm(bn, x, mask)
        return y * mask, masked_mean(mask, y, (2, 3))

    def eager(x, mask):
        y = masked_batch_norm(twin, x, mask)
        return y * mask, masked_mean(mask, y, (2, 3))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 10, generator=gen, requires_grad=True)
    mask = (torch.rand(2, 1, 6, 10, generator=gen) > 0.5).float()
    mask[:, :, 0, 0] = 1
    y, pooled = compiled(x, mask)
    (y.square().sum() + pooled.sum()).backward()
    grad = x.grad.clone()
    x.grad = None
    y_ref, pooled_ref = eager(x, mask)
    (y_ref.square().sum() + pooled_ref.sum()).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(pooled, pooled_ref)
    torch.testing.assert_close(grad, x.grad)
    torch.testing.assert_close(bn.running_mean, twin.running_mean)
    torch.testing.assert_close(bn.running_var, twin.running_var)
    assert bn.num_batches_tracked == twin.num_batches_tracked == 1
    torch._dynamo.reset()

"""The N-d SparK is the 2-D one on a singleton axis: a 3-D SparK with strides (1, s, s) on (B, C, 1, H, W)
volumes, and a 1-D SparK on (B, C, L) signals, given the 2-D weights (each kernel as its middle slice),
compute the 2-D SparK's loss, prediction, gradients and running statistics in float64.

The 2-D path itself was checked bitwise against the code before N-d support (outputs, losses, grads,
running statistics on toy encoders, resnet18 and convnext_atto in float64); this ties every other rank
to it."""

from __future__ import annotations

import pytest
import torch

from sparsify.spark import SparK

from .toy_encoder import ToyEncoder

TOL = dict(rtol=1e-10, atol=1e-12)


def _lift(w2: torch.Tensor, w3: torch.Tensor, axis: int) -> torch.Tensor:
    """A 2-D parameter as the 3-D one of shape ``w3.shape``: kernels gain the new spatial axis at
    position ``axis`` (2 = depth in front) with the 2-D kernel as its middle slice, zeros elsewhere."""
    if w2.shape == w3.shape:
        return w2.clone()
    out = torch.zeros_like(w3)
    index = [slice(None)] * w3.dim()
    index[axis] = w3.shape[axis] // 2
    out[tuple(index)] = w2
    return out


def _pair(norm: str, seed: int):
    torch.manual_seed(seed)
    two = SparK(ToyEncoder(2, (6, 12), (4, 8), norm), decoder_width=16).double()
    three = SparK(ToyEncoder(2, (6, 12), ((1, 4, 4), (1, 8, 8)), norm, spatial_dims=3), decoder_width=16).double()
    state3 = three.state_dict()
    assert state3.keys() == two.state_dict().keys()  # the same modules and names in every rank
    with torch.no_grad():
        for name, p3 in three.named_parameters():
            p3.copy_(_lift(dict(two.named_parameters())[name], p3, axis=2))
    return two, three


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_volume_of_depth_one_computes_what_the_image_computes(norm):
    two, three = _pair(norm, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 16, 24, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 1, 2, 3, generator=g) < 0.5
    mask[0, 0, 0, 0] = False
    loss2 = two(x, mask=mask)
    loss3 = three(x.unsqueeze(2), mask=mask.unsqueeze(2))
    torch.testing.assert_close(loss3, loss2, **TOL)
    loss2.backward()
    loss3.backward()
    grads2 = {n: p.grad for n, p in two.named_parameters()}
    for name, p3 in three.named_parameters():
        torch.testing.assert_close(p3.grad, _lift(grads2[name], p3.grad, axis=2), **TOL, msg=name)
    for (name, b2), b3 in zip(two.named_buffers(), three.buffers()):
        torch.testing.assert_close(b3, b2, **TOL, msg=name)  # running statistics
    two.eval()
    three.eval()
    pred2 = two.predict(x, mask)
    torch.testing.assert_close(three.predict(x.unsqueeze(2), mask.unsqueeze(2)).squeeze(2), pred2, **TOL)
    out2 = two.reconstruct(x, mask)
    out3 = three.reconstruct(x.unsqueeze(2), mask.unsqueeze(2))
    for key in out2:
        torch.testing.assert_close(out3[key].squeeze(2), out2[key], **TOL, msg=key)


def test_a_signal_computes_what_an_image_of_height_one_computes():
    # 2-D with strides (1, s) on (B, C, 1, W) images versus 1-D with strides s on (B, C, W) signals
    torch.manual_seed(0)
    one = SparK(ToyEncoder(2, (6, 12), (4, 8), "batch", spatial_dims=1), decoder_width=16).double()
    two = SparK(ToyEncoder(2, (6, 12), ((1, 4), (1, 8)), "batch"), decoder_width=16).double()
    with torch.no_grad():
        for name, p2 in two.named_parameters():
            p2.copy_(_lift(dict(one.named_parameters())[name], p2, axis=2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 32, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 1, 4, generator=g) < 0.5
    mask[0, 0, 0] = False
    loss1 = one(x, mask=mask)
    loss2 = two(x.unsqueeze(2), mask=mask.unsqueeze(2))
    torch.testing.assert_close(loss2, loss1, **TOL)
    loss1.backward()
    loss2.backward()
    grads1 = {n: p.grad for n, p in one.named_parameters()}
    for name, p2 in two.named_parameters():
        torch.testing.assert_close(p2.grad, _lift(grads1[name], p2.grad, axis=2), **TOL, msg=name)

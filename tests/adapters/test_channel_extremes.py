"""torch.max / torch.min over channels (CBAM's spatial attention) are per site: values and indices at
active sites equal the plain reduction of that site's gathered channel vector; values of a zero map
stay zero; over one spatial dim they are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

from ._helpers import TwoConv, check_contract, count_mask_multiplies, patch_mask, refusal

FORMS = {
    "torch.max(x, 1)[0]": lambda y: torch.max(y, 1)[0].unsqueeze(1),
    "torch.max(x, 1, keepdim=True).values": lambda y: torch.max(y, 1, keepdim=True).values,
    "x.max(dim=1)": lambda y: y.max(dim=1)[0].unsqueeze(1),
    "torch.min(x, 1) indices": lambda y: torch.min(y, 1)[1].unsqueeze(1).to(y.dtype),
    "x.min(1, True)": lambda y: y.min(1, True)[0],
    "argmax(1)": lambda y: y.argmax(1, keepdim=True).to(y.dtype),
    "torch.max(x)": lambda y: y * torch.max(y),
    "maximum(x, 0.5 x)": lambda y: torch.maximum(y, 0.5 * y),
}


class _Gate(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.c1 = nn.Conv2d(3, 5, 3, 2, 1)
        self.c2 = nn.Conv2d(1 if form not in ("torch.max(x)", "maximum(x, 0.5 x)") else 5, 4, 3, 2, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(FORMS[self.form](y))


@pytest.mark.parametrize("form", list(FORMS))
def test_channel_extremes_keep_the_contract(form):
    torch.manual_seed(0)
    check_contract(_Gate(form))


@pytest.mark.parametrize("form", ["torch.max(x, 1)[0]", "torch.min(x, 1) indices", "x.min(1, True)"])
def test_values_and_indices_equal_the_gathered_reduction(form):
    torch.manual_seed(0)
    model = _Gate(form)
    node = {"torch.max(x, 1)[0]": "unsqueeze", "torch.min(x, 1) indices": "to", "x.min(1, True)": "getitem"}[form]
    enc = sparsify.wrap(model, (16, 24), stages=[node, "c2"])
    x = torch.randn(2, 3, 16, 24)
    mask = patch_mask(2, (4, 6), seed=2)
    y = model.c1(x * F.interpolate(mask.float(), size=(16, 24)))
    m = F.interpolate(mask.float(), size=y.shape[-2:])[:, 0].bool()
    got, _ = enc(x, mask)
    for b in range(2):
        vectors = y[b][:, m[b]]  # (C, n) gathered channel vectors of the active sites
        values, indices = vectors.max(0) if "max" in form else vectors.min(0)
        expected = indices.to(y.dtype) if "indices" in form else values
        torch.testing.assert_close(got[b, 0][m[b]], expected)
        assert torch.all(got[b, 0][~m[b]] == 0)


def test_max_over_channels_of_a_zero_map_needs_no_mask_multiply():
    relu_max = TwoConv(first=lambda x: torch.cat([torch.max(F.relu(x), 1, keepdim=True)[0]] * 3, 1))
    base = count_mask_multiplies(check_contract(TwoConv()))
    assert count_mask_multiplies(check_contract(relu_max)) == base


def test_max_over_one_spatial_dim_is_refused_by_name():
    message = refusal(TwoConv(mid=lambda y: y * torch.max(y, 3, keepdim=True)[0]))
    assert "node 'max" in message and "spatial dim" in message

"""The elementwise-operator audit: every one-tensor elementwise operator torch lists is known, f(0)
is decided by evaluation, non-finite f(0) on a zero map is refused, and the multi-operand operators
(addcmul, addcdiv, lerp, where, comparisons, ...) combine their operands' mask states correctly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparsify.adapters._registry import registered_rule
from sparsify.adapters.elementwise import _torch_pointwise_names

from ._helpers import TwoConv, check_contract, count_mask_multiplies, refusal


@pytest.mark.parametrize("name", _torch_pointwise_names())
def test_every_elementwise_operator_torch_lists_has_a_rule(name):
    # torch's own list: public ops whose ATen kernel carries the ``pointwise`` tag
    if hasattr(torch, name):
        assert registered_rule(getattr(torch, name)) is not None, f"torch.{name}"
    if hasattr(torch.Tensor, name):
        assert registered_rule(name) is not None, f"Tensor.{name}"


KEEPS_ZERO = {
    "sinh": torch.sinh, "atan": torch.atan, "expm1": torch.expm1, "trunc": torch.trunc, "log1p(relu)":
    lambda x: torch.log1p(F.relu(x)), "threshold(0.1, 0)": lambda x: F.threshold(x, 0.1, 0.0),
    "nan_to_num": torch.nan_to_num, "addcmul": lambda x: torch.addcmul(x, x, x, value=0.5),
    "addcdiv": lambda x: torch.addcdiv(x, x, x.abs() + 1), "lerp": lambda x: torch.lerp(x, 2 * x, 0.25),
    "where": lambda x: torch.where(x > 0, x, 0.1 * x), "x * (x > 0)": lambda x: x * (x > 0),
    "hypot": lambda x: torch.hypot(x, x), "fmax(x, -x)": lambda x: torch.fmax(x, -x),
    "copysign": lambda x: torch.copysign(x, torch.ones_like(x)), "masked_fill": lambda x: x.masked_fill(x < 0, 0.0),
}
MAKES_DIRTY = {
    "cosh": torch.cosh, "erfc": torch.erfc, "threshold(0.1, 2)": lambda x: F.threshold(x, 0.1, 2.0),
    "addcmul(1 + ...)": lambda x: torch.addcmul(torch.ones(1), x, x),
    "lerp(x, 1, w)": lambda x: torch.lerp(x, torch.ones_like(x), 0.5), "x >= 0": lambda x: (x >= 0).to(x.dtype),
    "logaddexp": lambda x: torch.logaddexp(x, x),
}


@pytest.mark.parametrize("name", list(KEEPS_ZERO))
def test_operators_with_f0_zero_need_no_mask_multiply(name):
    base = count_mask_multiplies(check_contract(TwoConv()))
    enc = check_contract(TwoConv(first=KEEPS_ZERO[name]))
    assert count_mask_multiplies(enc) == base


@pytest.mark.parametrize("name", list(MAKES_DIRTY))
def test_operators_with_f0_nonzero_get_one_mask_multiply(name):
    base = count_mask_multiplies(check_contract(TwoConv()))
    enc = check_contract(TwoConv(first=MAKES_DIRTY[name]))
    assert count_mask_multiplies(enc) == base + 1


@pytest.mark.parametrize("fn, node", [(torch.log, "log"), (torch.reciprocal, "reciprocal"),
                                      (lambda x: x.rsqrt(), "rsqrt")])
def test_non_finite_at_zero_on_a_zero_map_is_refused(fn, node):
    message = refusal(TwoConv(first=fn))
    assert f"node '{node}'" in message and "not finite" in message


def test_addcdiv_by_a_zero_map_is_refused():
    message = refusal(TwoConv(first=lambda x: torch.addcdiv(x, x, x)))
    assert "node 'addcdiv'" in message and "0/0" in message

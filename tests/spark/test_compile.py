"""The whole SparK forward (mask, encoder, densify, decoder, loss) traces into one graph for
``torch.compile``: no graph break on any of the real models the contract is checked on.

Dynamo only (``torch._dynamo.explain``): a graph break is decided while tracing, so no inductor code
generation is needed to find one. A break would mean a host synchronisation (``.item()``,
``nonzero``, boolean indexing) or Python the compiler cannot follow in the step.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from test_real_models import TIMM_MODELS, TORCHVISION_KWARGS, TORCHVISION_MODELS

import sparsify
from sparsify.spark import SparK

pytestmark = pytest.mark.slow

MODELS = [f"timm:{n}" for n in TIMM_MODELS] + [f"tv:{n}" for n in TORCHVISION_MODELS]


def _model(name: str) -> torch.nn.Module:
    source, arch = name.split(":", 1)
    if source == "tv":
        return torchvision.models.get_model(arch, weights=None, **TORCHVISION_KWARGS.get(arch, {}))
    return timm.create_model(arch, pretrained=False)


@pytest.mark.parametrize("name", MODELS)
def test_spark_step_has_no_graph_break(name):
    torch.manual_seed(0)
    enc = sparsify.wrap(_model(name), (64, 64))
    spark = SparK(enc, mask_ratio=0.5, decoder_width=32).train()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(spark)(x)
    finally:
        torch._dynamo.reset()
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1

"""Real 3-D networks (MONAI, nnU-Net's dynamic_network_architectures, torchvision video), unmodified:
the whole contract in float64, train and eval (``sparsify.verify``: zero at masked sites, dense
equality against the model's own module outputs, canvas invariance, fully masked samples invisible,
shared parameters), the model's own returned pyramid where it returns one, and a SparK loss that falls
on a fixed batch.
"""

from __future__ import annotations

import pytest
import torch

import sparsify
from sparsify.spark import SparK
from sparsify.testing import preserved_state

from .models import CASES, VolumeCase

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares a small machine; 3-D convs spread over every core otherwise
    yield
    torch.set_num_threads(threads)


def _params():
    return [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]


def _build(case: VolumeCase, dtype=torch.float64):
    torch.manual_seed(0)
    model = case.build().to(dtype)
    return model, sparsify.wrap(model, case.input_size, **case.wrap_kwargs)


@pytest.mark.parametrize("case", _params())
def test_volume_model_keeps_the_contract(case: VolumeCase):
    model, enc = _build(case)
    assert enc.spatial_dims == 3
    report = sparsify.verify(enc, batch=case.verify_batch)
    assert report.passed and report.results
    assert any("own outputs" in r.name for r in report.results), "no stage was compared with the model's modules"
    if case.returns_pyramid:
        # the model's own return value is the ground truth for every stage it returns (not only the
        # stage modules' hooks): it catches a trace that differs from eager in the model's own forward
        x = torch.randn(2, 1, *case.input_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for train in (True, False):
            with preserved_state(model, enc), torch.no_grad():
                expected = {tuple(f.shape): f for f in model.train(train)(x.clone())}
                got = enc.train(train)(x)
            for feature in got:
                torch.testing.assert_close(feature, expected[tuple(feature.shape)], atol=1e-10, rtol=1e-10)


def _smooth_volumes(batch: int, chans: int, size, seed: int = 0) -> torch.Tensor:
    """Smooth random volumes: learnable structure, unlike white noise."""
    low = torch.randn(batch, chans, *(max(1, s // 8) for s in size), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=size, mode="trilinear", align_corners=False)


@pytest.mark.parametrize("case", _params())
def test_volume_model_spark_loss_falls(case: VolumeCase):
    _, enc = _build(case, torch.float32)
    spark = SparK(enc, decoder_width=32)
    x = _smooth_volumes(2, enc.in_chans, case.input_size)
    mask = spark.draw_mask(x, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(spark.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        loss = spark(x, mask=mask)
        assert torch.isfinite(loss)
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(spark(x, mask=mask))
    # SparK's loss starts near 1 (normalised patches, a fresh decoder); a few steps must move it down
    assert last < 0.95 * losses[0], f"{case.name}: loss {losses[0]:.4f} -> {last:.4f} in 12 steps ({losses})"

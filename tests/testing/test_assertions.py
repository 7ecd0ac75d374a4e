"""The contract assertions of sparsify.testing, exercised on hand-written toy encoders.

These do not depend on ``sparsify.wrap``: a toy encoder written by hand is correct or broken on
purpose, and the assertions must tell which.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.testing import (
    assert_canvas_invariant,
    assert_dense_equal,
    assert_masked_samples_invisible,
    assert_matches_reference,
    assert_sparse_semantics,
    assert_zero_at_masked,
    gather_active,
    reference_batch_norm,
    reference_group_norm,
    scatter_active,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(6)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn2.running_var.uniform_(0.5, 2)


def _masked_bn(bn: nn.BatchNorm2d, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """A simple masked BatchNorm (statistics over active sites only)."""
    if not bn.training:
        return bn(x) * m
    mf = m.float()
    n = mf.sum().clamp_min(1.0)
    mean = (x * mf).sum((0, 2, 3)) / n
    var = (((x - mean.view(1, -1, 1, 1)) * mf) ** 2).sum((0, 2, 3)) / n
    with torch.no_grad():
        bn.running_mean.lerp_(mean, bn.momentum)
        bn.running_var.lerp_(var * n / (n - 1).clamp_min(1.0), bn.momentum)
        bn.num_batches_tracked.add_(1)
    y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    return (y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)) * mf


class ToyEncoder(nn.Module):
    """conv-BN-sigmoid x2 as a sparse encoder; ``bug`` selects a deliberate contract violation."""

    downsample_ratio = 4
    feature_strides = [2, 4]
    feature_channels = [4, 6]
    in_chans = 3
    input_size = (8, 12)

    def __init__(self, net: Net, bug: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.bug = bug
        self.stages = [
            types.SimpleNamespace(name=n, stride=s, channels=c) for n, s, c in (("bn1", 2, 4), ("bn2", 4, 6))
        ]

    def forward(self, x, mask=None):
        n = self.net
        if mask is None:
            return [f * 1 for f in self.dense_encoder()(x)]
        m1 = F.interpolate(mask.float(), scale_factor=2, mode="nearest")
        m0 = F.interpolate(mask.float(), scale_factor=4, mode="nearest")
        if self.bug != "no_input_mask":
            x = x * m0
        h = n.conv1(x)
        if self.bug == "dense_bn":
            f1 = n.bn1(h) * m1
        else:
            f1 = _masked_bn(n.bn1, h, m1)
        a = torch.sigmoid(f1)  # sigmoid(0) = 0.5 at masked sites: dirty
        if self.bug != "no_remask":
            a = a * m1
        h = n.conv2(a)
        f2 = _masked_bn(n.bn2, h, mask.float())
        if self.bug == "leak_output":
            f2 = f2 + 0.1 * (1 - mask.float())
        return [f1, f2]

    def dense_encoder(self) -> nn.Module:
        net = self.net

        class Dense(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x):
                f1 = self.net.bn1(self.net.conv1(x))
                f2 = self.net.bn2(self.net.conv2(torch.sigmoid(f1)))
                return [f1, f2]

        return Dense()


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 12, generator=g)
    mask = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 1, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    return x, mask.unsqueeze(1)


def test_correct_toy_encoder_passes_everything(case):
    x, mask = case
    enc = ToyEncoder(Net())
    results = assert_sparse_semantics(enc, x, mask)
    names = {r.name.split(" (")[0] for r in results}
    assert {
        "zero at masked sites",
        "dense equality",
        "canvas invariance",
        "fully masked samples invisible",
    } <= names
    assert all(r.passed for r in results)


def test_state_is_restored(case):
    x, mask = case
    net = Net()
    net.bn2.eval()  # a mixed-mode model: flags must come back exactly
    before = {k: v.clone() for k, v in net.state_dict().items()}
    enc = ToyEncoder(net)
    torch.manual_seed(5)
    expected_rand = torch.rand(2)
    torch.manual_seed(5)
    assert_sparse_semantics(enc, x, mask)
    assert torch.equal(torch.rand(2), expected_rand)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net.training and net.bn1.training and not net.bn2.training


@pytest.mark.parametrize(
    "bug, check, message",
    [
        ("no_input_mask", assert_canvas_invariant, "canvas invariance"),
        ("dense_bn", assert_canvas_invariant, "[train]"),
        ("dense_bn", assert_masked_samples_invisible, "fully masked samples invisible"),
        # sigmoid(0) at masked sites only reaches a strided conv through its left/top padding
        ("no_remask", functools.partial(assert_canvas_invariant, pad=(1, 1, 0, 0)), "top 1, left 1"),
        ("leak_output", assert_zero_at_masked, "zero at masked sites"),
    ],
)
def test_each_bug_is_caught_by_its_check(case, bug, check, message):
    x, mask = case
    enc = ToyEncoder(Net(), bug=bug)
    with pytest.raises(AssertionError) as info:
        check(enc, x, mask)
    assert message in str(info.value)
    assert "FAIL" in str(info.value) and "feature" in str(info.value)


def test_dense_equality_catches_a_wrong_dense_path(case):
    x, _ = case
    enc = ToyEncoder(Net())
    enc.forward = lambda x, mask=None: [f + 1e-3 for f in ToyEncoder.forward(enc, x, mask)]
    with pytest.raises(AssertionError, match="dense equality"):
        assert_dense_equal(enc, x)


def test_report_lists_every_failing_check(case):
    x, mask = case
    with pytest.raises(AssertionError) as info:
        assert_sparse_semantics(ToyEncoder(Net(), bug="no_input_mask"), x, mask)
    text = str(info.value)
    assert "checks failed" in text and "ToyEncoder" in text and "visible patches per sample" in text
    assert text.count("FAIL") >= 2  # canvas invariance in train and eval mode


def test_random_input_and_mask_when_not_given():
    enc = ToyEncoder(Net())
    results = assert_sparse_semantics(enc, batch=2, generator=torch.Generator().manual_seed(3))
    assert all(r.passed for r in results)


def test_gather_scatter_round_trip(case):
    x, mask = case
    rows = gather_active(x, mask)
    assert rows.shape == (int(mask.sum()) * 16, 3)
    back = scatter_active(rows, mask, x.shape)
    m = F.interpolate(mask.float(), size=x.shape[-2:], mode="nearest")
    assert torch.equal(back, x * m)


@pytest.mark.parametrize("train", [True, False])
def test_reference_batch_norm_matches_a_masked_bn(case, train):
    x, mask = case
    bn = Net().bn1
    bn.train(train)
    h = torch.randn(3, 4, 8, 12)
    m = F.interpolate(mask.float(), size=(8, 12), mode="nearest")
    saved = {k: v.clone() for k, v in bn.state_dict().items()}
    out = _masked_bn(bn, h, m)
    bn.load_state_dict(saved)
    assert_matches_reference(out, reference_batch_norm(bn), h, mask)
    with pytest.raises(AssertionError, match="adapter vs reference"):
        assert_matches_reference(bn(h) * m, reference_batch_norm(bn), h, mask) if train else (
            assert_matches_reference(out + 1e-2, reference_batch_norm(bn), h, mask)
        )


def test_reference_group_norm():
    gn = nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 4, 6)
    mask = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    mask[:, :, :, 0] = True
    # Samples whose visible part is the left third: group norm over that region alone.
    expected = torch.zeros_like(x)
    expected[..., :2] = gn(x[..., :2])
    assert_matches_reference(expected, reference_group_norm(gn), x, mask)


class _RoundingEncoder(ToyEncoder):
    """Correct, but its features go through a large intermediate value: fp32 rounding of ~1e-3."""

    def forward(self, x, mask=None):
        return [(f + 1e4) - 1e4 for f in super().forward(x, mask)]


def test_fp64_witness_separates_rounding_from_violations(case):
    x, mask = case
    enc = _RoundingEncoder(Net())
    with pytest.raises(AssertionError, match="dense equality"):
        assert_dense_equal(enc, x, fp64_witness=False)
    results = assert_sparse_semantics(enc, x, mask)  # the witness explains the fp32 rounding
    assert any("fp64 twin" in r.tolerance for r in results)
    assert next(p for p in Net().parameters()).dtype == torch.float32


def test_fp64_witness_does_not_excuse_a_leak(case):
    x, mask = case
    enc = ToyEncoder(Net(), bug="no_input_mask")
    with pytest.raises(AssertionError, match="canvas invariance") as info:
        assert_canvas_invariant(enc, x, mask)
    assert "fp32 rounding of the two sides" in str(info.value)
    assert next(enc.parameters()).dtype == torch.float32  # the model was never converted

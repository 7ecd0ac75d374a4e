"""benchmarks/coverage.py helpers: --only prefixes, additive attention counted as attention, documented sizes."""

from __future__ import annotations

import pytest
import torch

from benchmarks import coverage


def test_only_takes_sources_and_name_prefixes():
    assert coverage._selected("timm", "timm", "resnet18", "resnet")
    assert not coverage._selected("torchvision", "timm", "resnet18", "resnet")
    assert coverage._selected("swift,res", "timm", "resnet18", "resnet")
    assert coverage._selected("video/", "torchvision", "s3d", "video/s3d")
    assert not coverage._selected("mvit", "torchvision", "s3d", "video/s3d")


def test_token_weights_match_additive_attention_not_context_pooling():
    positions = {64 * 64 >> (2 * k) for k in range(7)}
    tokens = torch.randn(2, 16 * 16, 1)  # SwiftFormer: (B, N, 1) normalised over the N positions
    assert coverage._token_weights("normalize", (tokens,), {"dim": 1}, positions)
    assert coverage._token_weights("softmax", (torch.randn(2, 256, 4), 1), {}, positions)
    # A global-context block's logits (B, 1, N) or (B, N), and channel normalisations, are not attention.
    assert not coverage._token_weights("softmax", (torch.randn(2, 1, 256),), {"dim": -1}, positions)
    assert not coverage._token_weights("softmax", (torch.randn(2, 256),), {"dim": 1}, positions)
    assert not coverage._token_weights("normalize", (torch.randn(2, 256, 64),), {"dim": -1}, positions)
    assert not coverage._token_weights("normalize", (torch.randn(2, 32, 16, 16),), {}, positions)


@pytest.mark.slow
def test_additive_attention_and_documented_sizes():
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    assert coverage.uses_attention("timm", "swiftformer_xs", {}, (224, 224))
    assert not coverage.uses_attention("timm", "gcresnet26ts", {}, (224, 224))  # context pooling
    assert coverage._default_size("torchvision", "mvit_v1_b", 3) == (16, 224, 224)
    assert coverage._default_size("torchvision", "s3d", 3) == (16, 224, 224)
    assert coverage._default_size("torchvision", "r3d_18", 3) == (16, 112, 112)

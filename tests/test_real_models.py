"""The contract over real timm and torchvision networks, and clear refusals of attention hybrids.

Every model is built without weights. Sizes are small and non-square to keep the suite fast and to
exercise non-square inputs; checks run in train and eval mode (sparsify.testing).
"""

import pytest
import timm
import torch
import torchvision

import sparsify
from sparsify.testing import assert_sparse_semantics

TIMM_MODELS = ["resnet50", "resnet18d", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100",
               "regnety_002", "densenet121", "resnet50_gn", "cspresnet50", "vgg11_bn"]
TORCHVISION_MODELS = ["resnet18", "mobilenet_v3_small", "convnext_tiny", "efficientnet_b0",
                      "shufflenet_v2_x0_5"]
# Stochastic depth draws one random number per sample, so appending a sample changes the others'
# draws: switch it off for torchvision models that enable it by default.
TORCHVISION_KWARGS = {"efficientnet_b0": {"stochastic_depth_prob": 0.0},
                      "convnext_tiny": {"stochastic_depth_prob": 0.0}}


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_keeps_the_contract(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    results = assert_sparse_semantics(model, input_size=(64, 96), batch=2,
                                      generator=torch.Generator().manual_seed(0))
    assert results and all(r.passed for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_model_keeps_the_contract(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **TORCHVISION_KWARGS.get(name, {}))
    results = assert_sparse_semantics(model, input_size=(96, 64), batch=2,
                                      generator=torch.Generator().manual_seed(0))
    assert results and all(r.passed for r in results)


@pytest.mark.parametrize("name, size", [("resnet50", (64, 96)), ("convnext_atto", (96, 64)),
                                        ("efficientnet_b0", (64, 64))])
def test_pyramid_of_real_models(name, size):
    enc = sparsify.wrap(timm.create_model(name, pretrained=False), size)
    assert enc.feature_strides == [4, 8, 16, 32]
    feats = enc(torch.randn(1, 3, *size), sparsify.random_mask(1, (size[0] // 32, size[1] // 32)))
    assert [f.shape[1] for f in feats] == enc.feature_channels


def test_convnext_stage_ends_before_the_next_downsample_norm():
    model = timm.create_model("convnext_atto", pretrained=False)
    enc = sparsify.wrap(model, (64, 64))
    assert enc.feature_channels == [40, 80, 160, 320]
    # the stride-4 feature is stage 0's output, not the LayerNorm of stage 1's downsample layer
    assert "downsample" not in enc.stages[0].name


@pytest.mark.parametrize("name", ["coatnet_nano_rw_224", "levit_128s", "mobilevit_xxs"])
def test_attention_hybrids_are_refused_clearly(name):
    model = timm.create_model(name, pretrained=False)
    with pytest.raises(sparsify.SparsifyError) as info:
        sparsify.wrap(model, (224, 224))
    message = str(info.value)
    assert ("attention" in message.lower()) or ("no adapter" in message and "MobileVitBlock" in message)
    assert "stages.2" in message or "stages.0" in message  # names where it happens

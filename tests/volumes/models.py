"""Real 3-D networks for the suite, unmodified, at the smallest widths and sizes their constructors allow.

Each case says how to build the model, the example input size, and the ``wrap`` arguments: a model
that returns its pyramid (nnU-Net encoders with ``return_skips=True``) gets its returned maps; a
segmentation UNet is cut at its encoder by naming the encoder modules as stages (everything after
the last stage, the decoder included, is cut away).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

#: nnU-Net's plan for thick slices (issue 15): no stride in depth at the first and last downsampling.
NNUNET_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]


@dataclass(frozen=True)
class VolumeCase:
    name: str
    build: Callable[[], nn.Module]
    input_size: tuple[int, int, int]
    wrap_kwargs: dict[str, Any] = field(default_factory=dict)
    returns_pyramid: bool = False  # the model's own output is the pyramid (compare with it directly)
    slow: bool = False
    # samples per verify batch: 1 for the costliest models (batch statistics across samples are covered
    # by the other cases and the adapter tests; one sample still has thousands of sites per channel)
    verify_batch: int = 2


def _dna_unet(kind: str) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    common = dict(input_channels=1, n_stages=5, features_per_stage=[4, 8, 8, 16, 16], conv_op=nn.Conv3d,
                  kernel_sizes=3, strides=NNUNET_STRIDES, num_classes=2, n_conv_per_stage_decoder=1,
                  conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    if kind == "resenc":
        return ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2, 2, 2], **common)
    return PlainConvUNet(n_conv_per_stage=2, **common)


def _dna_encoder(kind: str) -> nn.Module:
    encoder = _dna_unet(kind).encoder
    assert encoder.return_skips  # the UNet's encoder returns every stage's output
    return encoder


def _monai(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from monai.networks import nets

        return getattr(nets, name)(**kwargs)

    return build


def _mc3_18() -> nn.Module:
    import torchvision

    return torchvision.models.video.mc3_18(weights=None)


CASES: list[VolumeCase] = [
    # the two: MONAI's MedicalNet ResNet-10, nnU-Net's residual encoder with anisotropic strides
    # (32, 64, 64), not the 64^3: the whole contract at 64^3 took 325 s of the suite's 15 minutes;
    # half the depth gives a 1x2x2 mask grid at its stride 32.
    # A quarter of MedicalNet's widths (16..128 channels): the same layers and strides at a sixteenth
    # of the float64 convolution cost.
    VolumeCase("monai_resnet10", _monai("resnet10", spatial_dims=3, n_input_channels=1, num_classes=2,
                                        widen_factor=0.25), (32, 64, 64), slow=True, verify_batch=1),
    VolumeCase("dna_resenc_encoder", lambda: _dna_encoder("resenc"), (16, 64, 64), returns_pyramid=True),
    VolumeCase("dna_plainconv_encoder", lambda: _dna_encoder("plain"), (16, 64, 64), returns_pyramid=True),
    VolumeCase("monai_densenet121", _monai("DenseNet121", spatial_dims=3, in_channels=1, out_channels=2,
                                           init_features=8, growth_rate=4, bn_size=2), (32, 64, 64)),
    VolumeCase("monai_seresnet", _monai("SENet", spatial_dims=3, in_channels=1, block="se_resnet_bottleneck",
                                        layers=(1, 1, 1, 1), groups=1, reduction=4, inplanes=16,
                                        downsample_kernel_size=1, input_3x3=False, num_classes=2), (32, 64, 64),
               slow=True),
    VolumeCase("monai_segresnet_encoder", _monai("SegResNet", spatial_dims=3, init_filters=8, in_channels=1,
                                                 out_channels=2), (16, 32, 32),
               {"stages": ["down_layers.1", "down_layers.2", "down_layers.3"]}, slow=True),
    VolumeCase("monai_dynunet_encoder", _monai("DynUNet", spatial_dims=3, in_channels=1, out_channels=2,
                                               kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                               upsample_kernel_size=[2, 2, 2], filters=[4, 8, 8, 16]),
               (32, 32, 32), {"stages": ["downsamples.0", "downsamples.1", "bottleneck"]}),
    VolumeCase("monai_unet_encoder", _monai("UNet", spatial_dims=3, in_channels=1, out_channels=2,
                                            channels=(4, 8, 16, 16), strides=(2, 2, 2)), (32, 32, 32),
               {"stages": ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.1.submodule"]}),
    # one block per stage, not two: MedNeXt's 7^3 depthwise convolutions on the canvas checks' larger
    # inputs cost most of the suite's 3-D time, and a second identical block adds no new pattern
    VolumeCase("monai_mednext_encoder", _monai("MedNeXt", spatial_dims=3, init_filters=4, in_channels=1,
                                               out_channels=2, blocks_down=(1, 1, 1, 1), blocks_bottleneck=1,
                                               blocks_up=(1, 1, 1, 1)), (16, 32, 32),
               {"stages": ["enc_stages.1", "enc_stages.2", "enc_stages.3", "bottleneck"]}, slow=True, verify_batch=1),
    VolumeCase("tv_mc3_18", _mc3_18, (8, 32, 32), slow=True),
]

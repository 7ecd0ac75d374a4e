"""Make docs/volume_reconstruction.png: SparK on 3-D phantoms with nnU-Net's residual encoder.

A small ``ResidualEncoderUNet(...).encoder`` (InstanceNorm3d, unmodified) is pretrained for a few
hundred steps on random ellipsoid phantoms (fresh ones every step), then reconstructs a phantom it has
not seen; the picture shows axial, coronal and sagittal slices of input | masked | prediction |
prediction in visible input. CPU, a few minutes (ten on a busy 2-core machine):

    python docs/volume_reconstruction.py [--steps 300] [--out docs/volume_reconstruction.png]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

import sparsify

SIZE = (32, 32, 32)


def phantoms(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Volumes of a few overlapping ellipsoids of random size, position and intensity, plus noise."""
    axes = [torch.linspace(-1, 1, s) for s in SIZE]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    out = torch.zeros(batch, 1, *SIZE)
    for b in range(batch):
        for _ in range(4):
            centre = torch.rand(3, generator=generator) * 1.2 - 0.6
            radius = torch.rand(3, generator=generator) * 0.5 + 0.2
            value = torch.rand(1, generator=generator).item() * 2 - 0.5
            inside = (((z - centre[0]) / radius[0]) ** 2 + ((y - centre[1]) / radius[1]) ** 2
                      + ((x - centre[2]) / radius[2]) ** 2) <= 1
            out[b, 0][inside] += value
    return out + 0.05 * torch.randn(out.shape, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="docs/volume_reconstruction.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = ResidualEncoderUNet(1, 5, [8, 16, 32, 32, 32], nn.Conv3d, 3, [1, 2, 2, 2, 2], [1, 1, 1, 1, 1],
                               num_classes=2, n_conv_per_stage_decoder=1, conv_bias=True,
                               norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    enc = sparsify.wrap(unet.encoder, input_size=SIZE, patch_size=8)  # 8^3 mask blocks, total stride 16
    # loss="mse": the prediction is in the input's units, so the picture shows what the model inferred
    # (the default loss shows masked patches rescaled with their own true mean and std)
    spark = sparsify.SparK(enc, mask_ratio=0.6, decoder_width=128, loss="mse")
    opt = torch.optim.AdamW(spark.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        loss = spark(phantoms(4, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f}", flush=True)
    spark.eval()
    with torch.no_grad():
        out = spark.reconstruct(phantoms(1, torch.Generator().manual_seed(12345)))
    sparsify.save_reconstructions(out, args.out, columns=("input", "masked", "reconstruction", "composite"),
                                  labels=True, num_slices=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

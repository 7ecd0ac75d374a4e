"""Pretrain your own CNN with SparK inside your own training loop, then export its weights.

Run as is for a short demo on random images; the environment variables only shrink it for tests.
"""

import os

import timm
import torch
import torchvision
import torchvision.transforms as T

import sparsify

name, size = os.environ.get("EXAMPLE_MODEL", "resnet50"), int(os.environ.get("EXAMPLE_SIZE", 224))
batch, steps = int(os.environ.get("EXAMPLE_BATCH", 32)), int(os.environ.get("EXAMPLE_STEPS", 20))
out = os.environ.get("EXAMPLE_OUT", f"{name}_spark.safetensors")
device = "cuda" if torch.cuda.is_available() else "cpu"
# Your data: any loader of (images, anything) with images (B, C, H, W), H and W multiples of 32.
data = torchvision.datasets.FakeData(batch * steps, (3, size, size), transform=T.ToTensor())
loader = torch.utils.data.DataLoader(data, batch_size=batch, drop_last=True)

# --- the ten lines ---
model = timm.create_model(name, pretrained=False)                  # any CNN, e.g. your own nn.Module
enc = sparsify.wrap(model, input_size=(size, size))                 # sparse encoder sharing its weights
spark = sparsify.SparK(enc, mask_ratio=0.6).to(device)              # masks, densify, decoder, loss
opt = torch.optim.AdamW(spark.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.04)
for images, _ in loader:
    loss = spark(images.to(device))                                 # fresh random mask per sample
    opt.zero_grad()
    loss.backward()
    opt.step()
sparsify.export_backbone(spark, out)                                # model's own weights, original names

# Later: load them into a fresh model, e.g. to fine-tune on 10 classes.
finetune = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=out))
print(f"final loss {loss.item():.4f}; backbone saved to {out}")

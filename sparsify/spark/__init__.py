"""SparK masked pretraining around a sparse encoder (images, volumes, signals): densify, generated decoder,
loss, pictures, export."""

from .decoder import LightDecoder, decoder_steps
from .densify import Densify, MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d
from .export import backbone_metadata, export_backbone, load_backbone
from .loss import masked_mse_loss, masked_patch_loss
from .model import SparK
from .reconstruct import save_reconstructions

__all__ = [
    "SparK",
    "save_reconstructions",
    "export_backbone",
    "load_backbone",
    "backbone_metadata",
    "masked_patch_loss",
    "masked_mse_loss",
    "LightDecoder",
    "decoder_steps",
    "Densify",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedBatchNorm3d",
]

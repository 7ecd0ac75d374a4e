"""SparK masked pretraining around a sparse encoder: densify, generated decoder, loss, pictures, export."""

from .decoder import LightDecoder, decoder_steps
from .densify import Densify, MaskedBatchNorm2d
from .export import backbone_metadata, export_backbone, load_backbone
from .loss import masked_patch_loss
from .model import SparK
from .reconstruct import save_reconstructions

__all__ = [
    "SparK",
    "save_reconstructions",
    "export_backbone",
    "load_backbone",
    "backbone_metadata",
    "masked_patch_loss",
    "LightDecoder",
    "decoder_steps",
    "Densify",
    "MaskedBatchNorm2d",
]

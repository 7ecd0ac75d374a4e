"""sparsify: SparK-style masked pretraining for any convolutional network.

``sparsify.wrap(model)`` rewrites an unmodified CNN's torch.fx graph into a sparse encoder whose
convolutions, normalisations and pooling treat masked image patches as absent; ``sparsify.SparK``
adds densify, a generated UNet decoder and the masked-patch loss.
"""

from . import testing  # contract assertions; its Hypothesis strategies load lazily
from .adapters import register_adapter
from .encoder import SparseEncoder, graph_node_names, wrap
from .errors import SparsifyError
from .masking import random_mask
from .spark import SparK, export_backbone, save_reconstructions
from .stages import Stage
from .verify import verify

__version__ = "0.1.0"

__all__ = [
    "SparK",
    "SparseEncoder",
    "SparsifyError",
    "Stage",
    "__version__",
    "export_backbone",
    "graph_node_names",
    "random_mask",
    "register_adapter",
    "save_reconstructions",
    "testing",
    "verify",
    "wrap",
]

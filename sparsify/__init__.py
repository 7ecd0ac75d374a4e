"""sparsify: SparK-style masked pretraining for any convolutional network.

``sparsify.wrap(model)`` rewrites an unmodified CNN's torch.fx graph into a sparse encoder whose
convolutions, normalisations and pooling treat masked image patches as absent; ``sparsify.SparK``
adds densify, a generated UNet decoder and the masked-patch loss.
"""

from .errors import SparsifyError
from .masking import random_mask

__version__ = "0.1.0"

# --- core (wrap) ---
from .adapters import register_adapter
from .encoder import SparseEncoder, graph_node_names, wrap
from .stages import Stage
# --- spark model (helper block: SparK, save_reconstructions, export_backbone) ---

__all__ = [
    "SparsifyError", "random_mask", "__version__", "wrap", "SparseEncoder", "Stage", "graph_node_names",
    "register_adapter",
]

"""sparsify: SparK-style masked pretraining for any convolutional network.

``sparsify.wrap(model)`` rewrites an unmodified CNN's torch.fx graph into a sparse encoder whose
convolutions, normalisations and pooling treat masked image patches as absent; ``sparsify.SparK``
adds densify, a generated UNet decoder and the masked-patch loss.

The public names load on first use (PEP 562), so ``import sparsify.errors`` or a recipe's ``--help``
does not pay for importing torch, timm and the adapters.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import SparsifyError

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "SparK": ".spark",
    "export_backbone": ".spark",
    "save_reconstructions": ".spark",
    "SparseEncoder": ".encoder",
    "graph_node_names": ".encoder",
    "wrap": ".encoder",
    "random_mask": ".masking",
    "register_adapter": ".adapters",
    "Stage": ".stages",
    "verify": ".verify",
}
_SUBMODULES = (
    "adapters", "analyse", "encoder", "masking", "modes", "rewrite", "spark", "stages", "testing", "trace", "verify"
)

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

if TYPE_CHECKING:  # static tools see the eager imports
    from . import testing
    from .adapters import register_adapter
    from .encoder import SparseEncoder, graph_node_names, wrap
    from .masking import random_mask
    from .spark import SparK, export_backbone, save_reconstructions
    from .stages import Stage
    from .verify import verify


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))

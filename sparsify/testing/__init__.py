"""Test helpers for sparse encoders and adapters: Hypothesis strategies and contract assertions.

Use them to check a mask-aware adapter for your own layer::

    import torch.nn as nn
    from sparsify.testing import assert_sparse_semantics

    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), MyLayer(8), nn.Conv2d(8, 8, 3, 2, 1))
    assert_sparse_semantics(model, input_size=(32, 48))   # wraps with sparsify.wrap, checks all

or as a Hypothesis property over random inputs and masks (``sparsify.testing.strategies``), or over
random CNNs (``strategies.cnn_cases()``, :mod:`sparsify.testing.random_cnn`). The ``strategies``
submodule needs the ``hypothesis`` package (``pip install sparsify-cnn[test]``); the assertions do not.
"""

from .assertions import (
    CheckResult,
    assert_canvas_invariant,
    assert_dense_equal,
    assert_masked_samples_invisible,
    assert_matches_reference,
    assert_shares_parameters,
    assert_sparse_semantics,
    assert_zero_at_masked,
    capture_module_outputs,
    check_canvas_invariant,
    check_dense_equal,
    check_masked_samples_invisible,
    check_model_untouched,
    check_shares_parameters,
    check_zero_at_masked,
    default_canvas_pads,
    fixed_draws,
    format_results,
    gather_active,
    preserved_state,
    reference_batch_norm,
    reference_group_norm,
    reference_instance_norm,
    rounding_allowance,
    rounding_layers,
    run_contract_checks,
    scatter_active,
)
from .random_cnn import CNNSpec, RandomCNN, build_cnn

__all__ = [
    "CNNSpec",
    "CheckResult",
    "RandomCNN",
    "assert_canvas_invariant",
    "assert_dense_equal",
    "assert_masked_samples_invisible",
    "assert_matches_reference",
    "assert_shares_parameters",
    "assert_sparse_semantics",
    "assert_zero_at_masked",
    "build_cnn",
    "capture_module_outputs",
    "check_canvas_invariant",
    "check_dense_equal",
    "check_masked_samples_invisible",
    "check_model_untouched",
    "check_shares_parameters",
    "check_zero_at_masked",
    "default_canvas_pads",
    "fixed_draws",
    "format_results",
    "gather_active",
    "masks",
    "images",
    "random_cnns",
    "preserved_state",
    "reference_batch_norm",
    "reference_group_norm",
    "reference_instance_norm",
    "rounding_allowance",
    "rounding_layers",
    "run_contract_checks",
    "scatter_active",
    "strategies",
]


def __getattr__(name: str):
    # Hypothesis is a test extra: import the strategies lazily so `import sparsify` never needs it.
    if name in ("strategies", "masks", "images", "random_cnns"):
        import importlib

        strategies = importlib.import_module(".strategies", __name__)
        return strategies if name == "strategies" else getattr(strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The contract assertions, gathered from their one-check-per-file modules.

Kept so that ``from sparsify.testing.assertions import ...`` keeps working; new code can import the
same names from :mod:`sparsify.testing`. Where each check lives:

* ``_zero``: zero at masked sites; ``_dense``: dense equality with nothing masked;
  ``_canvas``: canvas invariance; ``_batch``: fully masked samples invisible;
  ``_sharing``: parameter sharing and the model left untouched; ``_contract``: all of them
  (:func:`assert_sparse_semantics`, :func:`run_contract_checks`);
* ``_reference``: gather-based references for one adapter (:func:`assert_matches_reference`);
* ``_hooks``: the unmodified model's own module outputs (:func:`capture_module_outputs`);
* ``_draws``: random draws held at their most likely value (:func:`fixed_draws`);
* infrastructure: ``_results`` (:class:`CheckResult`, tolerances), ``_state``
  (:func:`preserved_state`), ``_compare``, ``_geometry``, ``_witness`` (the float64 rounding witness).
"""

from __future__ import annotations

from ._batch import assert_masked_samples_invisible, check_masked_samples_invisible
from ._canvas import assert_canvas_invariant, check_canvas_invariant, default_canvas_pads
from ._contract import assert_sparse_semantics, run_contract_checks
from ._dense import assert_dense_equal, check_dense_equal
from ._draws import fixed_draws
from ._hooks import capture_module_outputs
from ._reference import (
    assert_matches_reference,
    gather_active,
    reference_batch_norm,
    reference_group_norm,
    reference_instance_norm,
    scatter_active,
)
from ._results import ATOL, DENSE_ATOL, DENSE_RTOL, RTOL, CheckResult, format_results
from ._sharing import assert_shares_parameters, check_model_untouched, check_shares_parameters
from ._state import preserved_state
from ._witness import ROUNDING_CONSTANT, rounding_allowance, rounding_layers
from ._zero import assert_zero_at_masked, check_zero_at_masked

__all__ = [
    "ATOL",
    "DENSE_ATOL",
    "DENSE_RTOL",
    "ROUNDING_CONSTANT",
    "RTOL",
    "CheckResult",
    "assert_canvas_invariant",
    "assert_dense_equal",
    "assert_masked_samples_invisible",
    "assert_matches_reference",
    "default_canvas_pads",
    "assert_shares_parameters",
    "assert_sparse_semantics",
    "assert_zero_at_masked",
    "capture_module_outputs",
    "check_canvas_invariant",
    "check_dense_equal",
    "check_masked_samples_invisible",
    "check_model_untouched",
    "check_shares_parameters",
    "check_zero_at_masked",
    "fixed_draws",
    "format_results",
    "gather_active",
    "preserved_state",
    "reference_batch_norm",
    "reference_group_norm",
    "reference_instance_norm",
    "rounding_allowance",
    "rounding_layers",
    "run_contract_checks",
    "scatter_active",
]

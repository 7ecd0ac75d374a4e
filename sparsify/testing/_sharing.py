"""Checks: the encoder shares the model's parameter and buffer objects; wrapping leaves the model untouched."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._results import CheckResult, _raise_if_failed
from ._state import _forward, preserved_state


def check_shares_parameters(enc: nn.Module, model: nn.Module) -> CheckResult:
    """Every parameter and buffer of ``enc`` must be the very object ``model`` holds under the same
    state_dict name (so training the encoder trains the model)."""
    model_sd = model.state_dict(keep_vars=True)
    enc_sd = enc.state_dict(keep_vars=True)
    problems = []
    for name, t in enc_sd.items():
        if name not in model_sd:
            problems.append(f"{name!r} is not a state_dict entry of the model")
        elif model_sd[name] is not t:
            problems.append(f"{name!r} is a different tensor object from the model's")
    if not enc_sd:
        params = {id(p) for p in model.parameters()}
        if params and not any(id(p) in params for p in enc.parameters()):
            problems.append("the encoder holds none of the model's parameters")
    detail = "\n".join(problems[:10]) + (f"\n... and {len(problems) - 10} more" if len(problems) > 10 else "")
    return CheckResult(
        "parameters shared with the model",
        "",
        not problems,
        float(len(problems)),
        1.0,
        "0 mismatches",
        detail,
    )


def _model_fingerprint(model: nn.Module) -> tuple:
    structure = tuple((name, type(m)) for name, m in model.named_modules())
    tensors = {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    flags = tuple(m.training for m in model.modules())
    return structure, tensors, flags


def check_model_untouched(model: nn.Module, before: tuple, x: torch.Tensor, out_before) -> CheckResult:
    """Compare ``model`` with a fingerprint taken before wrapping (see ``_model_fingerprint``)."""
    structure, tensors, flags = before
    s2, t2, f2 = _model_fingerprint(model)
    problems = []
    if structure != s2:
        problems.append("the module tree changed (submodules added, removed or replaced)")
    if flags != f2:
        problems.append("train/eval flags of some submodules changed")
    if tensors.keys() != t2.keys():
        problems.append(f"state_dict keys changed: {sorted(set(tensors) ^ set(t2))[:5]}")
    for k in tensors.keys() & t2.keys():
        if tensors[k][0] != t2[k][0]:
            problems.append(f"{k!r} was replaced by a different tensor object")
        elif not torch.equal(tensors[k][1], t2[k][1]):
            problems.append(f"{k!r} changed value")
    with preserved_state(model):
        out_after = _forward(model, x, train=False)
    if len(out_after) != len(out_before) or any(
        a.shape != b.shape or not torch.equal(a, b) for a, b in zip(out_after, out_before)
    ):
        problems.append("the model's own forward output changed")
    return CheckResult("model untouched", "", not problems, float(len(problems)), 1.0, "", "\n".join(problems[:10]))


def assert_shares_parameters(enc: nn.Module, model: nn.Module) -> None:
    """Assert the encoder uses ``model``'s own parameter and buffer objects under the same names."""
    _raise_if_failed([check_shares_parameters(enc, model)], "parameter sharing:")

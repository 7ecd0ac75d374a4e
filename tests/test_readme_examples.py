"""The README's adapter example works as written: register, wrap, verify."""

import torch
from sparsify.adapters import masked_moments

import sparsify
from sparsify.testing import assert_sparse_semantics


class MyNorm(torch.nn.Module):  # normalises each sample over (C, H, W)
    def forward(self, x):  # nanmean (no built-in rule) where the README has mean (now built in, as std)
        return (x - x.nanmean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-5)


def test_readme_custom_adapter_example():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), MyNorm(), torch.nn.Conv2d(8, 8, 3, 2, 1))
    # unregistered, MyNorm's statistics over space are refused, naming the operation
    try:
        sparsify.wrap(net, (32, 48))
    except sparsify.SparsifyError as error:
        assert "std" in str(error) or "mean" in str(error)
    else:
        raise AssertionError("MyNorm should be refused before an adapter is registered")

    @sparsify.register_adapter(MyNorm)
    def masked_my_norm(module, x, mask):
        if mask is None:
            return module(x)
        mean, var, n = masked_moments(x, mask, (1, 2, 3))
        return (x - mean) / (var * n / (n - 1) + 1e-10).sqrt().add(1e-5)

    results = assert_sparse_semantics(net, input_size=(32, 48))
    assert all(r.passed for r in results)


def test_readme_nd_example_runs_as_written():
    """The *N-d in the API* block runs and its comments state what it returns."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = readme.split("### N-d in the API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README N-d example", "exec"), scope)
    enc = scope["enc"]
    assert enc.spatial_dims == 3 and enc.feature_strides == [(2, 4, 4), (4, 8, 8), (8, 16, 16)]
    assert enc.downsample_ratio == (8, 16, 16) == enc.patch_size and scope["grid"] == (2, 4, 4)
    assert tuple(scope["mask"].shape) == (2, 1, 2, 4, 4)
    assert [tuple(f.shape[2:]) for f in scope["feats"]] == [(8, 16, 16), (4, 8, 8), (2, 4, 4)]

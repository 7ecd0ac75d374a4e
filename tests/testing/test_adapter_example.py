"""The README's "Writing and verifying an adapter" section runs as written, and checks what it claims."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _section_blocks(title: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], flags=re.S)


def _run_section() -> dict:
    blocks = _section_blocks("Writing and verifying an adapter")
    assert len(blocks) == 3  # the adapter, the contract check, the reference check
    namespace: dict = {"__name__": "readme_adapter_section"}  # functions need a module name (fx)
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace


def test_readme_adapter_section_runs_as_written():
    ns = _run_section()
    # the adapter received the encoder's mask form: a 0/1 map at its input's resolution
    seen = []
    x = torch.randn(2, 8, 16, 24, dtype=torch.float64)
    mask = ns["sparsify"].random_mask(2, (4, 6), ratio=0.5)

    def spy(x, m):
        seen.append(m)
        return ns["masked_my_norm"](ns["MyNorm"](), x, m)

    ns["assert_matches_reference"](spy, ns["reference_my_norm"], x, mask, zero_at_masked=False)
    assert seen[0].shape == (2, 1, 16, 24) and seen[0].dtype == torch.float32
    assert torch.equal(seen[0], mask.float().repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_the_reference_check_catches_a_wrong_adapter():
    ns = _run_section()
    x = torch.randn(2, 8, 16, 24, dtype=torch.float64)
    mask = ns["sparsify"].random_mask(2, (4, 6), ratio=0.5)
    check = ns["assert_matches_reference"]

    def biased(x, m):  # counts masked sites in its statistics: the mistake the check exists for
        y = ns["MyNorm"]()(x * m)
        return y * m

    with pytest.raises(AssertionError, match="adapter vs reference"):
        check(biased, ns["reference_my_norm"], x, mask, zero_at_masked=False)

    def leaky(x, m):  # right at visible sites, but not zero at masked ones
        return ns["masked_my_norm"](ns["MyNorm"](), x, m) * m + (1 - m)

    check(lambda x, m: ns["masked_my_norm"](ns["MyNorm"](), x, m) * m, ns["reference_my_norm"], x, mask)

    with pytest.raises(AssertionError, match="masked site"):
        check(leaky, ns["reference_my_norm"], x, mask)

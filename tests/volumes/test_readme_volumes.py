"""The README's "Volumes and signals" examples run as written, and the values their comments show are true.

Every ```python block of that section is executed; a line that is only an expression followed by a
comment starting with a Python literal (``enc.feature_strides    # [4, 8, 16, 32]``) is checked to
evaluate to that literal at that point of the example.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
_SHOWN = re.compile(r"^(?P<expr>[A-Za-z_][\w.]*)\s+# (?P<comment>.+)$")


def _blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Volumes and signals\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _literal_prefix(comment: str):
    for end in range(len(comment), 0, -1):
        try:
            return ast.literal_eval(comment[:end])
        except (ValueError, SyntaxError):
            continue
    return None


def _with_checks(code: str) -> tuple[str, int]:
    lines, checks = [], 0
    for number, line in enumerate(code.splitlines(), 1):
        shown = _SHOWN.match(line)
        value = _literal_prefix(shown["comment"]) if shown else None
        if shown and value is not None:
            lines.append(f"__check({shown['expr']}, {value!r}, {number}, {shown['expr']!r})")
            checks += 1
        else:
            lines.append(line)
    return "\n".join(lines), checks


def _check(got, expected, line: int, expr: str) -> None:
    assert got == expected, f"README line {line} of the block: {expr} is {got!r}, the README says {expected!r}"


def test_the_section_has_the_3d_and_1d_examples():
    blocks = _blocks()
    assert len(blocks) == 3
    assert "r3d_18" in blocks[0] and "ResidualEncoderUNet" in blocks[1] and "Conv1d" in blocks[2]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2], ids=["video", "nnunet", "signal"])
def test_readme_volume_example_runs(index):
    code, checks = _with_checks(_blocks()[index])
    assert checks >= 1  # each example shows at least one value
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace = {"__check": _check}
        exec(compile(code, f"README Volumes and signals block {index}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    loss = namespace["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()  # the example's loss trains the user's model

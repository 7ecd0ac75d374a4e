"""benchmarks.volume_loader runs end to end on tiny volumes and prints every row it promises."""

from __future__ import annotations

import re

import pytest

from benchmarks import volume_loader


@pytest.mark.slow
def test_volume_loader_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    volume_loader.main(["--n", "2", "--volume", "36x40x36", "--crop", "32", "--steps", "1", "--threads", "1"])
    out = capsys.readouterr().out
    for row in (
        "no cache, epoch 1",
        "no cache, epoch 2",
        "cache, first epoch",
        "warm cache, new run",
        "warm cache, epoch 2",
    ):
        assert re.search(re.escape(row) + r".*\d+\.\d+ samples/s", out), out
    assert re.search(r"SparK step on cpu \(small.*\): \d+\.\d ms", out)
    assert len(re.findall(r"loader/step ratio", out)) == 2

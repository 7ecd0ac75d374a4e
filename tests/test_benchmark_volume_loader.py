"""benchmarks.volume_loader runs end to end on tiny volumes and prints every row it promises."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_volume_loader_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "volume_loader.py"
    spec = importlib.util.spec_from_file_location("_bench_volume_loader", path)
    volume_loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(volume_loader)

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

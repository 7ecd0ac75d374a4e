"""Smoke test of the learning-quality benchmark (the real run is documented in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


def test_learning_benchmark_runs_and_reports_both_probes(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"
    spec = importlib.util.spec_from_file_location("_bench_learning", path)
    learning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learning)

    result = learning.main(["--seeds", "0", "1", "--steps", "2", "--batch", "8", "--limit", "60",
                            "--threads", "1", "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        for kind in ("random_init", "pretrained"):
            assert 0.0 <= row[kind]["knn"] <= 1.0 and 0.0 <= row[kind]["logreg"] <= 1.0
        assert row["loss_first20"] > 0
    assert (tmp_path / "r.json").is_file()

"""Smoke test of the learning-quality benchmark (the real run is documented in BENCHMARKS.md)."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")


def test_learning_benchmark_runs_and_reports_both_probes(tmp_path):
    from benchmarks import learning

    result = learning.main(["--seeds", "0", "1", "--steps", "2", "--batch", "8", "--limit", "60",
                            "--threads", "1", "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        for kind in ("random_init", "pretrained"):
            assert 0.0 <= row[kind]["knn"] <= 1.0 and 0.0 <= row[kind]["logreg"] <= 1.0
        assert row["loss_first20"] > 0
    assert (tmp_path / "r.json").is_file()

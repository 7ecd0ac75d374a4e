"""`benchmarks/learning.py --finetune` runs end to end (tiny sizes): both arms, every budget, nested subsets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


def test_finetune_benchmark_smoke(tmp_path, capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"  # by path, as the other smoke test
    spec = importlib.util.spec_from_file_location("_bench_learning_ft", path)
    learning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learning)

    out = tmp_path / "ft.json"
    result = learning.main(["--finetune", "--seeds", "0", "--steps", "2", "--ft-steps", "2", "--limit", "120",
                            "--label-budgets", "2", "0", "--threads", "1", "--json", str(out)])  # fmt: skip
    assert out.is_file()
    row = result["rows"][0]
    assert set(row["budgets"]) == {"2", "0"}
    assert row["budgets"]["2"]["images"] == 20 and row["budgets"]["0"]["images"] == 120  # 10 digits x 2; all
    for arms in row["budgets"].values():
        assert 0.0 <= arms["random_init"] <= 1.0 and 0.0 <= arms["pretrained"] <= 1.0
    assert set(result["table"]) == {"2", "0"} and "| labels per class |" in capsys.readouterr().out

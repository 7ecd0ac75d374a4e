"""sparsify-finetune on a labelled subset: stratified, seeded, nested budgets, its file list saved."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from _recipe_helpers import TINY
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify.recipes import finetune
from sparsify.recipes.finetune import label_subset

_labels = st.lists(st.integers(0, 4), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(labels=_labels, small=st.integers(1, 8), extra=st.integers(0, 8), seed=st.integers(0, 2**20))
def test_per_class_subset_is_stratified_seeded_and_nested(labels: list[int], small: int, extra: int, seed: int):
    keep = label_subset(labels, per_class=small, seed=seed)
    assert keep == sorted(set(keep)) and all(0 <= i < len(labels) for i in keep)
    have, got = Counter(labels), Counter(labels[i] for i in keep)
    assert got == {c: min(n, small) for c, n in have.items()}
    assert label_subset(labels, per_class=small, seed=seed) == keep  # the seed fixes it
    assert set(keep) <= set(label_subset(labels, per_class=small + extra, seed=seed))  # budgets nest


@settings(max_examples=40, deadline=None)
@given(labels=_labels, fraction=st.floats(0.01, 1.0), seed=st.integers(0, 2**20))
def test_fraction_subset_keeps_a_share_of_every_class(labels: list[int], fraction: float, seed: int) -> None:
    got = Counter(labels[i] for i in label_subset(labels, fraction=fraction, seed=seed))
    assert got == {c: max(1, round(n * fraction)) for c, n in Counter(labels).items()}


def test_seeds_draw_different_subsets() -> None:
    labels = [i % 3 for i in range(300)]
    assert label_subset(labels, per_class=5, seed=0) != label_subset(labels, per_class=5, seed=1)
    with pytest.raises(ValueError):
        label_subset(labels)


def test_cli_trains_on_the_subset_and_lists_it(
    labelled_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft"
    args = ["--data", str(labelled_folder), "--model", TINY, "--input-size", "32", "--batch-size", "2",
            "--workers", "0", "--no-tensorboard", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert finetune.main([*args, "--labels-per-class", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "2 per class" in stdout and "train_subset.txt" in stdout and "4 training images" in stdout
    rows = [line.split("\t") for line in (out / "train_subset.txt").read_text().splitlines()]
    assert Counter(c for c, _ in rows) == {"cls0": 2, "cls1": 2}
    assert all(Path(p).is_file() and Path(p).parent.name == c for c, p in rows)
    # the held-out validation images never enter the subset
    (_, _), (val_paths, _) = finetune.split_train_val(
        *finetune.find_labelled_images(labelled_folder)[:2], fraction=0.2, seed=0
    )
    assert not {p for _, p in rows} & {str(p) for p in val_paths}
    # a resumed run may not train on another subset
    assert finetune.main([*args, "--labels-per-class", "3", "--steps", "2"]) == 2
    assert "--labels-per-class" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # not both (argparse: usage line, exit 2)
        finetune.main([*args, "--label-fraction", "0.5", "--labels-per-class", "2"])
    assert stop.value.code == 2

"""Fixtures for the recipe tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from _recipe_helpers import TINY, make_image_folder, make_labelled_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    return make_labelled_folder(tmp_path / "labelled")


@pytest.fixture
def tiny_model() -> str:
    return TINY

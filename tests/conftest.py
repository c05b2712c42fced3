"""Shared fixtures: the real H&E data folder and small helpers for every test module."""

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real H&E data folder: `$EXAONEPATH_TEST_DATA`, else `../shared/data` beside the project."""
    return Path(os.environ.get("EXAONEPATH_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real H&E test data not found at {path}; set EXAONEPATH_TEST_DATA to its folder")
    return path
